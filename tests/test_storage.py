"""Object storage and many files (#13 item 4): a job reads its input from and writes its output
to an S3 bucket (moto's S3 server on loopback, read and written by polars' own cloud I/O), or
reads a glob or folder of local Parquet parts as one table in sorted order. Bad buckets and URLs
stop the job with one line before anything is sent."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml

from batchrun.simulator import RunningSimulator
from tests.conftest import BUCKET, TEST_KEY, TEST_KEY_ENV, article_rows, invoke, s3_env
from tests.stub_server import Reply, Request, serve_stub


def keys(client: Any) -> list[str]:
    return sorted(item["Key"] for item in client.list_objects_v2(Bucket=BUCKET).get("Contents", []))


def job_file(tmp_path: Path, input_path: str, output_path: str, base_url: str | None = None) -> Path:
    job: dict[str, Any] = {
        "input": {"path": input_path, "id_column": "id"},
        "output": {"path": output_path, "include_columns": ["title"]},
        "model": "grok-4.3",
        "prompt": {"user": "{title}\n\n{text}"},
        "params": {"max_tokens": 40},
        "endpoint": {"base_url": base_url or "http://127.0.0.1:9/v1", "api_key_env": TEST_KEY_ENV},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def test_job_reads_its_input_from_a_bucket_and_writes_its_output_there(
    tmp_path: Path, s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    pl.DataFrame(article_rows(20)).write_parquet(tmp_path / "items.parquet")
    s3.upload_file(str(tmp_path / "items.parquet"), BUCKET, "in/items.parquet")
    output = f"s3://{BUCKET}/out/result.parquet"
    job = job_file(tmp_path, f"s3://{BUCKET}/in/items.parquet", output)

    result = invoke("run", str(job), "--simulate", "-q")

    assert result.exit_code == 0, result.output
    table = pl.read_parquet(output)  # through polars' cloud I/O, as a user would read it
    assert table["id"].to_list() == [1000 + i for i in range(20)]
    assert table["status"].to_list() == ["ok"] * 20
    # One object for the output (and the write probe): no temp objects left in the bucket.
    assert keys(s3) == ["in/items.parquet", "out/.batchrun-write-test", "out/result.parquet"]
    # The checkpoint stays on local disk, in .batchrun/ beside the job, named from the URL.
    digest = hashlib.sha256(output.encode()).hexdigest()[:12]
    assert (tmp_path / ".batchrun" / f"result.parquet-{digest}.checkpoint.sqlite").is_file()
    assert (tmp_path / ".batchrun" / f"result.parquet-{digest}.report.json").is_file()

    status = invoke("status", str(job))
    assert status.exit_code == 0, status.output
    assert status.output.startswith("ok: 20\nfailed: 0\nskipped: 0\npending: 0\n"), status.output

    # Resume finds the checkpoint again: the rerun sends nothing.
    again = invoke("run", str(job), "--simulate")
    assert again.exit_code == 0, again.output
    assert "20 of 20 rows already done" in again.stderr


def test_output_url_given_with_output_option_stays_a_url(tmp_path: Path, s3: Any) -> None:
    pl.DataFrame(article_rows(3)).write_csv(tmp_path / "items.csv")
    job = job_file(tmp_path, "items.csv", "out/result.csv")

    result = invoke("run", str(job), "--simulate", "-q", "--output", f"s3://{BUCKET}/x/answers.csv")

    assert result.exit_code == 0, result.output
    assert pl.read_csv(f"s3://{BUCKET}/x/answers.csv")["status"].to_list() == ["ok"] * 3
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("input_path", ["parts/part-*.parquet", "parts"])
def test_glob_or_folder_of_parquet_parts_is_one_input_in_sorted_order(
    tmp_path: Path, simulator: RunningSimulator, monkeypatch: pytest.MonkeyPatch, input_path: str
) -> None:
    monkeypatch.setenv(TEST_KEY_ENV, TEST_KEY)
    rows = article_rows(9)
    (tmp_path / "parts").mkdir()
    for part in (2, 0, 1):  # written out of order: the files' sorted names give the row order
        pl.DataFrame(rows[part * 3 : part * 3 + 3]).write_parquet(tmp_path / "parts" / f"part-{part}.parquet")
    (tmp_path / "parts" / "_SUCCESS").write_text("")  # as Spark leaves it: not a part
    job = job_file(tmp_path, input_path, "out/result.parquet", simulator.base_url)

    result = invoke("run", str(job), "-q")

    assert result.exit_code == 0, result.output
    table = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert table["id"].to_list() == [row["id"] for row in rows]
    assert table["status"].to_list() == ["ok"] * 9
    assert simulator.stats.requests == 9


def test_glob_that_matches_nothing_is_one_line(tmp_path: Path) -> None:
    job = job_file(tmp_path, "parts/part-*.parquet", "out/result.parquet")

    result = invoke("validate", str(job))

    assert result.exit_code == 2
    assert result.stderr == f"Error: input {tmp_path}/parts/part-*.parquet matches no files\n"


def run_refused(job: Path) -> str:
    """Run the real CLI; it must stop with exit 2 and one `Error:` line."""
    result = invoke("run", str(job), "-q")
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_input_bucket_that_does_not_exist_stops_before_sending(
    tmp_path: Path, s3: Any, simulator: RunningSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TEST_KEY_ENV, TEST_KEY)
    job = job_file(tmp_path, "s3://no-such-bucket/items.parquet", "out/result.parquet", simulator.base_url)

    line = run_refused(job)

    assert line == (
        "Error: cannot read input s3://no-such-bucket/items.parquet: "
        "NoSuchBucket: The specified bucket does not exist"
    )
    assert simulator.stats.requests == 0
    assert not (tmp_path / "out").exists()


def test_output_bucket_that_does_not_exist_stops_before_sending(
    tmp_path: Path, s3: Any, simulator: RunningSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TEST_KEY_ENV, TEST_KEY)
    pl.DataFrame(article_rows(3)).write_parquet(tmp_path / "items.parquet")
    job = job_file(tmp_path, "items.parquet", "s3://no-such-bucket/out/result.parquet", simulator.base_url)

    line = run_refused(job)

    assert line == (
        "Error: cannot write to s3://no-such-bucket/out/result.parquet: "
        "NoSuchBucket: The specified bucket does not exist"
    )
    assert simulator.stats.requests == 0
    assert not (tmp_path / ".batchrun").exists()  # no checkpoint for a run that never started


# What S3 answers a key that may not read the bucket (status 403, its XML body as S3 sends it).
ACCESS_DENIED = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code><Message>Access Denied'
    "</Message><RequestId>6QKF6R3ZCEV1GNNX</RequestId><HostId>x0vG8nBeOmU1nYFq9rXp2w==</HostId></Error>"
)


def test_bucket_that_refuses_access_stops_before_sending(
    tmp_path: Path, simulator: RunningSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TEST_KEY_ENV, TEST_KEY)

    def refuse(request: Request) -> Reply:
        # raw: sent, then the connection closed, so no keep-alive socket outlives the stub.
        return Reply(raw=Reply(403, ACCESS_DENIED, {"content-type": "application/xml"}).encode())

    with serve_stub(refuse) as store:
        s3_env(monkeypatch, f"http://127.0.0.1:{store.port}")
        job = job_file(tmp_path, f"s3://{BUCKET}/items.parquet", "out/result.parquet", simulator.base_url)
        line = run_refused(job)

    assert line == f"Error: cannot read input s3://{BUCKET}/items.parquet: AccessDenied: Access Denied"
    assert simulator.stats.requests == 0


def test_checkpoint_key_puts_the_checkpoint_where_it_says_and_status_finds_it(tmp_path: Path) -> None:
    pl.DataFrame(article_rows(4)).write_csv(tmp_path / "items.csv")
    job = job_file(tmp_path, "items.csv", "out/result.csv")
    job.write_text(job.read_text() + "checkpoint: state/items.sqlite\n")

    result = invoke("run", str(job), "--simulate", "-q")

    assert result.exit_code == 0, result.output
    assert (tmp_path / "state" / "items.sqlite").is_file()
    assert not (tmp_path / "out" / "result.csv.checkpoint.sqlite").exists()
    status = invoke("status", str(job))
    assert status.output.startswith("ok: 4\n"), status.output


def test_python_api_with_a_table_in_memory_and_an_output_url(
    tmp_path: Path, s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The input table is kept where the URL output's checkpoint lives, never under a path made
    from the URL (`s3:/...`); a rerun resumes from there."""
    import batchrun

    monkeypatch.chdir(tmp_path)
    url = f"s3://{BUCKET}/api/out.parquet"
    df = pl.DataFrame(article_rows(6))
    keys_ = {"model": "grok-4.3", "prompt": "{title}", "params": {"max_tokens": 20}, "output": url}

    first = batchrun.run(df, simulate=True, quiet=True, **keys_)
    again = batchrun.Job.define(df, **keys_).run(simulate=True, quiet=True)

    assert first["status"].to_list() == ["ok"] * 6
    assert pl.read_parquet(url)["status"].to_list() == ["ok"] * 6
    assert not (tmp_path / "s3:").exists()
    assert again.requests == 0  # resumed from the checkpoint beside the kept input
    assert list((tmp_path / ".batchrun").glob("out.parquet-*.checkpoint.sqlite"))
