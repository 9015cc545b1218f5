"""The examples run as they are, against a real server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ServerThread

ROOT = Path(__file__).resolve().parent.parent


def test_the_report_service_builds_each_report_once(server: ServerThread) -> None:
    def run() -> str:
        result = subprocess.run(
            [sys.executable, "examples/report_service.py"],
            cwd=ROOT,
            env={**os.environ, "CONVEYOR_SERVER": server.address},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    first = run()
    for customer in ("acme", "globex"):
        assert f"{customer}: RUNNING" in first
        assert f"{customer}: report ready: {{'slept': 1}}" in first
    again = run()  # the same request_ids: the reports that were built, not new ones
    assert "RUNNING" not in again
    assert again.count("report ready") == 2


def test_the_readme_client_snippet_runs(
    server: ServerThread, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    readme = (ROOT / "README.md").read_text()
    snippets = [s for s in re.findall(r"```python\n(.*?)```", readme, re.S) if "Client()" in s]
    assert len(snippets) == 1
    monkeypatch.setenv("CONVEYOR_SERVER", server.address)
    exec(compile(snippets[0], "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1] == "{'slept': 2}"
    assert "RUNNING 0.5 step 2 of 4" in printed
