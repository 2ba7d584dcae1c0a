"""The tests' one bounded wait: poll a condition until it holds or a timeout passes.

Tests wait on events with timeouts, never on fixed sleeps; where no event exists to wait on
(a state another thread or process changes), they poll with :func:`until`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

#: Seconds between two looks at the condition.
POLL_S = 0.02


def until(condition: Callable[[], T], timeout: float) -> T:
    """The first truthy value of ``condition()`` within ``timeout`` seconds, else its last
    (falsy) value; ``condition`` is looked at every :data:`POLL_S` seconds and once more at
    the deadline."""
    end = time.monotonic() + timeout
    pause = threading.Event()
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        pause.wait(POLL_S)
    return condition()
