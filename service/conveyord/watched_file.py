"""A configuration file that the server reads again when it changes (a token file, JWT
keys, tenants' limits), without a restart."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

RELOAD_EVERY = 1.0  # seconds: how often a file's change is looked for, at most


class WatchedFile:
    """A file that is read again when it changes (its size or time), looked at once a
    RELOAD_EVERY at most; a change that cannot be read leaves what was read before."""

    def __init__(self, path: Path, clock: Callable[[], float]) -> None:
        self.path = path
        self._clock = clock
        self._stamp: tuple[int, int] | None = None
        self._checked = float("-inf")
        self._load()

    def _read(self) -> None:
        """Read the file (a ValueError says what is wrong with it)."""
        raise NotImplementedError

    def _fresh(self) -> None:
        """Read the file again if it changed since it was last read."""
        if self._clock() - self._checked < RELOAD_EVERY:
            return
        self._checked = self._clock()
        try:
            stat = self.path.stat()
            if (stat.st_mtime_ns, stat.st_size) != self._stamp:
                self._load()
                log.info("%s changed: read again", self.path)
        except (OSError, ValueError) as error:
            log.error("%s changed but cannot be read; what it held stays: %s", self.path, error)

    def _load(self) -> None:
        stat = self.path.stat()
        self._read()
        self._stamp = (stat.st_mtime_ns, stat.st_size)
