"""The Python API as a user calls it (#12 item 2): batchrun.run / arun / Job, against the simulator."""

from __future__ import annotations

import _thread
import asyncio
import contextlib
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml

import batchrun
from batchrun.simulator import RunningSimulator, SimulatorConfig, serve_in_thread

from .conftest import TEST_KEY, TEST_KEY_ENV, article_rows

PROMPT = "Summarize: {text}"


def rows_in(checkpoint: Path) -> int:
    if not checkpoint.exists():
        return 0
    try:
        with sqlite3.connect(checkpoint, timeout=5) as db:
            return int(db.execute("SELECT COUNT(*) FROM results").fetchone()[0])
    except sqlite3.OperationalError:
        return 0


class InterruptOnAnswer:
    """The caller's own http client (`http_client=`) to the simulator, which interrupts the main
    thread (KeyboardInterrupt, as Jupyter's "interrupt kernel" does) once `at` answers have come,
    and from then on holds every request before it is sent: the run cannot end with a row left
    unsent unless it has seen the interrupt, stopped, and cancelled them at the end of its grace
    period. Its hooks never assert: they act, and signal (`sent`); the main thread decides. A
    held request goes on after HOLD_S, so that a lost interrupt fails the test instead of
    hanging it."""

    HOLD_S = 60.0

    def __init__(self, at: int) -> None:
        self.at = at
        self.answers = 0
        self.sent = threading.Event()
        self._until = 0.0

    def client(self) -> Any:
        import httpx2

        hooks: dict[str, list[Any]] = {"request": [self._hold], "response": [self._count]}
        # No connection kept open: batchrun leaves the caller's client open, and run()'s loop closes.
        return httpx2.AsyncClient(event_hooks=hooks, limits=httpx2.Limits(max_keepalive_connections=0))

    async def _count(self, response: Any) -> None:
        self.answers += 1
        if self.answers == self.at:
            self._until = time.monotonic() + self.HOLD_S
            self.sent.set()
            _thread.interrupt_main()

    async def _hold(self, request: Any) -> None:
        if self.sent.is_set():
            with contextlib.suppress(TimeoutError):  # never set: only a cancellation ends it early
                await asyncio.wait_for(asyncio.Event().wait(), self._until - time.monotonic())


@contextlib.contextmanager
def sigint_raises() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt meanwhile, as in a kernel or a terminal. A Python started in
    the background by a shell without job control (`cmd &` in a script) ignores SIGINT, and
    interrupt_main() then does nothing at all."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def endpoint(sim: RunningSimulator) -> dict[str, Any]:
    return {"base_url": sim.base_url, "api_key_env": TEST_KEY_ENV}


def test_run_returns_one_row_per_input_row_and_a_rerun_resumes(tmp_path: Path) -> None:
    df = pl.DataFrame(article_rows(12))
    checkpoint = tmp_path / "runs" / "summaries.sqlite"
    with serve_in_thread(SimulatorConfig(api_key=TEST_KEY)) as sim:
        out = batchrun.run(
            df, model="grok-4.3", prompt=PROMPT, params={"max_tokens": 60}, endpoint=endpoint(sim),
            checkpoint=checkpoint, quiet=True,
        )  # fmt: skip
        sent = sim.stats.requests
        again = batchrun.run(
            df, model="grok-4.3", prompt=PROMPT, params={"max_tokens": 60}, endpoint=endpoint(sim),
            checkpoint=checkpoint, quiet=True,
        )  # fmt: skip
        assert sim.stats.requests == sent == 12  # the rerun sent nothing: it resumed a finished job

    assert isinstance(out, pl.DataFrame)
    assert out.height == df.height
    assert out.select(df.columns).equals(df)  # the rows given, with the results beside them
    assert set(out["status"]) == {"ok"}
    assert out["content"].null_count() == 0
    assert again.equals(out)


def test_simulate_and_every_kind_of_input(tmp_path: Path) -> None:
    df = pl.DataFrame(article_rows(5))
    csv = tmp_path / "articles.csv"
    df.write_csv(csv)
    inputs: list[Any] = [df, df.lazy(), csv, str(csv), df.to_arrow(), df.to_pandas()]
    for n, data in enumerate(inputs):
        out = batchrun.run(
            data, model="grok-4.3", prompt={"user": PROMPT}, simulate=True, quiet=True,
            checkpoint=tmp_path / f"run{n}.sqlite",
        )  # fmt: skip
        same = type(data) if type(data).__module__.split(".")[0] in ("pandas", "pyarrow") else pl.DataFrame
        assert type(out) is same, type(data)
        table = pl.DataFrame(out)
        assert table.height == 5, type(data)
        assert set(table["status"]) == {"ok"}, type(data)


def test_output_is_written_and_the_checkpoint_goes_beside_it(tmp_path: Path) -> None:
    df = pl.DataFrame(article_rows(3))
    out = batchrun.run(
        df, model="grok-4.3", prompt=PROMPT, simulate=True, quiet=True,
        output=tmp_path / "out" / "summaries.parquet",
    )  # fmt: skip
    written = pl.read_parquet(tmp_path / "out" / "summaries.parquet")
    assert written["id"].to_list() == df["id"].to_list()  # the input's own id names its rows
    assert written.drop("id").equals(out.drop(df.columns))
    assert (tmp_path / "out" / "summaries.parquet.checkpoint.sqlite").exists()


def test_without_checkpoint_or_output_a_note_says_where_the_checkpoint_is(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = batchrun.run(pl.DataFrame(article_rows(2)), model="grok-4.3", prompt=PROMPT, simulate=True)
    assert out.height == 2
    note = [line for line in capsys.readouterr().err.splitlines() if "no checkpoint= given" in line]
    assert len(note) == 1
    assert Path(note[0].split("checkpointing in ")[1].split(" (")[0]).exists()


def test_a_job_built_in_python_is_refused_like_the_same_yaml(tmp_path: Path) -> None:
    keys = {"model": "grok-4.3", "prompt": {"user": PROMPT}, "params": {"temprature": 1}}
    job_file = tmp_path / "job.yaml"
    job_file.write_text(
        yaml.safe_dump({"input": {"path": "in.csv"}, "output": {"path": "out.parquet"}, **keys})
    )
    with pytest.raises(batchrun.JobError) as from_yaml:
        batchrun.Job.from_yaml(job_file)
    with pytest.raises(batchrun.JobError) as from_python:
        batchrun.run(tmp_path / "in.csv", output=tmp_path / "out.parquet", **keys)

    assert from_python.value.message == from_yaml.value.message
    assert from_python.value.message == "unknown key 'temprature' in params; did you mean 'temperature'?"
    assert from_python.value.key == from_yaml.value.key == "params.temprature"
    line = 1 + next(n for n, text in enumerate(job_file.read_text().splitlines()) if "temprature" in text)
    assert (from_yaml.value.path, from_yaml.value.line) == (job_file, line)
    assert str(from_yaml.value) == f"{job_file}:{line}: {from_yaml.value.message}"
    assert str(from_python.value) == f"<python>: {from_python.value.message}"


def test_run_works_inside_a_running_event_loop(tmp_path: Path) -> None:
    """A Jupyter cell runs in an event loop: run() must not call asyncio.run() on it."""
    df = pl.DataFrame(article_rows(4))

    async def cell() -> tuple[pl.DataFrame, pl.DataFrame]:
        blocking = batchrun.run(df, model="grok-4.3", prompt=PROMPT, simulate=True, quiet=True,
                                checkpoint=tmp_path / "a.sqlite")  # fmt: skip
        awaited = await batchrun.arun(df, model="grok-4.3", prompt=PROMPT, simulate=True, quiet=True,
                                      checkpoint=tmp_path / "b.sqlite")  # fmt: skip
        return blocking, awaited

    blocking, awaited = asyncio.run(cell())
    assert blocking.height == awaited.height == 4
    assert set(blocking["status"]) == set(awaited["status"]) == {"ok"}


def test_job_from_yaml_runs_estimates_and_reports_status(tmp_path: Path) -> None:
    pl.DataFrame(article_rows(6)).write_csv(tmp_path / "in.csv")
    job_file = tmp_path / "job.yaml"
    job_file.write_text(
        yaml.safe_dump(
            {"input": {"path": "in.csv", "id_column": "id"}, "output": {"path": "out/result.parquet"},
             "model": "grok-4.3", "prompt": {"user": PROMPT}, "params": {"max_tokens": 50}}
        )
    )  # fmt: skip
    job = batchrun.Job.from_yaml(job_file)
    status = job.status()
    assert (status.ok, status.failed, status.skipped, status.pending, status.total) == (0, 0, 0, 6, 6)
    assert job.estimate().to_do == 6

    result = job.run(simulate=True, quiet=True)

    assert isinstance(result, batchrun.RunResult)
    assert (result.ok, result.failed, result.pending, result.outcome) == (6, 0, 0, "finished")
    assert result.requests == 6 and result.run_tokens
    assert result.table is not None and result.table.height == 6
    status = job.status()
    assert (status.ok, status.failed, status.skipped, status.pending, status.total) == (6, 0, 0, 0, 6)
    assert job.estimate().to_do == 0


def slow_rows(n: int) -> pl.DataFrame:
    return pl.DataFrame([{**row, "text": row["text"] + " [[sleep:300]]"} for row in article_rows(n)])


def test_cancelling_arun_stops_like_the_first_ctrl_c(tmp_path: Path) -> None:
    df = slow_rows(200)
    checkpoint = tmp_path / "run.sqlite"

    async def notebook() -> None:
        task = asyncio.create_task(
            batchrun.arun(df, model="grok-4.3", prompt=PROMPT, endpoint=endpoint(sim), concurrency=4,
                          checkpoint=checkpoint, quiet=True)
        )  # fmt: skip
        while rows_in(checkpoint) < 8:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with serve_in_thread(SimulatorConfig(api_key=TEST_KEY)) as sim:
        asyncio.run(notebook())
        answered = len(sim.stats.ok_by_user_message)
        out = pl.read_parquet(checkpoint.with_name(checkpoint.name + ".output.parquet"))

        assert out.height == 200
        assert set(out["status"]) == {"ok", "pending"}
        done = out.filter(pl.col("status") == "ok").height
        assert done == answered < 200  # every answered row was kept, in flight ones included
        assert rows_in(checkpoint) == done

        rest = batchrun.run(df, model="grok-4.3", prompt=PROMPT, endpoint=endpoint(sim), concurrency=64,
                            checkpoint=checkpoint, quiet=True)  # fmt: skip
        assert set(rest["status"]) == {"ok"}
        assert sim.stats.requests == 200  # the rerun sent only the rows not done


@pytest.mark.parametrize("at", [1, 40], ids=["at-the-first-answer", "at-the-last-answer"])
def test_keyboard_interrupt_during_run_stops_like_the_first_ctrl_c(tmp_path: Path, at: int) -> None:
    """Whenever it comes (as the run starts, or as its last row is answered, when the run may be
    over already), an interrupt is raised once the run has written what it has: never lost."""
    df = pl.DataFrame(article_rows(40))
    checkpoint = tmp_path / "run.sqlite"
    interrupt = InterruptOnAnswer(at)

    with serve_in_thread(SimulatorConfig(api_key=TEST_KEY)) as sim, sigint_raises():
        interrupted = False
        try:
            batchrun.run(df, model="grok-4.3", prompt=PROMPT, endpoint=endpoint(sim), concurrency=4,
                         grace_s=5, http_client=interrupt.client(), checkpoint=checkpoint,
                         quiet=True)  # fmt: skip
        except KeyboardInterrupt:
            interrupted = True
        answered = len(sim.stats.ok_by_user_message)

    assert interrupt.sent.is_set()
    assert interrupted, "an interrupt was sent but batchrun.run did not raise KeyboardInterrupt"
    out = pl.read_parquet(checkpoint.with_name(checkpoint.name + ".output.parquet"))
    done = out.filter(pl.col("status") == "ok").height
    assert done == answered == rows_in(checkpoint)  # every answered row was kept
    assert at <= done <= 40
    if at < 40:
        assert done < 40, "rows were sent after the interrupt"


def test_all_is_exactly_the_public_names_sorted() -> None:
    assert batchrun.__all__ == sorted(batchrun.__all__)
    assert batchrun.__all__ == [
        "BatchrunError",
        "CheckpointError",
        "EndpointUnavailable",
        "InputError",
        "Job",
        "JobAborted",
        "JobChanged",
        "JobError",
        "RequestFailed",
        "RunResult",
        "__version__",
        "arun",
        "cost_table",
        "draw_report",
        "run",
    ]
    for name in batchrun.__all__:
        assert getattr(batchrun, name) is not None
    public = {
        n for n, v in vars(batchrun).items() if not n.startswith("_") and not isinstance(v, type(batchrun))
    }
    assert public - {"TYPE_CHECKING", "Any"} <= set(batchrun.__all__)
    assert batchrun.__version__[0].isdigit()


def test_a_client_of_your_own_carries_every_request(tmp_path: Path) -> None:
    """`http_client=`: the caller's httpx2 client (here with a MockTransport, as in a user's own
    tests) sends every chat request, on `arun` and on `run`."""
    import json

    import httpx2

    seen: list[str] = []

    def answer(request: httpx2.Request) -> httpx2.Response:
        seen.append(request.headers["authorization"])
        body = {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": "grok-4.3",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
        }
        return httpx2.Response(200, content=json.dumps(body).encode())

    keys: dict[str, Any] = {
        "model": "grok-4.3",
        "prompt": "{title}",
        "endpoint": {"api_key_env": TEST_KEY_ENV},
        "quiet": True,
    }
    df = pl.DataFrame(article_rows(4))
    out = asyncio.run(
        batchrun.arun(
            df,
            checkpoint=tmp_path / "a.sqlite",
            http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(answer)),
            **keys,
        )
    )
    again = batchrun.run(
        df,
        checkpoint=tmp_path / "b.sqlite",
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(answer)),
        **keys,
    )

    assert out["content"].to_list() == ["ok"] * 4
    assert again["status"].to_list() == ["ok"] * 4
    assert seen == [f"Bearer {TEST_KEY}"] * 8
