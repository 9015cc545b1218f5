"""What `--version` prints: the installed distributions' versions, from their metadata."""

from __future__ import annotations

import argparse
import platform
from importlib import metadata
from typing import Any


def installed_version(distribution: str) -> str:
    """The version `distribution` was installed at; "unknown" when it is not installed (run
    from a source tree on sys.path)."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "unknown"


def version_line(command: str, distribution: str) -> str:
    """`conveyord 0.1.0 (conveyor 0.1.0, grpcio 1.85.1, protobuf 7.36.2, Python 3.11.7)`: the
    versions a bug report needs."""
    others = [name for name in ("conveyor", "grpcio", "protobuf") if name != distribution]
    details = [f"{name} {installed_version(name)}" for name in others]
    details.append(f"Python {platform.python_version()}")
    return f"{command} {installed_version(distribution)} ({', '.join(details)})"


def add_version_option(parser: argparse.ArgumentParser, command: str, distribution: str) -> None:
    """--version: print `version_line` whole (argparse's own action wraps it) and exit 0."""

    class PrintVersion(argparse.Action):
        def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
            print(version_line(command, distribution))
            parser.exit()

    parser.add_argument(
        "--version", nargs=0, action=PrintVersion, help="print the versions and exit"
    )
