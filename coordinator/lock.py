"""The coordinator's state-folder lock: one coordinator process per ``state_dir``.

Two coordinators on one folder would both write the checkpoint and the database and
publish conflicting global models; the second to start is refused (see
:func:`fedmq.storage.lockfile.lock_folder`: flock, released when the holder exits or dies).
"""

from __future__ import annotations

import os
from typing import IO

from fedmq.storage.lockfile import lock_folder


def lock_state_dir(state_dir: str | os.PathLike[str]) -> IO[bytes]:
    """Lock ``state_dir`` for this coordinator; close the returned file to release it.

    Raises:
        StateError: another process holds it (the message names the folder and its pid),
            or the folder cannot be created.
    """
    return lock_folder(state_dir, "coordinator",
                       "run one coordinator per state_dir: stop the other one or give this one its own state_dir")
