"""Handler modules found by entry points: an installed distribution that declares its module
in the `conveyor.handlers` group is served by conveyord without --handlers.

The distribution here is real metadata (a `.dist-info` folder with entry_points.txt) on the
path, as pip leaves it; tests/test_packaging.py installs one with pip into a fresh venv.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from conveyor import Client, InvalidArgument, TaskStatus
from conveyor.handlers import entry_point_modules, handler_modules
from tests.processes import ROOT, Conveyord

HANDLERS = """
    from conveyor import TaskContext, handler

    @handler("team.triple")
    def triple(ctx: TaskContext) -> dict[str, int]:
        return {"triple": 3 * ctx.parameters["n"]}
"""


def installed(site: Path, module: str, code: str) -> Path:
    """`site` as pip leaves a distribution `team-handlers` whose entry point names `module`."""
    site.mkdir(exist_ok=True)
    (site / f"{module}.py").write_text(textwrap.dedent(code))
    metadata = site / "team_handlers-1.0.dist-info"
    metadata.mkdir()
    (metadata / "METADATA").write_text("Metadata-Version: 2.1\nName: team-handlers\nVersion: 1.0\n")
    (metadata / "entry_points.txt").write_text(f"[conveyor.handlers]\nteam = {module}\n")
    return site


@pytest.fixture
def site(tmp_path: Path) -> Path:
    return installed(tmp_path / "site", "teamhandlers", HANDLERS)


def environment(site: Path) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([str(ROOT), str(site)])}


def test_the_entry_points_come_after_the_named_modules(
    site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert "teamhandlers" not in entry_point_modules()
    monkeypatch.syspath_prepend(str(site))
    assert entry_point_modules() == ["teamhandlers"]
    assert handler_modules(["tests.handlers"], discover=True) == ["tests.handlers", "teamhandlers"]
    assert handler_modules(["teamhandlers", "a", "a"], discover=True) == ["teamhandlers", "a"]
    assert handler_modules(["tests.handlers"], discover=False) == ["tests.handlers"]


def test_conveyord_serves_the_handlers_of_an_installed_package(
    site: Path, conveyord: Callable[..., Conveyord]
) -> None:
    server = conveyord(env=environment(site))
    with Client(server.address) as client:
        task = client.create("team.triple", {"n": 14})
        done = client.wait(task.task_id, timeout=30)
    assert (done.status, done.result) == (TaskStatus.COMPLETED, {"triple": 42})


def test_no_handler_entry_points_leaves_them_out(
    site: Path, conveyord: Callable[..., Conveyord]
) -> None:
    server = conveyord("--no-handler-entry-points", env=environment(site))
    with Client(server.address) as client, pytest.raises(InvalidArgument, match=r"team\.triple"):
        client.create("team.triple", {"n": 14})


def test_an_entry_point_whose_module_fails_stops_conveyord_and_names_it(tmp_path: Path) -> None:
    site = installed(tmp_path / "site", "brokenhandlers", "raise ImportError('no such thing')\n")
    result = subprocess.run(
        [sys.executable, "-m", "conveyord", "--listen", "127.0.0.1:0", "--store", "memory"],
        env={**os.environ, **environment(site)}, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert "cannot import handler module 'brokenhandlers': no such thing" in result.stderr
