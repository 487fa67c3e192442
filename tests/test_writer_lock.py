"""The writer lock between processes: a second writer is held at the lock, not merely slow, and goes on after release."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mixsync.warehouse import Warehouse

CHILD = textwrap.dedent("""
    import sys
    from mixsync.warehouse import Warehouse

    with Warehouse(sys.argv[1], lock_timeout_seconds=120).write() as con:
        con.execute("INSERT INTO sync.probe SELECT 'child', count(*) + 1 FROM sync.probe")
    print("wrote", flush=True)
""")


def _open_files(pid: int) -> set[str]:
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # closed between listing and reading
            found.add(os.readlink(fd))
    return found


def _flock_holders(path: Path) -> list[tuple[str, int]]:
    """(WRITE|READ, pid) of every flock on `path` in /proc/locks; waiters (`->`) are listed separately by Linux."""
    inode = os.stat(path).st_ino
    holders = []
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields or fields[1] != "FLOCK":
            continue
        if int(fields[5].rsplit(":", 1)[1]) == inode:
            holders.append((fields[3], int(fields[4])))
    return holders


def _wait_for(condition, what: str, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="reads the kernel's lock table (Linux)")
def test_a_second_writer_process_waits_at_the_lock_until_the_first_releases_it(tmp_path):
    store = Warehouse(tmp_path / "w.duckdb", lock_timeout_seconds=120)
    with store.write() as con:
        con.execute("CREATE TABLE sync.probe (who VARCHAR, seq INTEGER)")
    database, lock = str(store.path), str(store.lock_path)

    with store.write() as con:
        child = subprocess.Popen([sys.executable, "-c", CHILD, database], stdout=subprocess.PIPE, text=True)
        try:
            # The child reaches the lock: it has the lock file open...
            _wait_for(lambda: lock in _open_files(child.pid), "the child to open the lock file")
            # ...and, for as long as we hold the lock, it stays there: alive, lock file open, the database file not
            # opened (a writer opens DuckDB only once it holds the lock), while the kernel shows us as the only holder.
            for _ in range(50):
                assert child.poll() is None, "the second writer finished while the first held the lock"
                files = _open_files(child.pid)
                assert lock in files and database not in files
                assert _flock_holders(store.lock_path) == [("WRITE", os.getpid())]
                time.sleep(0.02)
            con.execute("INSERT INTO sync.probe VALUES ('parent', 1)")
        except BaseException:
            child.kill()
            raise
    # Released: the child takes the lock, writes after us, and ends.
    out, _ = child.communicate(timeout=120)
    assert child.returncode == 0 and out.strip() == "wrote"
    with store.read() as con:
        assert con.execute("SELECT who, seq FROM sync.probe ORDER BY seq").fetchall() == [("parent", 1), ("child", 2)]
