"""The landing folder of impression files: atomic writes, which files are complete, hashing, archive and quarantine."""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

GZIP_MAGIC = b"\x1f\x8b"
# Header flags (FTEXT, FHCRC, FCOMMENT) with which DuckDB 1.5's gzip reader refuses a file ("Unsupported GZIP
# archive") though zlib reads it; FEXTRA and FNAME it reads.
GZIP_FLAGS_DUCKDB_REFUSES = 0x01 | 0x02 | 0x10


def duckdb_reads_gzip_header(head: bytes) -> bool:
    """Whether DuckDB's gzip reader takes a gzip stream starting with `head` (its flags byte is the fourth)."""
    return len(head) < 4 or not head[3] & GZIP_FLAGS_DUCKDB_REFUSES
# Names that tools give a file while they are still writing it; such a file is never picked up.
PARTIAL_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".filepart", ".download", "_copying_", ".swp")
LANDED_SUFFIXES = (".json", ".json.gz", ".gz")
# The `time` of an impression the loader keeps, in epoch milliseconds: 1970-01-01 to 9999-12-31 UTC. Outside it a
# value is surely wrong, and far outside it DuckDB cannot make a timestamp of it. The receiver refuses the same range.
MIN_TIME_MS = 0
MAX_TIME_MS = 253_402_300_799_999
# splitVersionNumber is a BIGINT column.
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


@dataclass(frozen=True)
class LandingFile:
    """One complete file to load: where it is, its content hash, and whether it is gzipped (sniffed, not guessed)."""

    name: str
    path: Path
    content_hash: str
    size: int
    gzipped: bool


def new_file_name(gzipped: bool, now: dt.datetime | None = None) -> str:
    """A unique name that sorts by arrival time."""
    now = now or dt.datetime.now(dt.UTC)
    return f"impressions-{now:%Y%m%dT%H%M%S%f}Z-{uuid.uuid4().hex[:12]}.json" + (".gz" if gzipped else "")


def write_atomically(directory: Path, name: str, body: bytes) -> Path:
    """Write `body` under a temporary name, fsync it, rename it into place and fsync the folder.

    Readers never see a partial file under the final name, and the file survives a power cut once this returns.
    """
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / name
    temporary = directory / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            view = memoryview(body)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temporary, final)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(directory)
    return final


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_landed_name(name: str) -> bool:
    """A name that a finished writer leaves: not hidden, not a temporary or partial name, a JSON (gz) file."""
    lowered = name.lower()
    return (not name.startswith((".", "~", "_"))
            and lowered.endswith(LANDED_SUFFIXES)
            and not any(suffix in lowered for suffix in PARTIAL_SUFFIXES))


def is_utf8_name(name: str) -> bool:
    """Whether a name read from the folder is UTF-8 (Python shows other bytes as lone surrogates, which no run
    config, ledger row or SQL string can carry)."""
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def landed_entries(directory: Path, not_utf8: list[str] | None = None) -> Iterator[tuple[str, int]]:
    """(name, inode) of candidate files in `directory` (not its subfolders). One readdir, no stat per file.

    A candidate whose name is not UTF-8 is left out (and added to `not_utf8` when given): it cannot be loaded
    under that name, and must not stop the others."""
    with os.scandir(directory) as entries:
        for entry in entries:
            # DirEntry.is_file and .inode use what readdir reports: no extra system call on Linux.
            if is_landed_name(entry.name) and entry.is_file(follow_symlinks=False):
                if is_utf8_name(entry.name):
                    yield entry.name, entry.inode()
                elif not_utf8 is not None:
                    not_utf8.append(entry.name)


def landed_names(directory: Path) -> list[str]:
    return [name for name, _ in landed_entries(directory)]


def fingerprint(path: Path) -> LandingFile:
    """Hash the bytes as stored (so a renamed copy is recognised) and sniff gzip from the magic bytes."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        head = handle.read(1 << 20)
        gzipped = head[:2] == GZIP_MAGIC
        while head:
            digest.update(head)
            size += len(head)
            head = handle.read(1 << 20)
    return LandingFile(path.name, path, digest.hexdigest(), size, gzipped)


NAME_MAX = 255  # bytes in one file name (ext4, xfs, tmpfs ...)


def prefixed_name(content_hash: str, name: str) -> str:
    """`<hash12>-<name>`; when that passes a file name's 255 bytes, the name is cut short before its suffix."""
    full = f"{content_hash[:12]}-{name}"
    if len(full.encode()) <= NAME_MAX:
        return full
    suffix = next((s for s in LANDED_SUFFIXES if name.lower().endswith(s)), "")
    room = NAME_MAX - len(content_hash[:12]) - 1 - len(suffix.encode())
    stem = name[:len(name) - len(suffix)].encode()[:room].decode("utf-8", "ignore")
    return f"{content_hash[:12]}-{stem}{name[len(name) - len(suffix):]}"


def move_file(path: Path, target: Path) -> Path:
    """Move `path` to `target`, creating its folder, also onto another file system (then: copy, then remove)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(path, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        shutil.move(path, target)
    return target


def move_aside(path: Path, directory: Path, content_hash: str) -> Path:
    """Move a file into `directory` without overwriting a different file that had the same name."""
    target = directory / path.name
    if target.exists():
        target = directory / prefixed_name(content_hash, path.name)
    return move_file(path, target)


def archive_folder(archive_dir: Path, when: dt.datetime) -> Path:
    return archive_dir / when.astimezone(dt.UTC).strftime("%Y-%m-%d")
