"""What observability costs: Create at 16 at once and no-op tasks end to end (Create to
COMPLETED seen by a watcher), against a conveyord with each configuration of CONFIGURATIONS,
as ratios to the first (everything off), in the same run: every server runs at once, and
they are measured in turns, eight times each, the medians counting (a server started
afresh for each measurement moved the ratios by 0.1 between runs; turns hold them to about
0.03). A configuration is a name and the flags it adds to the server's; one more is
one more line."""

from __future__ import annotations

import contextlib
import statistics
from typing import Any

import grpc

from bench.end_to_end import throughput
from bench.harness import Load, closed_loop, conveyord, quiet_conveyord, ratio
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


async def run(quick: bool) -> dict[str, Any]:
    creates, tasks, rounds = (1000, 1000, 2) if quick else (3000, 3000, 8)
    loads: dict[str, list[Load]] = {name: [] for name, _ in CONFIGURATIONS}
    rates: dict[str, list[float]] = {name: [] for name, _ in CONFIGURATIONS}
    async with contextlib.AsyncExitStack() as stack:
        stubs = {}
        for name, flags in CONFIGURATIONS:  # every server up at once, on the servers' core
            server_of = quiet_conveyord if flags[:2] == QUIET else conveyord
            server = await stack.enter_async_context(server_of(*SERVER_FLAGS, *flags))
            channel = grpc.aio.insecure_channel(server.address)
            stubs[name] = TaskServiceStub(await stack.enter_async_context(channel))
            await throughput(stubs[name], 1000)  # warm-up
        for _ in range(rounds):  # one server after another: the host's drift hits all
            for name, stub in stubs.items():
                create = create_call(stub, creates)
                loads[name].append(await closed_loop(create, concurrency=16, calls=creates))
                rates[name].append(await throughput(stub, tasks))
    baseline = CONFIGURATIONS[0][0]
    results: dict[str, Any] = {}
    for name, _ in CONFIGURATIONS:
        results[name] = {
            "create_per_second": statistics.median(load.rate for load in loads[name]),
            "create_p50": statistics.median(load.percentile(0.5) for load in loads[name]),
            "tasks_per_second": statistics.median(rates[name]),
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
