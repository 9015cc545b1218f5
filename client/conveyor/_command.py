"""The `conveyor` console script: the command line, or what to install for it.

The command line's packages (rich) are the `cli` extra, which a client-only install leaves
out; there the script says so instead of failing with a traceback.
"""

from __future__ import annotations

import sys

# The packages of the `cli` extra, and theirs.
CLI_PACKAGES = frozenset({"rich", "pygments", "markdown_it", "mdurl"})
MISSING_EXTRA = (
    "conveyor: the command line needs its extra: pip install 'conveyor[cli]' "
    "(`conveyor-worker` runs a worker without it)"
)


def main() -> int:
    try:
        from conveyor.cli import main as command_line
    except ModuleNotFoundError as error:
        if (error.name or "").partition(".")[0] not in CLI_PACKAGES:
            raise
        print(MISSING_EXTRA, file=sys.stderr)
        return 2
    return command_line()
