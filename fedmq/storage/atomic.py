"""Atomic writes of state files: temp file in the same folder, fsync, rename, fsync the folder.

A reader sees either the old file or the new one, never a torn one, whatever instant the
process is killed at (POSIX rename is atomic within one file system).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path


#: Prefix and suffix of the temporary files :func:`atomic_write_bytes` makes beside
#: ``path``: ``.<name>.<random>.tmp``. A process killed before the rename leaves one;
#: :func:`remove_stale_temporaries` removes them at the next start.
TEMP_SUFFIX = ".tmp"


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | memoryview, *,
                       before_rename: Callable[[], None] | None = None) -> None:
    """Replace ``path`` with ``data`` atomically and durably.

    Args:
        path: destination file; its folder is created if missing.
        data: the whole new content.
        before_rename: called once the temporary file is written and synced, before the
            rename (a test hook: fedmq.testhooks).

    Raises:
        OSError: the folder cannot be created or written (the old file, if any, is intact).
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=TEMP_SUFFIX, dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(dest.parent)


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """fsync a folder so that a rename inside it survives a power cut."""
    dfd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_temporaries(folder: str | os.PathLike[str], names: tuple[str, ...] = (), *,
                             name_pattern: str | None = None) -> list[Path]:
    """Remove the temporary files :func:`atomic_write_bytes` left in ``folder`` for the
    files ``names`` (a process killed between writing and renaming). Only names of the
    exact form ``.<name>.<8 random characters>.tmp`` go: nothing fedmq did not create.
    Call it only while this process owns the folder (no concurrent writer).

    Args:
        folder: the folder the files are written in (missing: nothing to remove).
        names: the exact file names whose temporaries go.
        name_pattern: instead of ``names``, a regular expression that a file name must
            match in full (files named by a rule, such as a journal's).

    Returns:
        The removed paths.
    """
    root = Path(folder)
    if name_pattern is None:
        name_pattern = "|".join(re.escape(n) for n in names) or r"(?!)"
    pattern = re.compile(r"\.(" + name_pattern + r")\.[A-Za-z0-9_]{8}" + re.escape(TEMP_SUFFIX))
    removed = []
    try:
        entries = list(root.iterdir())
    except FileNotFoundError:
        return removed
    for entry in entries:
        if pattern.fullmatch(entry.name) and entry.is_file():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed
