"""What observability costs: Create at 16 at once and no-op tasks end to end (Create to
COMPLETED seen by a watcher), against a conveyord with each configuration of CONFIGURATIONS,
as ratios to the first (everything off), in the same run (alternated, the best of each
counting). A configuration is a name and the flags it adds to the server's; one more is
one more line."""

from __future__ import annotations

from typing import Any

import grpc

from bench.end_to_end import throughput
from bench.harness import Load, best, closed_loop, conveyord, quiet_conveyord, ratio
from bench.rpc import PARKED, create_call
from conveyor.v1.task_service_pb2_grpc import TaskServiceStub

QUIET = ("--log-level", "warning")  # no line per task (read by quiet_conveyord)
METRICS = ("--metrics-address", "127.0.0.1:0")
CONFIGURATIONS: list[tuple[str, tuple[str, ...]]] = [
    ("off (log level warning, no metrics)", QUIET),
    ("metrics", (*QUIET, *METRICS)),
    ("task log lines, text (log level info: the default)", ("--log-level", "info")),
    ("task log lines, JSON", ("--log-level", "info", "--log-format", "json")),
    ("metrics and task log lines", ("--log-level", "info", *METRICS)),
]
# Tasks of type `parked` stay queued (Create alone is measured); `noop` ones run at once,
# and the watcher that counts them may fall behind in a burst without being let go.
SERVER_FLAGS = (*PARKED, "--concurrency", "32", "--watch-buffer", "1000000")


async def _measure(address: str, creates: int, tasks: int) -> tuple[Load, float]:
    """Create at 16 at once, then tasks/s end to end, on one server."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = TaskServiceStub(channel)
        create = create_call(stub, 200 + creates)
        await closed_loop(create, concurrency=16, calls=200)  # warm-up
        load = await closed_loop(create, concurrency=16, calls=creates)
        await throughput(stub, tasks // 10)  # warm-up
        return load, await throughput(stub, tasks)


async def run(quick: bool) -> dict[str, Any]:
    creates, tasks, rounds = (1500, 2000, 1) if quick else (10000, 20000, 3)
    loads: dict[str, list[Load]] = {name: [] for name, _ in CONFIGURATIONS}
    rates: dict[str, list[float]] = {name: [] for name, _ in CONFIGURATIONS}
    for _ in range(rounds):  # alternated, so that the host's drift hits all alike
        for name, flags in CONFIGURATIONS:
            server_of = quiet_conveyord if flags[:2] == QUIET else conveyord
            async with server_of(*SERVER_FLAGS, *flags) as server:
                load, rate = await _measure(server.address, creates, tasks)
            loads[name].append(load)
            rates[name].append(rate)
    baseline = CONFIGURATIONS[0][0]
    results: dict[str, Any] = {}
    for name, _ in CONFIGURATIONS:
        results[name] = {
            "create_per_second": best(loads[name]).rate,
            "create_p50": best(loads[name]).percentile(0.5),
            "tasks_per_second": max(rates[name]),
        }
    for figures in results.values():
        figures["create_ratio"] = (
            figures["create_per_second"] / (results[baseline]["create_per_second"])
        )
        figures["tasks_ratio"] = figures["tasks_per_second"] / results[baseline]["tasks_per_second"]
    return results


def table(results: dict[str, Any]) -> list[list[str]]:
    rows = [["configuration", "Create/s, 16 at once (ratio)", "tasks/s end to end (ratio)"]]
    for name, figures in results.items():
        rows.append(
            [
                name,
                f"{figures['create_per_second']:.0f} ({ratio(figures['create_ratio'])})",
                f"{figures['tasks_per_second']:.0f} ({ratio(figures['tasks_ratio'])})",
            ]
        )
    return rows
