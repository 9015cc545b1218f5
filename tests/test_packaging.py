"""A client-only install, as a team that only calls conveyor would make it: a fresh virtual
environment with the `conveyor` wheel at the lowest grpcio and protobuf that pyproject.toml
allows (binary wheels only), and a handlers package that declares its module by entry point.

It has none of the server's or the terminal's packages, and it works against a real
conveyord (run from this environment): a task created and watched to its end, a worker
(`conveyor-worker`) that finds its handlers by entry point. Needs PyPI, or pip's cache.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.version import Version

from conveyor import Client, TaskStatus
from tests.processes import Conveyord

ROOT = Path(__file__).resolve().parent.parent
# What rich brings with it (the terminal's packages beyond the `cli` extra's own).
RICH_DEPENDENCIES = frozenset({"pygments", "markdown-it-py", "mdurl"})
INSTALL_TIMEOUT = 600  # seconds: the wheels come from PyPI when pip's cache has none

pytestmark = pytest.mark.timeout(INSTALL_TIMEOUT)

HANDLERS_PROJECT = {
    "pyproject.toml": """
        [build-system]
        requires = ["setuptools==80.9.0"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "lean-handlers"
        version = "1.0"
        dependencies = ["conveyor"]

        [project.entry-points."conveyor.handlers"]
        lean = "lean_handlers"

        [tool.setuptools]
        py-modules = ["lean_handlers"]
    """,
    "lean_handlers.py": """
        import os
        from conveyor import TaskContext, handler

        @handler("lean.double")
        def double(ctx: TaskContext) -> dict[str, int]:
            return {"double": 2 * ctx.parameters["n"], "pid": os.getpid()}
    """,
}

# Runs in the fresh environment: create a task, watch it to its end, one JSON line per state.
CLIENT_SCRIPT = """
import json, sys
from conveyor import Client

with Client(sys.argv[1]) as client:
    task = client.create("sleep", {"seconds": 0.2, "steps": 2})
    for state in client.watch(task.task_id, timeout=30):
        print(json.dumps({"status": state.status.name, "progress": state.progress}), flush=True)
"""


@dataclass(frozen=True)
class LeanInstall:
    """The fresh environment: its python, its scripts' folder, and the versions it got."""

    python: Path
    bin: Path
    versions: dict[str, str]


def server_and_terminal() -> frozenset[str]:
    """What a client-only install must not bring: the server, its packages and the command
    line's, as the two pyproject.toml files name them (but for the client's own)."""
    client = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    server = tomllib.loads((ROOT / "service" / "pyproject.toml").read_text())["project"]
    named = [*server["dependencies"], *client["optional-dependencies"]["cli"]]
    kept = {_name(spec) for spec in client["dependencies"]} | {"conveyor"}
    return frozenset({_name(spec) for spec in named} - kept | {"conveyord"} | RICH_DEPENDENCIES)


def _name(spec: str) -> str:
    """A requirement's distribution name, normalized as pip lists it (lower case, dashes)."""
    match = re.match(r"[A-Za-z0-9_.-]+", spec)
    assert match, spec
    return normalized(match.group(0))


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lowest_requirements() -> dict[str, str]:
    """Each dependency of the client at the floor of its range in pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floors = {}
    for spec in project["dependencies"]:
        match = re.match(r"([A-Za-z0-9_.-]+)>=([^,;\s]+)", spec)
        assert match, f"a dependency without a floor: {spec}"
        floors[match.group(1).lower()] = match.group(2)
    return floors


def run(*command: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command to its end; it must succeed."""
    result = subprocess.run([str(p) for p in command], capture_output=True, text=True, cwd=cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def lean(tmp_path_factory: pytest.TempPathFactory) -> LeanInstall:
    """Build the client's wheel and the handlers package's, install them in a new venv."""
    work = tmp_path_factory.mktemp("lean")
    project = work / "lean-handlers"
    project.mkdir()
    for name, text in HANDLERS_PROJECT.items():
        (project / name).write_text(textwrap.dedent(text))
    wheels = work / "wheels"
    quiet = ("--quiet", "--disable-pip-version-check")
    run(sys.executable, "-m", "pip", "wheel", *quiet, "--no-deps", "-w", wheels, ROOT, project)
    venv = work / "venv"
    run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    lowest = [f"{name}=={version}" for name, version in lowest_requirements().items()]
    run(
        python, "-m", "pip", "install", *quiet, "--only-binary", ":all:",
        *sorted(wheels.glob("*.whl")), *lowest,
    )  # fmt: skip
    listed = run(python, "-m", "pip", "list", "--format", "json").stdout
    versions = {normalized(item["name"]): item["version"] for item in json.loads(listed)}
    return LeanInstall(python, venv / "bin", versions)


@pytest.fixture
def server(conveyord: Callable[..., Conveyord]) -> Conveyord:
    """A real conveyord of this environment, which knows the lean worker's task type."""
    return conveyord("--task-type", "lean.double")


def test_a_client_only_install_has_no_server_or_terminal_packages(lean: LeanInstall) -> None:
    assert "conveyor" in lean.versions
    assert not server_and_terminal() & lean.versions.keys()


def test_the_client_is_installed_at_the_lowest_grpcio_and_protobuf(lean: LeanInstall) -> None:
    lowest = lowest_requirements()
    assert {"grpcio", "protobuf"} <= lowest.keys()
    for name, floor in lowest.items():
        assert Version(lean.versions[name]) == Version(floor), name


def test_the_contract_s_proto_files_ship_with_the_client(lean: LeanInstall) -> None:
    read = "import sys, importlib.resources as r; print(r.read_text('conveyor.v1', sys.argv[1]))"
    for proto in sorted((ROOT / "protos" / "conveyor" / "v1").glob("*.proto")):
        shipped = run(lean.python, "-c", read, proto.name, cwd=Path("/")).stdout.removesuffix("\n")
        assert shipped == proto.read_text()


def test_at_the_lowest_versions_a_client_creates_a_task_and_watches_it_to_its_end(
    lean: LeanInstall, server: Conveyord, tmp_path: Path
) -> None:
    script = tmp_path / "client.py"
    script.write_text(CLIENT_SCRIPT)
    output = run(lean.python, script, server.address, cwd=tmp_path).stdout
    states = [json.loads(line) for line in output.splitlines()]
    assert states[-1] == {"status": "COMPLETED", "progress": 1.0}
    assert any(state["status"] == "RUNNING" for state in states)


def test_a_lean_worker_runs_the_handlers_its_installed_package_declares(
    lean: LeanInstall, server: Conveyord, tmp_path: Path
) -> None:
    worker = subprocess.Popen(
        [lean.bin / "conveyor-worker", "--server", server.address, "--concurrency", "2"],
        cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        with Client(server.address) as client:
            task = client.create("lean.double", {"n": 21})
            done = client.wait(task.task_id, timeout=30)
        assert done.status == TaskStatus.COMPLETED
        assert done.result == {"double": 42, "pid": worker.pid}
    finally:
        worker.send_signal(signal.SIGTERM)
        _, log = worker.communicate(timeout=30)
    assert worker.returncode == 0, log
    assert "lean.double from lean_handlers" in log


def test_without_its_extra_the_command_line_says_what_to_install(lean: LeanInstall) -> None:
    result = subprocess.run([lean.bin / "conveyor", "list"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "pip install 'conveyor[cli]'" in result.stderr
    version = run(lean.bin / "conveyor-worker", "--version").stdout
    lowest = lowest_requirements()
    assert f"grpcio {lean.versions['grpcio']}, protobuf {lean.versions['protobuf']}" in version
    assert lean.versions["grpcio"].startswith(lowest["grpcio"])
