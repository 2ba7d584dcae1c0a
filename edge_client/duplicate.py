"""Telling "another agent uses this device id" from an ordinary reconnect.

The device id is the MQTT client id, and a broker closes the older connection when a
second client connects with the same id (MQTT 5.0 spec 3.1.4-3). Two agents configured
with one id therefore close each other in turn, each reconnecting at once: a loop that
never settles. A broker may say so (MQTT 5 DISCONNECT reason 0x8E, ``Link.taken_over``);
mosquitto 2.0 and every MQTT 3.1.1 broker just close the socket, so a connection closed
within seconds of being accepted (``Link.short_lived``) counts too.

:class:`TakeoverWatch` turns those counts into decisions: a second such drop within
``window_s`` is reported (one alone may be a one-off, e.g. a tool connecting as the
device), a third means two agents, and the agent backs off for
:meth:`TakeoverWatch.backoff_s` (doubling from ``first_backoff_s`` up to ``max_backoff_s``,
with jitter) so that the other agent runs undisturbed meanwhile. The drops alternate
between the two agents, so each of them gets to the report. The coordinator sees the same
conflict from the other side (coordinator.presence: two instance ids take turns).
"""

from __future__ import annotations

import random
from collections import deque


class TakeoverWatch:
    """Takeovers and short-lived connections of one link over time.

    Args:
        window_s: drops this close together (seconds) belong to one conflict.
        first_backoff_s, max_backoff_s: the first back-off and its cap (seconds).
        rng: jitter source (seeded in tests).
    """

    def __init__(self, window_s: float = 120.0, first_backoff_s: float = 30.0, max_backoff_s: float = 600.0,
                 rng: random.Random | None = None) -> None:
        self.window_s = window_s
        self.first_backoff_s = first_backoff_s
        self.max_backoff_s = max_backoff_s
        self._rng = rng or random.Random()
        self._seen = 0
        self._times: deque[float] = deque()
        self.backoffs = 0

    def observe(self, drops: int, now: float) -> str | None:
        """Look at the link's ``taken_over + short_lived`` count at monotonic time ``now`` (s).

        Returns:
            ``"report"`` at the second drop within ``window_s``, ``"back_off"`` from the
            third, else None.
        """
        if drops <= self._seen:
            return None
        new = drops - self._seen
        self._seen = drops
        while self._times and now - self._times[0] > self.window_s:
            self._times.popleft()
        self._times.extend([now] * new)
        if len(self._times) >= 3:
            return "back_off"
        return "report" if len(self._times) == 2 else None

    def backoff_s(self) -> float:
        """The next back-off (seconds); each call doubles the one after, up to the cap."""
        base = min(self.max_backoff_s, self.first_backoff_s * 2 ** self.backoffs)
        self.backoffs += 1
        self._times.clear()
        return base * self._rng.uniform(0.75, 1.25)
