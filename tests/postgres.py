"""A throwaway PostgreSQL server, for the tests of the PostgreSQL store and its benchmark.

`PostgresServer` runs the distribution's own binaries: `initdb` into a new temporary
directory, then `postgres` on a free port of 127.0.0.1 and a unix socket in that directory;
`create_database` makes a fresh database from a template for each test. Stopping it (`stop`,
or leaving the `with` block) stops the server at once and removes the directory.

PostgreSQL refuses to run as root: as root, the server's programs run as the `postgres`
account that Debian's package makes (or `nobody` where there is none), and the directory
belongs to that account. The tests' own connections need no such care (trust auth).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from types import TracebackType

SUPERUSER = "postgres"
# The programs this module runs; the first three start and stop the server, psql sends the
# CREATE DATABASE and DROP DATABASE of each test.
PROGRAMS = ("initdb", "pg_ctl", "postgres", "psql")
HOW_TO_INSTALL = (
    f"PostgreSQL's programs ({', '.join(PROGRAMS)}) were found neither in "
    "`pg_config --bindir` nor in /usr/lib/postgresql/*/bin. The tests marked `postgresql` "
    "start a server of their own with them: install them (Debian, Ubuntu: `apt-get install "
    "postgresql`; no service needs to run), or leave those tests out explicitly with "
    "`pytest -m 'not postgresql'`."
)
# Where Debian's packages put each major version's programs.
DEBIAN_BINDIRS = "/usr/lib/postgresql/*/bin"
# A throwaway cluster needs no durability: with these, a test's commits do not wait for the
# disk. A caller's settings go over these.
TEST_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
# What a production database has (PostgreSQL's defaults): a commit is answered once its WAL
# is flushed to disk. For a benchmark whose figures must stand for such a database.
DURABLE_SETTINGS = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}


class PostgresNotFound(RuntimeError):
    """PostgreSQL's server programs are not installed here."""


def find_bindir() -> Path:
    """The directory of PostgreSQL's server programs: `pg_config --bindir` where pg_config
    is on PATH, else the newest of Debian's /usr/lib/postgresql/VERSION/bin."""
    candidates: list[Path] = []
    if pg_config := shutil.which("pg_config"):
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            answer = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True
            )
            candidates.append(Path(answer.stdout.strip()))
    versions = glob.glob(DEBIAN_BINDIRS)
    candidates += sorted(
        (Path(path) for path in versions),
        key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else 0,
        reverse=True,
    )
    for bindir in candidates:  # pg_config may come with the client library alone
        if all(os.access(bindir / program, os.X_OK) for program in PROGRAMS):
            return bindir
    raise PostgresNotFound(HOW_TO_INSTALL)


@dataclasses.dataclass(frozen=True)
class Account:
    """Whom the server's programs run as: the given uid and gid, or this process's own."""

    uid: int | None = None
    gid: int | None = None

    @classmethod
    def unprivileged(cls) -> Account:
        """As root, `postgres` (or `nobody`); as anyone else, that user (no change)."""
        if os.geteuid() != 0:
            return cls()
        for name in ("postgres", "nobody"):
            with contextlib.suppress(KeyError):
                entry = pwd.getpwnam(name)
                return cls(entry.pw_uid, entry.pw_gid)
        raise PostgresNotFound("running as root, and there is neither a postgres nor a nobody user")

    def run(
        self, command: Sequence[str | Path], cwd: Path, cpus: Collection[int] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a program as this account (on `cpus`, where given), its output captured;
        raise if it fails."""
        environment = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        environment |= {"LC_ALL": "C", "TZ": "UTC"}
        return subprocess.run(
            [*on_cpus(cpus), *(str(part) for part in command)],
            cwd=cwd,
            env=environment,
            capture_output=True,
            text=True,
            check=True,
            user=self.uid,
            group=self.gid,
            extra_groups=None if self.uid is None else [],  # not root's groups
        )


def on_cpus(cpus: Collection[int] | None) -> list[str]:
    """The prefix of a command that runs it on `cpus` (what it forks inherits them), or
    none. taskset rather than a preexec_fn: Python code between fork and exec runs in a
    child that gRPC's fork handlers may have given a poller thread, whose epoll descriptor
    the closing of inherited descriptors then pulls away (the child aborts)."""
    return [] if cpus is None else ["taskset", "--cpu-list", ",".join(map(str, sorted(cpus)))]


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class PostgresServer:
    """A PostgreSQL server of its own in a temporary directory, for as long as it is needed.

    `url` is the superuser's connection to its `postgres` database; `create_database` gives
    a fresh database and its URL. `cpus`, where given, are the cores the server's processes
    run on (the benchmark keeps it off its own). `durable` keeps PostgreSQL's own durability
    (DURABLE_SETTINGS) in place of the tests' (TEST_SETTINGS)."""

    def __init__(
        self,
        settings: Mapping[str, str] | None = None,
        cpus: Collection[int] | None = None,
        *,
        durable: bool = False,
    ) -> None:
        self.bindir = find_bindir()
        self.durable = durable
        self.settings = {**(DURABLE_SETTINGS if durable else TEST_SETTINGS), **(settings or {})}
        self.cpus = set(cpus) if cpus is not None else None
        self.account = Account.unprivileged()
        self.directory: Path | None = None
        self.port = 0
        self.version = 0  # server_version_num, once started: 150018 is 15.18

    @property
    def data(self) -> Path:
        """The cluster's data directory."""
        assert self.directory is not None, "the server is not started"
        return self.directory / "data"

    @property
    def socket_directory(self) -> Path:
        """Where its unix socket is (host= in a libpq connection string)."""
        assert self.directory is not None, "the server is not started"
        return self.directory

    @property
    def url(self) -> str:
        """The superuser's URL to the `postgres` database, over TCP."""
        return self.url_for("postgres")

    def url_for(self, database: str) -> str:
        """The superuser's URL to `database`, over TCP."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    @property
    def pid(self) -> int:
        """The postmaster's pid, from the first line of its postmaster.pid."""
        return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])

    def start(self) -> None:
        """initdb, then start the server and return once it accepts connections
        (`pg_ctl -w` waits for its postmaster.pid to say so)."""
        self.directory = Path(tempfile.mkdtemp(prefix="conveyor-postgres-"))
        try:
            if self.account.uid is not None and self.account.gid is not None:
                os.chown(self.directory, self.account.uid, self.account.gid)
            self._pg(
                "initdb", "--pgdata", self.data, "--username", SUPERUSER, "--auth", "trust",
                "--encoding", "UTF8", "--no-locale", "--no-sync", "--no-instructions",
            )  # fmt: skip
            self._start_on_a_free_port()
            self.version = int(self.sql("SHOW server_version_num"))
        except BaseException:
            self._remove()
            raise

    def _start_on_a_free_port(self, tries: int = 3) -> None:
        """Start on a port that was free a moment ago; another process may take it between
        the look and the bind, so a failed bind is tried again on another."""
        for attempt in range(tries):
            self.port = free_port()
            self._configure()
            try:
                self._pg_ctl_start()
                return
            except subprocess.CalledProcessError:
                log = self._log()
                if "could not bind" not in log or attempt == tries - 1:
                    raise RuntimeError(f"PostgreSQL did not start:\n{log}") from None

    def _configure(self) -> None:
        """Append the settings to postgresql.conf: where it listens, and the caller's (the
        last value of a setting in the file is the one in force)."""
        assert self.directory is not None
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_directory),
            "logging_collector": "off",
            **self.settings,
        }
        lines = "".join(f"{k} = '{v}'\n" for k, v in settings.items())
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(lines)

    def _pg_ctl_start(self) -> None:
        """pg_ctl start --wait, on `cpus` where given: the postmaster and every process it
        forks inherit pg_ctl's affinity."""
        command: list[str | Path] = [
            self.bindir / "pg_ctl", "start", "--wait", "--pgdata", self.data,
            "--log", self._log_path(), "--silent",
        ]  # fmt: skip
        self.account.run(command, cwd=self._cwd(), cpus=self.cpus)

    def stop(self) -> None:
        """Stop the server at once (no checkpoint: nothing in it is kept) and remove its
        directory. Safe to call again."""
        if self.directory is None:
            return
        try:
            if (self.data / "postmaster.pid").exists():
                self._pg("pg_ctl", "stop", "--wait", "--pgdata", self.data, "--mode", "immediate")
        finally:
            self._remove()

    def _remove(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def create_database(self, name: str | None = None, template: str = "template1") -> str:
        """A new, empty database (a copy of `template`), and its URL. A name is made up
        where none is given."""
        name = name or f"test_{uuid.uuid4().hex[:12]}"
        # From 15 on, a copy is written to the WAL block by block unless told otherwise: for
        # a small template, copying its files (and a checkpoint, quick without fsync) takes
        # about half as long.
        strategy = " STRATEGY FILE_COPY" if self.version >= 150000 else ""
        self.sql(f'CREATE DATABASE "{name}" TEMPLATE "{template}"{strategy}')
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, closing whatever connections to it are left."""
        self.sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def sql(self, statement: str, database: str = "postgres") -> str:
        """Run one statement with psql, as the superuser; its output, unaligned, no header."""
        command: list[str | Path] = [
            self.bindir / "psql", "--no-psqlrc", "--quiet", "--tuples-only", "--no-align",
            "--set", "ON_ERROR_STOP=1", "--dbname", self.url_for(database),
            "--command", statement,
        ]  # fmt: skip
        try:
            return Account().run(command, cwd=self._cwd()).stdout.strip()
        except subprocess.CalledProcessError as error:
            raise RuntimeError(f"psql failed: {statement}\n{error.stderr}") from None

    def _pg(self, program: str, *args: str | Path) -> None:
        """Run one of the server's programs as its account."""
        try:
            self.account.run([self.bindir / program, *args], cwd=self._cwd())
        except subprocess.CalledProcessError as error:
            raise RuntimeError(f"{program} failed:\n{error.stdout}{error.stderr}") from None

    def _cwd(self) -> Path:
        """A working directory its account may enter (not root's home)."""
        assert self.directory is not None
        return self.directory

    def _log_path(self) -> Path:
        assert self.directory is not None
        return self.directory / "postgres.log"

    def _log(self) -> str:
        with contextlib.suppress(OSError):
            return self._log_path().read_text(errors="replace")
        return ""

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
