"""An exclusive lock on a state folder, so that one process at a time owns it.

Two processes writing one state folder would overwrite and delete each other's files;
the second one to start is refused with an error naming the folder and the process that
holds it. The lock is ``flock(2)`` on the file ``lock`` in the folder: the kernel releases
it when the holder closes the file or dies (``kill -9`` included), so a stale lock after a
crash is impossible and no cleanup is needed. The file stays in the folder (it is tiny
and never deleted).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

from fedmq.errors import StateError

#: Name of the lock file inside a locked folder.
LOCK_FILE = "lock"


def lock_folder(root: str | os.PathLike[str], owner: str, hint: str = "") -> IO[bytes]:
    """Take the exclusive lock of a state folder for this process.

    The lock file holds the holder's pid (ASCII decimal), rewritten in place: replacing it
    atomically would give it a new inode, and a second process would lock that one.

    Args:
        root: the folder; created (with parents) if missing.
        owner: who takes it, for the message (e.g. ``"coordinator"``, ``"edge client"``).
        hint: appended to the refusal message (what the operator should do).

    Returns:
        The open lock file; the lock lasts until it is closed or the process exits.

    Raises:
        StateError: another process holds the lock (names the folder and its pid), or
            the folder cannot be created or written.
    """
    folder = Path(root)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fh = open(folder / LOCK_FILE, "a+b")  # noqa: SIM115 - the caller holds it
    except OSError as exc:
        raise StateError(f"{folder}: cannot create the state folder or its lock file ({exc})") from None
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        holder = fh.read(32).decode("ascii", "replace").strip()
        fh.close()
        who = f"process {holder}" if holder.isdigit() else "another process"
        raise StateError(f"{folder}: state folder in use by another {owner} ({who} holds {folder / LOCK_FILE})"
                         f"{'; ' + hint if hint else ''}") from None
    try:
        fh.truncate(0)
        fh.write(f"{os.getpid()}\n".encode("ascii"))
        fh.flush()
    except OSError as exc:
        fh.close()
        raise StateError(f"{folder / LOCK_FILE}: cannot write the lock file ({exc})") from None
    return fh
