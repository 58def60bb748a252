"""The simulator of the CLI's `--simulate`, in a process of its own.

In the run's own process the simulator took the GIL from the client for every answer (~0.15 s
of the sample job's 0.8 s). In a child it answers on the other core, and it imports while the run
is still importing. It lives as long as its stdin is open: the run closes it when done, and a run
killed outright (kill -9 included) closes it by dying. It runs in a session of its own, so that a
terminal's Ctrl-C, which reaches the whole foreground process group, reaches the run alone: the
run still has its in-flight rows answered within the grace period.

The Python API keeps the simulator in a thread (`simulator.serve_in_thread`): a notebook's kernel
has no command line to start a child from.
"""

from __future__ import annotations

import subprocess
import sys
from types import TracebackType

from batchrun.errors import EndpointUnavailable


class SimulatorProcess:
    """A child process serving the simulator on 127.0.0.1 with `model` among its models."""

    def __init__(self, model: str, latency_ms: float) -> None:
        # -P: not the working folder first on the module path, where a user's own batchrun/ or
        # polars.py would be imported instead
        command = [sys.executable, "-P", "-m", __name__, model, repr(latency_ms)]
        self._process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True
        )
        self._base_url: str | None = None

    def base_url(self) -> str:
        """Where it listens, once it does (the first call waits for it)."""
        if self._base_url is None:
            assert self._process.stdout is not None
            line = self._process.stdout.readline().strip()
            if not line.startswith("http://"):
                why = line or f"exit status {self._process.wait()}"
                raise EndpointUnavailable(f"the simulator did not start: {why}")
            self._base_url = line
        return self._base_url

    def close(self) -> None:
        """End it (its stdin closes) and wait for it."""
        assert self._process.stdin is not None
        self._process.stdin.close()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        assert self._process.stdout is not None
        self._process.stdout.close()

    def __enter__(self) -> SimulatorProcess:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


def _serve(model: str, latency_ms: float) -> None:
    """The child: serve until stdin closes, then leave without tearing the interpreter down."""
    import asyncio
    import os

    from batchrun.loop import run_async
    from batchrun.simulator import SimulatorConfig, serve_forever

    config = SimulatorConfig(latency_ms=latency_ms, extra_models=(model,))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        closed = loop.run_in_executor(None, sys.stdin.read)  # returns when the run closes it
        serving = asyncio.ensure_future(
            serve_forever(config, "127.0.0.1", 0, lambda url: print(url, flush=True))
        )
        await asyncio.wait((closed, serving), return_when=asyncio.FIRST_COMPLETED)
        if serving.done():  # it could not start
            error = serving.exception()
            print(f"{type(error).__name__}: {error}", flush=True)
            return
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)

    run_async(main())
    os._exit(0)  # nothing is left to flush; the run waits for this exit


if __name__ == "__main__":
    _serve(sys.argv[1], float(sys.argv[2]))
