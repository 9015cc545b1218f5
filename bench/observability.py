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
from bench.harness import Load, closed_loop, conveyord, cpu_seconds, quiet_conveyord, ratio
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
    cpu: dict[str, list[float]] = {name: [] for name, _ in CONFIGURATIONS}  # s per task
    async with contextlib.AsyncExitStack() as stack:
        stubs, pids = {}, {}
        for name, flags in CONFIGURATIONS:  # every server up at once, on the servers' core
            server_of = quiet_conveyord if flags[:2] == QUIET else conveyord
            server = await stack.enter_async_context(server_of(*SERVER_FLAGS, *flags))
            channel = grpc.aio.insecure_channel(server.address)
            stubs[name] = TaskServiceStub(await stack.enter_async_context(channel))
            pids[name] = server.pid
            await throughput(stubs[name], 1000)  # warm-up
        for _ in range(rounds):  # one server after another: the host's drift hits all
            for name, stub in stubs.items():
                create = create_call(stub, creates)
                loads[name].append(await closed_loop(create, concurrency=16, calls=creates))
                used = cpu_seconds(pids[name])
                rates[name].append(await throughput(stub, tasks))
                cpu[name].append((cpu_seconds(pids[name]) - used) / tasks)
    baseline = CONFIGURATIONS[0][0]
    results: dict[str, Any] = {}
    for name, _ in CONFIGURATIONS:
        results[name] = {
            "create_per_second": statistics.median(load.rate for load in loads[name]),
            "create_p50": statistics.median(load.percentile(0.5) for load in loads[name]),
            "tasks_per_second": statistics.median(rates[name]),
            "cpu_per_task": statistics.median(cpu[name]),
        }
    for figures in results.values():
        figures["create_ratio"] = (
            figures["create_per_second"] / (results[baseline]["create_per_second"])
        )
        figures["tasks_ratio"] = figures["tasks_per_second"] / results[baseline]["tasks_per_second"]
        # What the server spent per task: steadier than a rate on a shared host.
        figures["cpu_ratio"] = results[baseline]["cpu_per_task"] / figures["cpu_per_task"]
    return results


def table(results: dict[str, Any]) -> list[list[str]]:
    rows = [
        [
            "configuration",
            "Create/s, 16 at once (ratio)",
            "tasks/s end to end (ratio)",
            "server CPU per task (ratio)",
        ]
    ]
    for name, figures in results.items():
        rows.append(
            [
                name,
                f"{figures['create_per_second']:.0f} ({ratio(figures['create_ratio'])})",
                f"{figures['tasks_per_second']:.0f} ({ratio(figures['tasks_ratio'])})",
                f"{figures['cpu_per_task'] * 1e6:.0f} µs ({ratio(figures['cpu_ratio'])})",
            ]
        )
    return rows
