"""Where a coordinator run can be interrupted: the stop request and the fault-injection points.

Every round policy (synchronous rounds, FedBuff, secure rounds, any registered one) reaches
the named steps of :data:`PAUSE_POINTS` through the one :class:`RunControl` the driver
holds, so a fault test pauses, kills or restarts the process at the same step whatever the
policy (:mod:`fedmq.testhooks`, prefix ``FEDMQ_COORDINATOR``):

``selection`` (devices selected, no task published; synchronous rounds), ``task_publish``
(the first task published, the others not yet), ``receipt`` (an update judged, its receipt
not sent; every policy), ``checkpoint_write`` (the step's checkpoint written to its
temporary file, not renamed), ``checkpoint_rename`` (checkpoint renamed, the database not
written), ``publishing`` (the same instant, named for the publication that follows),
``model_publish`` (step recorded, the new global model not yet published) and
``model_published`` (the new model published, nothing after it yet); the server-step points
fire for every policy, FedBuff's steps included. Secure rounds add ``secagg_keys``,
``secagg_shares``, ``secagg_input`` and ``secagg_reveal`` (:class:`coordinator.secure.SecureRound`).
``accepted`` (:data:`UPDATE_PAUSE_POINTS`: an accepted update handed to its policy, which
FedBuff journals to disk, its receipt not sent) fires for every policy too; it is kept out of
the round points the crash suites walk, whose ``receipt`` already covers the instant before.
"""

from __future__ import annotations

import threading

from fedmq.testhooks import PauseHook

#: The steps every server step passes, then those only a secure round has.
ROUND_PAUSE_POINTS = ("selection", "task_publish", "receipt", "checkpoint_write", "checkpoint_rename", "model_publish",
                      "model_published", "publishing")
SECURE_PAUSE_POINTS = ("secagg_keys", "secagg_shares", "secagg_input", "secagg_reveal")
UPDATE_PAUSE_POINTS = ("accepted",)
PAUSE_POINTS = ROUND_PAUSE_POINTS + SECURE_PAUSE_POINTS + UPDATE_PAUSE_POINTS


class RunControl:
    """The stop request of one run and its test hook.

    Raises:
        fedmq.errors.ConfigError: (at construction) the environment names an unknown pause
            point (:class:`fedmq.testhooks.PauseHook`).
    """

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._hook = PauseHook("FEDMQ_COORDINATOR", PAUSE_POINTS)

    def stop(self) -> None:
        """Ask the run to end after the current step (thread- and signal-safe)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def pause(self, point: str, round_: int) -> None:
        """Stop at ``point`` of round (or server step) ``round_`` when the environment asks."""
        self._hook(point, round_, lambda: self.stopping)
