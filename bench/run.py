"""Run the benchmarks, print their tables, and write the figures to bench/results/latest.json.

python -m bench.run [--quick] [--only SECTION ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from bench import (
    batch,
    control,
    end_to_end,
    fanout,
    memory,
    observability,
    postgres_drivers,
    replicas,
    rpc,
    schedules,
    scheduling,
    security,
    store,
    tenants,
    workers,
)
from bench.harness import machine, pin_load_generator

RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"
SECTIONS = {
    "rpc": rpc,
    "end_to_end": end_to_end,
    "fanout": fanout,
    "batch": batch,
    "scheduling": scheduling,
    "store": store,
    "memory": memory,
    "workers": workers,
    "control": control,
    "schedules": schedules,
    "security": security,
    "tenants": tenants,
    "observability": observability,
    "postgres_drivers": postgres_drivers,
    "replicas": replicas,
}


def print_table(title: str, rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print(f"\n## {title}\n")
    for index, row in enumerate(rows):
        print(
            "| "
            + " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
            + " |"
        )
        if index == 0:
            print("|" + "|".join("-" * (width + 2) for width in widths) + "|")


async def main(quick: bool, only: list[str]) -> dict[str, Any]:
    figures: dict[str, Any] = {
        "machine": machine(),
        "when": time.strftime("%Y-%m-%d"),
        "quick": quick,
    }
    for name, section in SECTIONS.items():
        if only and name not in only:
            continue
        figures[name] = await section.run(quick)
        print_table(name, section.table(figures[name]))
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer calls: a smoke run, not figures"
    )
    parser.add_argument("--only", action="append", default=[], choices=sorted(SECTIONS))
    args = parser.parse_args()
    pin_load_generator()
    figures = asyncio.run(main(args.quick, args.only))
    print(f"\nmachine: {figures['machine']}")
    if not args.quick:
        if args.only and RESULTS.exists():  # the other sections keep their latest figures
            figures = {**json.loads(RESULTS.read_text()), **figures}
        RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"written to {RESULTS}")
