"""Shared fixtures: a clean environment, a real simulator on loopback, jobs written to tmp_path."""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml
from click.testing import CliRunner, Result

from batchrun.cli import main
from batchrun.html_report import PAGE_SWITCH
from batchrun.simulator import RunningSimulator, SimulatorConfig, serve_in_thread

TEST_KEY_ENV = "BATCHRUN_TEST_KEY"
TEST_KEY = "sk-test-0123456789abcdef"


# Proxies and CA files of the developer's shell would route or refuse the tests' loopback traffic.
OUTSIDE_NETWORK = {"HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "SSL_CERT_FILE", "SSL_CERT_DIR"}


@pytest.fixture(scope="session")
def cache_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tests' own cache folder (list prices): the developer's is neither read nor written."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, cache_home: Path) -> None:
    """Settings from the developer's shell must not leak into a test."""
    for name in list(os.environ):
        if name.startswith(("BATCHRUN_", "RELAYDANCE_", "OPENAI_")) or name.upper() in OUTSIDE_NETWORK:
            monkeypatch.delenv(name)
    monkeypatch.setenv(TEST_KEY_ENV, TEST_KEY)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))
    monkeypatch.setenv(PAGE_SWITCH, "0")  # tests/test_html_report.py draws the page


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    """moto's S3 server on loopback, for the tests that read or write a bucket."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request would mix into stderr
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


BUCKET = "batchrun-test"


def s3_env(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """The variables polars (object_store) reads, as a user would set them for an S3-compatible store."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ALLOW_HTTP", "true")


@pytest.fixture
def s3(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A client of a fresh, empty bucket (BUCKET), with the environment pointing polars at the server."""
    import boto3

    s3_env(monkeypatch, s3_server)
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket=BUCKET)
    yield client
    for item in client.list_objects_v2(Bucket=BUCKET).get("Contents", []):
        client.delete_object(Bucket=BUCKET, Key=item["Key"])
    client.delete_bucket(Bucket=BUCKET)


@pytest.fixture(scope="session")
def ray_temp_dir() -> Iterator[Path]:
    """The session's Ray files; its raylet's command line names it, which tells this session's
    Ray processes from any other Ray on the machine."""
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a length limit
    try:
        yield Path(temp)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_session(ray_temp_dir: Path) -> Iterator[Any]:
    """A local Ray for the session (two CPUs, no dashboard), its files under ray_temp_dir. Its
    processes start with the test key in their environment, as a user's nodes would have it, so a
    driver in another process (`--ray` with RAY_ADDRESS set) can join it too."""
    import ray

    before = os.environ.get(TEST_KEY_ENV)
    os.environ[TEST_KEY_ENV] = TEST_KEY
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=str(ray_temp_dir))
    finally:
        if before is None:
            del os.environ[TEST_KEY_ENV]
        else:
            os.environ[TEST_KEY_ENV] = before
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture
def simulator() -> Iterator[RunningSimulator]:
    with serve_in_thread(SimulatorConfig(api_key=TEST_KEY)) as sim:
        yield sim


def article_rows(n: int) -> list[dict[str, Any]]:
    return [
        {
            "id": 1000 + i,
            "title": f"Story {i}",
            "text": f"Lead sentence of story {i}. A second sentence follows. A third is dropped.",
        }
        for i in range(n)
    ]


def write_job(
    tmp_path: Path,
    rows: list[dict[str, Any]],
    base_url: str,
    **overrides: Any,
) -> Path:
    """Write rows as input.csv and a job over them; `overrides` replace top-level job keys."""
    pl.DataFrame(rows).write_csv(tmp_path / "input.csv")
    job: dict[str, Any] = {
        "input": {"path": "input.csv", "id_column": "id"},
        "output": {"path": "out/result.parquet", "include_columns": ["title"]},
        "model": "grok-4.3",
        "prompt": {"system": "Summarize.", "user": "{title}\n\n{text}"},
        "params": {"temperature": 0.2, "max_tokens": 40},
        "endpoint": {"base_url": base_url, "api_key_env": TEST_KEY_ENV, "timeout_s": 10},
        "concurrency": 8,
        "retry": {"max_attempts": 4, "initial_backoff_s": 0.01, "max_backoff_s": 0.05},
    }
    job.update(overrides)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def read_output(job_path: Path) -> pl.DataFrame:
    return pl.read_parquet(job_path.parent / "out" / "result.parquet")


def invoke(*args: str) -> Result:
    """The real CLI in this process (fast; for runs where signals do not matter)."""
    return CliRunner().invoke(main, list(args))


def batchrun_process(*args: str, **kwargs: Any) -> subprocess.Popen[str]:
    """The real CLI in its own process (signals and kill -9 need one)."""
    return subprocess.Popen(
        [sys.executable, "-m", "batchrun", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def run_batchrun(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "batchrun", *args], capture_output=True, text=True, timeout=timeout
    )


def checkpoint_path(job: Path) -> Path:
    return job.parent / "out" / "result.parquet.checkpoint.sqlite"


def checkpoint_rows(job: Path) -> int:
    path = checkpoint_path(job)
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(path, timeout=5) as db:
            return int(db.execute("SELECT COUNT(*) FROM results").fetchone()[0])
    except sqlite3.OperationalError:  # the table is not created yet
        return 0


def user_message(row: dict[str, Any]) -> str:
    """The user message write_job's prompt makes of `row`: the simulator's key for what it answered."""
    return f"{row['title']}\n\n{row['text']}"


def answered_not_kept(sim: RunningSimulator, job: Path, rows: list[dict[str, Any]]) -> set[str]:
    """The user messages the simulator has answered whose rows the checkpoint does not hold (yet):
    the only rows a run that dies now may send again. Answers are read before the checkpoint, so
    a row kept in between counts as not kept: the set is never too small."""
    answered = set(sim.stats.ok_by_user_message)
    path = checkpoint_path(job)
    kept: set[str] = set()
    if path.exists():
        with sqlite3.connect(path, timeout=5) as db:
            kept = {row_id for (row_id,) in db.execute("SELECT id FROM results WHERE status = 'ok'")}
    return answered - {user_message(row) for row in rows if str(row["id"]) in kept}


def wait_quiet(sim: RunningSimulator, deadline_s: float = 10) -> None:
    """Every request a client that is gone (killed, reaped) had sent is counted and answered: one
    round trip to the simulator first (its loop reads every connection that was readable before
    it reads this one), then no request without its answer."""
    with urllib.request.urlopen(f"{sim.base_url.removesuffix('/v1')}/simulator/stats", timeout=deadline_s):
        pass
    deadline = time.monotonic() + deadline_s
    while sim.stats.requests != sum(sim.stats.by_status.values()):
        assert time.monotonic() < deadline, "the simulator never answered every request it had"
        time.sleep(0.01)


def wait_for_rows(job: Path, at_least: int, deadline_s: float = 30) -> None:
    """Poll the checkpoint (a reader beside the WAL writer) until it holds enough rows."""
    deadline = time.monotonic() + deadline_s
    while checkpoint_rows(job) < at_least:
        assert time.monotonic() < deadline, f"checkpoint never reached {at_least} rows"
        time.sleep(0.01)
