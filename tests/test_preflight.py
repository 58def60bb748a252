"""The checks made before anything is sent: where the output goes, whether the endpoint answers,
whether it accepts the key and offers the model; and the commands that read a job's checkpoint."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batchrun.simulator import RunningSimulator
from tests.conftest import (
    TEST_KEY_ENV,
    article_rows,
    checkpoint_path,
    checkpoint_rows,
    invoke,
    write_job,
)
from tests.stub_server import Reply, Request, completion, serve_stub

ENDPOINT = {"api_key_env": TEST_KEY_ENV, "timeout_s": 10}
SKIP = (
    "pass --no-check-model to skip this check (endpoint.check_model: false in the job), as for a "
    "gateway that serves models it does not list"
)
# LiteLLM 1.108 without its database, asked with a key it cannot check: on GET /models and on chat.
NO_DB = Reply(400, {"error": {"type": "no_db_connection", "message": "No connected db."}})
# A LiteLLM wildcard route (`model_name: "*"`) lists its provider's names, not what it serves.
WILDCARD_LIST = Reply(
    200, {"object": "list", "data": [{"id": f"openai/gpt-{i}", "object": "model"} for i in range(211)]}
)


def one_error_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("Error: "), stderr
    return lines[0]


def job_command(command: str, job: Path) -> list[str]:
    """`command` run on `job`, each the way it is usually given a job."""
    if command == "models":
        return ["models", "--job", str(job)]
    return [command, str(job)]


# --- #10 item 2: an output path under a file


@pytest.mark.parametrize("command", ["run", "validate", "estimate"])
def test_output_under_a_file_is_one_line_and_exit_2(
    tmp_path: Path, simulator: RunningSimulator, command: str
) -> None:
    (tmp_path / "afile.txt").write_text("not a folder")
    job = write_job(tmp_path, article_rows(3), simulator.base_url, output={"path": "afile.txt/out.csv"})

    result = invoke(command, str(job))

    assert result.exit_code == 2, result.output
    assert one_error_line(result.stderr) == (
        f"Error: {job}: output.path {tmp_path}/afile.txt/out.csv: "
        f"{tmp_path}/afile.txt is a file, not a directory"
    )
    assert simulator.stats.requests == 0


def test_output_under_a_file_is_named_as_the_option(tmp_path: Path, simulator: RunningSimulator) -> None:
    (tmp_path / "afile.txt").write_text("not a folder")
    job = write_job(tmp_path, article_rows(3), simulator.base_url)

    result = invoke("run", str(job), "--output", str(tmp_path / "afile.txt" / "deeper" / "out.csv"))

    assert result.exit_code == 2, result.output
    assert one_error_line(result.stderr) == (
        f"Error: output {tmp_path}/afile.txt/deeper/out.csv: {tmp_path}/afile.txt is a file, not a directory"
    )
    assert simulator.stats.requests == 0


# --- #10 item 3: an output folder nobody may write to, root included


@contextlib.contextmanager
def immutable(folder: Path) -> Iterator[Path]:
    """`folder` made immutable (`chattr +i`): not even root may create a file in it."""
    folder.mkdir(exist_ok=True)
    made = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        why = f"chattr +i does not work on {folder}'s filesystem: {made.stderr.strip()}"
        if os.environ.get("CI") == "true":  # as the browser test: a skip in CI would hide the case
            pytest.fail(f"CI=true: {why} (run as root, on ext4 or another filesystem with attributes)")
        pytest.skip(why)
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


@pytest.mark.parametrize(
    ("output", "folder"), [("locked/out.csv", "locked"), ("locked/new/out.csv", "locked")]
)
def test_unwritable_output_folder_stops_before_anything_is_sent(
    tmp_path: Path, simulator: RunningSimulator, output: str, folder: str
) -> None:
    job = write_job(tmp_path, article_rows(3), simulator.base_url, output={"path": output})

    with immutable(tmp_path / folder):
        result = invoke("run", str(job))
        assert list((tmp_path / folder).iterdir()) == []

    assert result.exit_code == 2, result.output
    assert one_error_line(result.stderr) == (
        f"Error: {job}: output.path {tmp_path / output}: the folder {tmp_path / folder} is not writable "
        "(Operation not permitted)"
    )
    assert simulator.stats.requests == 0


def test_missing_output_folders_are_still_made(tmp_path: Path, simulator: RunningSimulator) -> None:
    job = write_job(tmp_path, article_rows(3), simulator.base_url, output={"path": "new/deeper/out.csv"})

    result = invoke("run", str(job))

    assert result.exit_code == 0, result.output
    assert (tmp_path / "new" / "deeper" / "out.csv").exists()
    assert not list((tmp_path / "new" / "deeper").glob(".batchrun-write-test-*"))


# --- #10 item 4: an endpoint that cannot be reached, found before any row


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def assert_nothing_recorded(job: Path) -> None:
    """No output and no checkpoint, which would hold the wrong base_url and refuse the right one."""
    assert not checkpoint_path(job).exists()
    assert not (job.parent / "out" / "result.parquet").exists()


@pytest.mark.parametrize("command", ["run", "validate", "estimate", "models"])
def test_nothing_listening_is_exit_4_within_seconds(tmp_path: Path, command: str) -> None:
    base_url = f"http://127.0.0.1:{free_port()}/v1"
    job = write_job(tmp_path, article_rows(5), base_url)

    started = time.monotonic()
    result = invoke(*job_command(command, job))

    assert time.monotonic() - started < 5
    assert result.exit_code == 4, result.output
    assert one_error_line(result.stderr) == f"Error: cannot reach {base_url}: connection refused"
    assert_nothing_recorded(job)


def test_a_corrected_base_url_runs_after_an_unreachable_one(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    wrong = f"http://127.0.0.1:{free_port()}/v1"
    assert invoke("run", str(write_job(tmp_path, article_rows(5), wrong))).exit_code == 4

    result = invoke("run", str(write_job(tmp_path, article_rows(5), simulator.base_url)))

    assert result.exit_code == 0, result.output
    assert simulator.stats.requests == 5


def test_a_host_that_does_not_resolve_is_a_job_error(tmp_path: Path) -> None:
    job = write_job(tmp_path, article_rows(5), "https://batchrun-test.invalid/v1")

    result = invoke("run", str(job))

    assert result.exit_code == 2, result.output
    line = one_error_line(result.stderr)
    assert line.startswith(
        "Error: cannot reach https://batchrun-test.invalid/v1: the host name does not resolve"
    )
    assert_nothing_recorded(job)


def test_a_connection_that_is_never_accepted_is_exit_4(tmp_path: Path) -> None:
    """A listener whose queue is full drops new connections unanswered, as a firewall would."""
    with socket.socket() as listener, contextlib.ExitStack() as stack:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(3):  # fill the accept queue
            client = stack.enter_context(socket.socket())
            client.setblocking(False)
            client.connect_ex(("127.0.0.1", port))
        base_url = f"http://127.0.0.1:{port}/v1"
        job = write_job(
            tmp_path, article_rows(5), base_url, endpoint={**ENDPOINT, "base_url": base_url, "timeout_s": 1}
        )

        started = time.monotonic()
        result = invoke("run", str(job))

    assert time.monotonic() - started < 5
    assert result.exit_code == 4, result.output
    assert one_error_line(result.stderr).startswith(f"Error: cannot reach {base_url}: no ")
    assert_nothing_recorded(job)


# --- #11 item 1: a model list refused with 400-403 stops every command before anything is sent


@pytest.mark.parametrize("command", ["run", "validate", "estimate", "models"])
def test_litellm_no_db_400_on_the_model_list_stops_every_command(tmp_path: Path, command: str) -> None:
    with serve_stub(lambda request: NO_DB) as stub:
        job = write_job(tmp_path, article_rows(5), stub.base_url)
        result = invoke(*job_command(command, job))

    assert result.exit_code == 2, result.output
    assert one_error_line(result.stderr) == (
        f"Error: {stub.base_url} refused to list its models (HTTP 400: No connected db.); "
        "check the key and endpoint.base_url"
    )
    assert stub.chat_requests() == []
    assert_nothing_recorded(job)


@pytest.mark.parametrize(
    "refusal",
    [
        Reply(401, {"error": {"message": "Incorrect API key provided"}}),
        Reply(403, {"error": {"message": "Forbidden"}}),
        Reply(402, {"error": {"message": "Payment required"}}),
    ],
)
def test_other_refusals_of_the_model_list_stop_the_run(tmp_path: Path, refusal: Reply) -> None:
    with serve_stub(lambda request: refusal) as stub:
        job = write_job(tmp_path, article_rows(5), stub.base_url)
        result = invoke("run", str(job))

    assert result.exit_code == 2, result.output
    assert f"HTTP {refusal.status}" in one_error_line(result.stderr)
    assert stub.chat_requests() == []


def flaky_model_list(*failures: Reply) -> Any:
    """A stub that answers GET /models with `failures` first, then a list naming grok-4.3."""
    pending = list(failures)

    def handle(request: Request) -> Reply:
        if request.path.endswith("/models"):
            if pending:
                return pending.pop(0)
            return Reply(200, {"object": "list", "data": [{"id": "grok-4.3", "object": "model"}]})
        return Reply(200, completion())

    return handle


@pytest.mark.parametrize(
    "failure",
    [
        Reply(429, {"error": {"message": "slow down"}}, {"retry-after": "0"}),
        Reply(503, {"error": {"message": "upstream busy"}}),
        Reply(500, {"error": {"message": "oops"}}),
        Reply(408, b""),
    ],
)
def test_passing_failures_of_the_model_list_are_tried_again(tmp_path: Path, failure: Reply) -> None:
    with serve_stub(flaky_model_list(failure, failure)) as stub:
        job = write_job(tmp_path, article_rows(3), stub.base_url)
        result = invoke("run", str(job))

    assert result.exit_code == 0, result.output
    assert "model name not checked" not in result.stderr
    assert [r.path for r in stub.requests[:3]] == ["/v1/models"] * 3
    assert len(stub.chat_requests()) == 3


def test_a_model_list_that_stays_503_is_exit_4(tmp_path: Path) -> None:
    with serve_stub(flaky_model_list(*[Reply(503, {"error": {"message": "upstream down"}})] * 5)) as stub:
        job = write_job(tmp_path, article_rows(3), stub.base_url)
        result = invoke("run", str(job))

    assert result.exit_code == 4, result.output
    assert one_error_line(result.stderr) == f"Error: cannot reach {stub.base_url}: HTTP 503: upstream down"
    assert len(stub.requests) == 3  # three attempts at the list, no row
    assert_nothing_recorded(job)


def test_a_404_still_means_no_model_list(tmp_path: Path) -> None:
    with serve_stub(flaky_model_list(*[Reply(404, b"")] * 5)) as stub:
        job = write_job(tmp_path, article_rows(3), stub.base_url)
        result = invoke("run", str(job))

    assert result.exit_code == 0, result.output
    assert "note: the endpoint lists no models; model name not checked" in result.stderr
    assert len([r for r in stub.requests if r.path.endswith("/models")]) == 1


# --- #11 item 5: a gateway that serves models its list does not name


def wildcard_gateway(request: Request) -> Reply:
    return WILDCARD_LIST if request.path.endswith("/models") else Reply(200, completion())


def test_a_model_the_list_does_not_name_names_the_way_out(tmp_path: Path) -> None:
    with serve_stub(wildcard_gateway) as stub:
        job = write_job(tmp_path, article_rows(3), stub.base_url)
        result = invoke("run", str(job))

    assert result.exit_code == 2
    line = one_error_line(result.stderr)
    assert f"model 'grok-4.3' not offered by {stub.base_url} (it offers: " in line
    assert line.endswith(f"; {SKIP}")
    assert stub.chat_requests() == []


@pytest.mark.parametrize("how", ["job key", "flag"])
@pytest.mark.parametrize("command", ["run", "validate", "estimate"])
def test_the_model_check_can_be_skipped(tmp_path: Path, how: str, command: str) -> None:
    with serve_stub(wildcard_gateway) as stub:
        endpoint = {**ENDPOINT, "base_url": stub.base_url, "check_model": how == "flag"}
        job = write_job(tmp_path, article_rows(3), stub.base_url, endpoint=endpoint)
        flag = ["--no-check-model"] if how == "flag" else []
        result = invoke(command, str(job), *flag)

    assert result.exit_code == 0, result.output
    assert "not checked" not in result.stderr
    assert [r.path for r in stub.requests if r.path.endswith("/models")] == []
    assert len(stub.chat_requests()) == (3 if command == "run" else 0)


# --- #11 item 12: estimate --sample without a terminal


def test_estimate_sample_without_a_terminal_asks_for_yes(tmp_path: Path, simulator: RunningSimulator) -> None:
    job = write_job(tmp_path, article_rows(20), simulator.base_url)

    result = invoke("estimate", str(job), "--sample", "5")

    assert result.exit_code == 2, result.output
    question, error = result.stderr.splitlines()
    assert question.startswith("send a pilot of 5 random rows")
    assert error == "Error: no answer on stdin (no terminal?); pass --yes to send the pilot"
    assert simulator.stats.requests == 0
    assert checkpoint_rows(job) == 0


# --- #11 item 13: every command that reads a job's checkpoint takes --output


def test_commands_that_read_the_checkpoint_follow_output(tmp_path: Path, simulator: RunningSimulator) -> None:
    job = write_job(tmp_path, article_rows(4), simulator.base_url)
    elsewhere = tmp_path / "elsewhere" / "answers.csv"
    assert invoke("run", str(job), "--output", str(elsewhere), "--limit", "3").exit_code == 0
    assert not checkpoint_path(job).exists()

    status = invoke("status", str(job), "--output", str(elsewhere))
    assert status.exit_code == 0, status.output
    assert status.stdout.startswith("ok: 3\nfailed: 0\nskipped: 0\npending: 1\nof: 4\n")
    assert invoke("status", str(job)).stdout == "not started: 0 of 4 rows done\n"

    cost = invoke("cost", str(job), "--output", str(elsewhere), "--format", "csv")
    assert cost.exit_code == 0, cost.output
    assert ",3," in cost.stdout

    validate = invoke("validate", str(job), "--output", str(elsewhere))
    assert validate.exit_code == 0, validate.output
    assert f"output {elsewhere}" in validate.stderr

    estimate = invoke("estimate", str(job), "--output", str(elsewhere))
    assert estimate.exit_code == 0, estimate.output
    assert estimate.stdout.startswith("rows: 1 to do of 4 (3 done, ")
    assert (elsewhere.parent / "answers.csv.estimate.json").exists()


def test_cost_of_a_table_refuses_output(tmp_path: Path) -> None:
    result = invoke("cost", str(tmp_path / "out.parquet"), "--output", str(tmp_path / "x.csv"))

    assert result.exit_code == 2
    assert (
        one_error_line(result.stderr)
        == "Error: --output goes with a job file: `batchrun cost JOB --output PATH`"
    )
