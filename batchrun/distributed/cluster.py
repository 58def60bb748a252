"""Joining a Ray cluster, or starting a local one, with the checks `ray.init` does not make.

`ray.init(address=...)` on an address where nothing listens was seen to hang for over a minute,
so the address is first checked with a plain TCP connection; and a cluster whose nodes run
another batchrun than the driver would run another core, so it is refused.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import socket
from collections.abc import Iterator
from typing import Any

from batchrun.errors import BatchrunError

AUTH_MODE_VARIABLE = "RAY_AUTH_MODE"  # "token": this driver sends the cluster's token
CONNECT_TIMEOUT_S = 5.0  # the TCP check of --ray ADDRESS; the whole refusal stays well under 30 s
RAY_CLIENT_PORT = 10001  # ray://HOST without a port
GCS_PORT = 6379  # HOST without a port: the head node's GCS
LOG_TO_STDERR = "RAY_LOG_TO_STDERR"  # "1": a local Ray's processes log to the stderr they inherit


class RayNotInstalled(BatchrunError):
    """Ray asked for without the batchrun[ray] extra."""


def import_ray() -> Any:
    """The `ray` module, or one line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise RayNotInstalled(
            "running on Ray needs Ray, which the base install leaves out: pip install 'batchrun[ray]'"
        ) from None
    return ray


def host_and_port(address: str) -> tuple[str, int]:
    """Where `address` (HOST[:PORT] or ray://HOST[:PORT]) should answer."""
    client = address.startswith("ray://")
    rest = address.removeprefix("ray://").rstrip("/")
    host, colon, port = rest.rpartition(":")
    if not colon or not port.isdigit():
        host, port = rest, str(RAY_CLIENT_PORT if client else GCS_PORT)
    return host.strip("[]"), int(port)


def check_address(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Refuse, in at most `timeout_s`, an address where nothing accepts a TCP connection."""
    host, port = host_and_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise BatchrunError(
            f"no Ray cluster answers at {address} ({host}:{port}: {reason}); start one with "
            "`ray start --head`, or leave out the address to run on a local Ray"
        ) from None


def batchrun_version() -> str:
    return importlib.metadata.version("batchrun")


def connect(address: str | None, *, debug: bool = False, **init: Any) -> Any:
    """Join the cluster at `address` (checked first), or start a local Ray without one; an already
    connected Ray (a notebook's, a test's) is used as it is. Returns the `ray` module.

    Ray's own log lines (its INFO lines, the raylet's `worker_pool.cc: Started worker process`,
    the workers' output) stay in Ray's log files, off the terminal where the progress is drawn,
    unless `debug`."""
    ray = import_ray()
    if not ray.is_initialized():
        if address is not None and address not in ("auto", "local"):
            check_address(address)
        try:
            with _logs_to_files(debug):
                ray.init(
                    address=address,
                    include_dashboard=False,
                    log_to_driver=debug,
                    logging_level=logging.INFO if debug else logging.WARNING,
                    **init,
                )
        except ConnectionError as exc:  # Ray's own, after its retries (about 20 s)
            raise BatchrunError(f"cannot join the Ray cluster at {address}: {_why(exc)}") from None
    check_versions(ray)
    return ray


@contextlib.contextmanager
def _logs_to_files(debug: bool) -> Iterator[None]:
    """Without `debug`, the processes of a local Ray started here write their logs to its session
    folder even where RAY_LOG_TO_STDERR=1 would send them to this process's stderr."""
    given = os.environ.get(LOG_TO_STDERR)
    if not debug:
        os.environ.pop(LOG_TO_STDERR, None)
    try:
        yield
    finally:
        if given is not None:
            os.environ[LOG_TO_STDERR] = given


def _why(exc: ConnectionError) -> str:
    """Ray says only that it failed; the likely cause of a cluster that answers but refuses is
    its token authentication, which Ray never turns on for an explicit address by itself."""
    if os.environ.get(AUTH_MODE_VARIABLE, "").lower() == "token":
        return str(exc).splitlines()[0]
    return (
        f"if it uses token authentication, set {AUTH_MODE_VARIABLE}=token "
        "and give this machine the cluster's token (~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or "
        "RAY_AUTH_TOKEN)"
    )


def check_versions(ray: Any, ours: str | None = None) -> None:
    """Refuse a cluster whose workers import another batchrun than this driver (`ours`)."""
    remote_version = ray.remote(num_cpus=0, max_retries=0)(batchrun_version)
    theirs = ray.get(remote_version.remote())
    ours = ours or batchrun_version()
    if theirs != ours:
        raise BatchrunError(
            f"the Ray cluster runs batchrun {theirs}, this driver batchrun {ours}: install the same "
            "version on both (e.g. through the job's runtime_env or the nodes' image)"
        )
