"""The offline OpenAI-compatible endpoint; only the drivers (`--simulate`, `batchrun simulate`)
and tests start it.

`endpoint` answers chat completions and injects faults; `httpserver` is its HTTP/1.1 layer.
"""

from batchrun.simulator.endpoint import (
    RunningSimulator,
    SimulatorConfig,
    compose_answer,
    count_tokens,
    latencies,
    serve_forever,
    serve_in_thread,
)

__all__ = [
    "RunningSimulator",
    "SimulatorConfig",
    "compose_answer",
    "count_tokens",
    "latencies",
    "serve_forever",
    "serve_in_thread",
]
