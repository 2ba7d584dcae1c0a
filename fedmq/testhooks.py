"""Test hooks: stop a process at a named step of a round so that a test can fault it there.

Used by the fault-injection suite (``tests/faults``, ``python -m benchmarks run --suite
faults``) and by crash tests. Off unless the environment asks for it; a production
process never sets these variables.

For a process with prefix ``P`` (``FEDMQ_COORDINATOR`` or ``FEDMQ_EDGE``):

``P_TEST_PAUSE_AT``
    the step to stop at (the process documents its steps);
``P_TEST_PAUSE_ROUND``
    only in this round (default: the first time the step is reached);
``P_TEST_PAUSE_FILE``
    a file the process writes the step's name into when it stops; it then waits until the
    test removes that file (so a test can restart the broker and let the process go on),
    or until the process is asked to stop (SIGTERM: a graceful stop at that step). Without
    a file the process waits until it is stopped or killed.

The hook fires once per process.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from fedmq.storage.atomic import atomic_write_text
from fedmq.errors import ConfigError

log = logging.getLogger(__name__)

#: The variables a hook reads, without the process prefix.
VARIABLES = ("TEST_PAUSE_AT", "TEST_PAUSE_ROUND", "TEST_PAUSE_FILE")


def hook_variables(prefix: str) -> tuple[str, ...]:
    """The environment variables the hook of a process with ``prefix`` reads.

    A configuration loader that refuses unknown variables with its prefix must let these
    through (``edge_client.config``).
    """
    return tuple(f"{prefix}_{name}" for name in VARIABLES)


#: How often a paused process looks at its pause file and stop flag, seconds.
POLL_S = 0.02


class PauseHook:
    """The pause hook of one process.

    Args:
        prefix: environment prefix, e.g. ``FEDMQ_COORDINATOR``.
        points: the steps this process knows (a step not among them is a ConfigError,
            so a typo in a test fails loudly instead of never pausing).
        environ: the environment (``os.environ`` when None).

    Raises:
        ConfigError: ``P_TEST_PAUSE_AT`` names an unknown step or ``P_TEST_PAUSE_ROUND``
            is not an integer.
    """

    def __init__(self, prefix: str, points: tuple[str, ...], environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.point = env.get(f"{prefix}_TEST_PAUSE_AT") or None
        self.file = env.get(f"{prefix}_TEST_PAUSE_FILE") or None
        raw_round = env.get(f"{prefix}_TEST_PAUSE_ROUND") or None
        if self.point is not None and self.point not in points:
            raise ConfigError(f"{prefix}_TEST_PAUSE_AT={self.point!r}: expected one of {', '.join(points)}")
        try:
            self.round = int(raw_round) if raw_round is not None else None
        except ValueError:
            raise ConfigError(f"{prefix}_TEST_PAUSE_ROUND={raw_round!r}: expected an integer") from None
        self.fired = False

    def __call__(self, point: str, round_: int | None = None, stopping: Callable[[], bool] = lambda: False) -> None:
        """Stop here if the environment asks for ``point`` (in ``round_``)."""
        if self.fired or point != self.point:
            return
        if self.round is not None and round_ != self.round:
            return
        self.fired = True
        if self.file:
            atomic_write_text(self.file, point)
        log.warning("test hook: paused at %s (round %s, pid %d)", point, round_, os.getpid())
        while not stopping():
            if self.file and not Path(self.file).exists():
                log.warning("test hook: going on from %s", point)
                return
            time.sleep(POLL_S)  # another process ends the pause; nothing to wait on but the file
