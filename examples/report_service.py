"""A service that has conveyor build its reports: it creates the tasks, follows them, and
waits for their results, with the asyncio client.

Start a server (`make serve`), then run `.venv/bin/python examples/report_service.py`.
The request_id names the report, so running it again finds the same tasks instead of
building the reports twice; the client retries a Create whose answer was lost the same way.
"""

from __future__ import annotations

import asyncio
from typing import Any

import conveyor


async def build_report(client: conveyor.AsyncClient, customer: str, month: str) -> Any:
    """Have conveyor build one customer's report; returns what the task returned."""
    task = await client.create(
        "sleep",  # stands in for the real work: a handler registered on the server
        {"seconds": 1, "steps": 4},
        labels={"customer": customer, "month": month},
        request_id=f"report/{customer}/{month}",
        timeout_seconds=60,
    )
    async for state in client.watch(task.task_id, timeout=120):
        print(f"{customer}: {state.status_label:<9} {state.progress:4.0%}  {state.message}")
    return await client.result(task.task_id, timeout=10)  # it has ended: this returns at once


async def main() -> None:
    async with conveyor.AsyncClient() as client:  # $CONVEYOR_SERVER, else 127.0.0.1:50051
        customers = ["acme", "globex"]
        reports = await asyncio.gather(
            *(build_report(client, customer, "2026-11") for customer in customers),
            return_exceptions=True,
        )
        for customer, report in zip(customers, reports, strict=True):
            match report:
                case conveyor.TaskFailed(task=task) if task.error:
                    print(f"{customer}: failed ({task.error.code}): {task.error.message}")
                case conveyor.ConveyorError() as error:
                    print(f"{customer}: {type(error).__name__}: {error}")
                case _:
                    print(f"{customer}: report ready: {report}")


if __name__ == "__main__":
    asyncio.run(main())
