"""Every option of conveyord, and every setting of `conveyor` and `conveyor-worker`, has an
environment variable (as a container or a systemd unit sets them), its help names it, setting
it changes the option, and the README's production section lists it."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from conveyor import _worker_command
from conveyor import cli as conveyor_cli
from conveyord import cli as conveyord_cli

ROOT = Path(__file__).resolve().parent.parent
ENV = re.compile(r"\[env ([A-Z_]+)")
# Values to try on an option's variable until one parses to something other than the
# default: a switch takes 1, a number 1 or 7, a TYPE=N pair a=2, a name anything.
SAMPLES = ("1", "7", "0.5", "a=2", "ERROR", "json", "127.0.0.1:9464")
Parser = Callable[[], argparse.ArgumentParser]
PARSERS: dict[str, Parser] = {
    "conveyord": conveyord_cli.build_parser,
    "conveyor": conveyor_cli.build_parser,
    "conveyor-worker": _worker_command.build_parser,
}
ARGV = {"conveyor": ["worker"]}  # the least a command line can be
WORKER_OPTIONS = ("--handlers", "--no-handler-entry-points", "--concurrency", "--worker-id")


def settings(command: str) -> list[argparse.Action]:
    """A command's settings: the options of its top level, and of `conveyor worker`, a
    service (the options of `conveyor create` and the like are arguments of one call)."""
    parser = PARSERS[command]()
    actions = list(parser._actions)
    if command == "conveyor":
        commands = next(a for a in actions if isinstance(a, argparse._SubParsersAction))
        worker = commands.choices["worker"]._actions
        actions += [a for a in worker if set(a.option_strings) & set(WORKER_OPTIONS)]
    return [a for a in actions if a.option_strings and a.dest not in ("help", "version")]


def option(command: str, flag: str) -> argparse.Action:
    return next(a for a in settings(command) if flag in a.option_strings)


def variable(action: argparse.Action) -> str:
    found = ENV.search(action.help or "")
    assert found, f"{action.option_strings[0]} names no environment variable in its help"
    return found.group(1)


def production_section() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("\n## In production")
    end = readme.find("\n## ", start + 1)
    return readme[start:end]


def cases(*commands: str) -> list[tuple[str, str]]:
    return [(c, a.option_strings[0]) for c in commands for a in settings(c)]


@pytest.mark.parametrize(("command", "flag"), cases(*PARSERS))
def test_every_option_names_its_environment_variable(command: str, flag: str) -> None:
    action = option(command, flag)
    name = variable(action)
    assert name.startswith("CONVEYORD_" if command == "conveyord" else "CONVEYOR_")


@pytest.mark.parametrize(("command", "flag"), cases(*PARSERS))
def test_the_readme_lists_every_environment_variable(command: str, flag: str) -> None:
    action = option(command, flag)
    assert f"`{variable(action)}`" in production_section()


# The connection settings of `conveyor` and `conveyor-worker` (--server, --token, --tls...)
# are read by the client library when a call is made, not by the parser: tests/test_cli.py
# and tests/test_tls.py set them. The rest are read by the parser, as conveyord's are.
READ_BY_THE_PARSER = [
    *cases("conveyord"),
    ("conveyor", "--json"),
    ("conveyor", "--rpc-timeout"),
    *[(command, flag) for command in ("conveyor", "conveyor-worker") for flag in WORKER_OPTIONS],
]


@pytest.mark.parametrize(("command", "flag"), READ_BY_THE_PARSER)
def test_each_environment_variable_sets_its_option(
    command: str, flag: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, dest = variable(option(command, flag)), option(command, flag).dest
    argv = ARGV.get(command, [])
    monkeypatch.delenv(name, raising=False)
    default = getattr(PARSERS[command]().parse_args(argv), dest)
    for sample in SAMPLES:
        monkeypatch.setenv(name, sample)
        try:
            parsed = PARSERS[command]().parse_args(argv)
        except SystemExit:  # not a value this option takes
            continue
        if getattr(parsed, dest) != default:
            return
    pytest.fail(f"{name} does not change {flag} (from {default!r})")
