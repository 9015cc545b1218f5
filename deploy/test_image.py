"""The container image, built as `make image` builds it (deploy/build-image.sh, podman), then
checked without a container runtime, which cannot start containers on every build machine:
its configuration from `podman image inspect`, and its programs run from its own file system
(`podman image mount`, then chroot as the image's user, with the image's environment).

`make test-image` runs this (CI does, after `make test`): it needs root, podman and
debootstrap, and a few minutes the first time (the base root file system is cached).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conveyor import Client, Task, TaskStatus
from tests.processes import ROOT, Conveyord

IMAGE = f"localhost/conveyor:test-{os.getpid()}"
USER = "10001:10001"  # deploy/Containerfile's USER
STATE = "/var/lib/conveyor"
MAX_SIZE = 250_000_000  # bytes: a Debian base with Python (120 MB), and the packages

pytestmark = pytest.mark.timeout(900)


def run(*command: str | Path) -> str:
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    started = time.monotonic()
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(
        [ROOT / "deploy" / "build-image.sh", IMAGE], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    print(f"{IMAGE} built in {time.monotonic() - started:.0f} s", file=sys.stderr)
    yield IMAGE
    subprocess.run(["podman", "rmi", IMAGE], capture_output=True)


@pytest.fixture(scope="module")
def config(image: str) -> dict[str, object]:
    inspected: list[dict[str, object]] = json.loads(run("podman", "image", "inspect", image))
    return inspected[0]


@pytest.fixture(scope="module")
def root_fs(image: str) -> Iterator[Path]:
    mounted = Path(run("podman", "image", "mount", image).strip())
    yield mounted
    run("podman", "image", "unmount", image)


def in_image(root_fs: Path, config: dict[str, object], *command: str) -> list[str]:
    """`command` run from the image's files, as its user, with its environment only."""
    environment = config["Config"]["Env"]  # type: ignore[index]
    return [
        "chroot",
        f"--userspec={USER}",
        str(root_fs),
        "/usr/bin/env",
        "-i",
        *environment,
        *command,
    ]


def stopped(server: Conveyord) -> str:
    """Wait for a conveyord told to stop; its log."""
    log = server.rest_of_log()
    server.process.wait(timeout=30)
    assert server.process.stderr is not None
    server.process.stderr.close()
    return log


def test_the_image_runs_conveyord_as_an_unprivileged_user(config: dict[str, object]) -> None:
    settings = config["Config"]
    assert isinstance(settings, dict)
    assert settings["User"] == USER
    assert settings["Cmd"] == ["conveyord"]
    assert not settings.get("Entrypoint")
    assert "50051/tcp" in settings["ExposedPorts"]
    assert STATE in settings["Volumes"]
    assert "CONVEYORD_LISTEN=0.0.0.0:50051" in settings["Env"]
    assert f"CONVEYORD_STORE=sqlite:{STATE}/conveyor.db" in settings["Env"]
    assert isinstance(config["Size"], int) and config["Size"] < MAX_SIZE


def test_only_the_state_folder_belongs_to_the_image_s_user(root_fs: Path) -> None:
    uid = int(USER.partition(":")[0])
    assert (root_fs / STATE.lstrip("/")).stat().st_uid == uid
    installed = root_fs / "opt" / "conveyor"
    assert {path.stat().st_uid for path in installed.rglob("*")} == {0}  # read-only to it


def test_the_commands_of_the_image_tell_their_versions(
    root_fs: Path, config: dict[str, object]
) -> None:
    for command in ("conveyord", "conveyor-worker"):
        line = run(*in_image(root_fs, config, command, "--version"))
        assert line.startswith(f"{command} 0.1.0 (") and "Python 3.11" in line, line
    assert run(*in_image(root_fs, config, "conveyor", "--version")).startswith("conveyor 0.1.0")


def test_conveyord_from_the_image_serves_a_task(root_fs: Path, config: dict[str, object]) -> None:
    server = Conveyord(command=in_image(root_fs, config, "conveyord"))  # the memory store
    try:
        with Client(server.address) as client:
            task = client.create("sleep", {"seconds": 0.1, "steps": 2})
            done = client.wait(task.task_id, timeout=30)
        assert done.status == TaskStatus.COMPLETED
    finally:
        server.process.send_signal(signal.SIGTERM)
        log = stopped(server)
    assert server.process.returncode == 0, log


def run_by_worker(
    command: list[str], server: Conveyord, task_type: str, parameters: dict[str, object]
) -> tuple[Task, str]:
    """Run one task through a worker started by `command` (from an image) for a host
    server: the task once ended, and the worker's log. The worker must stop cleanly on
    SIGTERM."""
    worker = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        with Client(server.address) as client:
            task = client.create(task_type, parameters)
            done = client.wait(task.task_id, timeout=30)
    finally:
        worker.send_signal(signal.SIGTERM)
        _, log = worker.communicate(timeout=30)
        server.process.kill()
        stopped(server)
    assert worker.returncode == 0, log
    return done, log


def test_a_worker_from_the_image_runs_tasks(root_fs: Path, config: dict[str, object]) -> None:
    server = Conveyord("--no-builtin-handlers", "--task-type", "echo")
    command = ["conveyor-worker", "--server", server.address]
    command += ["--handlers", "conveyord.builtin_handlers"]
    done, _ = run_by_worker(in_image(root_fs, config, *command), server, "echo", {"from": "it"})
    assert (done.status, done.result) == (TaskStatus.COMPLETED, {"from": "it"})


HANDLERS_PROJECT = {
    "pyproject.toml": """[build-system]
requires = ["setuptools==80.9.0"]
build-backend = "setuptools.build_meta"

[project]
name = "image-handlers"
version = "1.0"

[project.entry-points."conveyor.handlers"]
image = "image_handlers"

[tool.setuptools]
py-modules = ["image_handlers"]
""",
    "image_handlers.py": """from conveyor import TaskContext, handler


@handler("image.shout")
def shout(ctx: TaskContext) -> str:
    return str(ctx.parameters["text"]).upper()
""",
}
DERIVED = """FROM {image}
USER root
COPY *.whl /tmp/
RUN python -m pip install --quiet --no-index --no-deps /tmp/*.whl && rm /tmp/*.whl
USER 10001:10001
"""


@pytest.fixture(scope="module")
def derived_fs(image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An image FROM the image that adds a handlers package, as the README says; mounted."""
    work = tmp_path_factory.mktemp("derived")
    project, context = work / "project", work / "context"
    project.mkdir()
    for name, text in HANDLERS_PROJECT.items():
        (project / name).write_text(text)
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", context, project)
    (context / "Containerfile").write_text(DERIVED.format(image=image))
    derived = f"{image}-derived"
    run("podman", "build", "--layers=false", "--isolation", "chroot", "-t", derived, context)
    yield Path(run("podman", "image", "mount", derived).strip())
    run("podman", "image", "unmount", derived)
    subprocess.run(["podman", "rmi", derived], capture_output=True)


def test_an_image_from_it_adds_handlers_that_its_worker_finds_by_entry_point(
    derived_fs: Path, config: dict[str, object]
) -> None:
    server = Conveyord("--task-type", "image.shout")
    command = in_image(derived_fs, config, "conveyor-worker", "--server", server.address)
    done, log = run_by_worker(command, server, "image.shout", {"text": "found"})
    assert (done.status, done.result) == (TaskStatus.COMPLETED, "FOUND")
    assert "image.shout from image_handlers" in log
