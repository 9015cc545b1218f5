"""A real `conveyord` process, for the tests that start one (the `conveyord` fixture)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The PYTHONPATH of a process a test starts: this checkout's sources first (the tests, the
# client and the server), so that it runs the code under test even where an editable
# install of another checkout (a worktree's main) is in the environment.
SOURCE_PATH = os.pathsep.join(str(path) for path in (ROOT, ROOT / "client", ROOT / "service"))
CONSOLE_SCRIPT = Path(sys.executable).parent / "conveyord"  # what `pip install` puts on PATH


class Conveyord:
    """A conveyord process on a free port, with its log on stderr."""

    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        command: Sequence[str] = (sys.executable, "-m", "conveyord"),
        cwd: Path = ROOT,
    ) -> None:
        environment = {**os.environ, "PYTHONPATH": SOURCE_PATH, **(env or {})}
        self.process = subprocess.Popen(
            [
                *command,
                "--listen",
                "127.0.0.1:0",
                "--store",
                "memory",
                *args,
            ],
            cwd=cwd,
            env=environment,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stderr is not None
        self.log: list[str] = []
        for line in self.process.stderr:
            self.log.append(line)
            if match := re.search(r"\(port (\d+)\)", line):
                self.address = f"127.0.0.1:{match.group(1)}"
                break
        else:
            raise AssertionError("conveyord did not start:\n" + "".join(self.log))
        # Read the log as it comes, so that a busy server (a line per task) never blocks on
        # a full pipe.
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()

    def _read_log(self) -> None:
        assert self.process.stderr is not None
        with contextlib.suppress(ValueError, OSError):  # closed by a test that is done with it
            for line in self.process.stderr:
                self.log.append(line)

    def rest_of_log(self) -> str:
        """The whole log, once the process has closed it (exited)."""
        self._reader.join()
        return "".join(self.log)
