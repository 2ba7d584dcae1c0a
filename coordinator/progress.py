"""What a run tells its caller: progress events, the evaluated round records, the run's result.

:class:`Reporter` is the one place progress events go through: counted in the run's
Prometheus metrics first, then handed to the caller's ``progress_callback``;
:class:`Evaluations` reports each closed round once its background evaluation is done.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace

import numpy as np
import torch

from coordinator.evaluation import BackgroundEvaluator, Evaluation
from coordinator.metrics import CoordinatorMetrics
from coordinator.state import StateDB
from fedmq.fl.rounds import RoundRecord

log = logging.getLogger("fedmq.coordinator")


@dataclass
class Progress:
    """One progress event for ``Coordinator.run(progress_callback=...)``.

    ``kind``: ``round_open`` (selection made), ``update`` (a client update answered),
    ``round_closed`` (``record`` set) or ``waiting`` (too few eligible devices yet).
    """

    kind: str
    round: int
    selected: int = 0
    target: int = 0
    accepted: int = 0
    rejected: int = 0
    deadline: float = 0.0
    online: int = 0
    record: RoundRecord | None = None


@dataclass
class RunResult:
    """What :meth:`coordinator.service.Coordinator.run` returns.

    Attributes:
        records: one :class:`RoundRecord` per round (or server step) finished by this run (a
            resumed run starts after the checkpoint's round).
        model: the final global model (torch module of the task, eval mode).
        vector: its trainable parameters, float32 (d,).
        version: its global model version.
        stopped: True when a stop request ended the run before ``rounds``.
    """

    records: list[RoundRecord]
    model: torch.nn.Module
    vector: np.ndarray
    version: int
    stopped: bool = False


class Reporter:
    """Progress events: into ``metrics``, then to the callback of the run in progress."""

    def __init__(self, metrics: CoordinatorMetrics) -> None:
        self.metrics = metrics
        self.callback: Callable[[Progress], None] | None = None

    def __call__(self, p: Progress) -> None:
        self.metrics.observe(p)
        if self.callback is not None:
            self.callback(p)


class Evaluations:
    """The closed rounds whose full evaluation runs in the background, reported in round order.

    Args:
        evaluator: evaluates a global model off the round thread, or None (no evaluation data).
        db: where each round's test loss and accuracy go.
        report: progress events (``round_closed`` once a round and every older one are evaluated).
        online: how many devices are online now (for the event).

    Attributes:
        records: the records reported so far by this run, in round order.
        last: ``(test_loss, test_accuracy)`` of the newest evaluated model (the resumed one's at start).
    """

    def __init__(self, evaluator: BackgroundEvaluator | None, db: StateDB, report: Reporter,
                 online: Callable[[], int]) -> None:
        self.evaluator, self.db, self.report, self.online = evaluator, db, report, online
        self._pending: deque[tuple[RoundRecord, Future[Evaluation] | None]] = deque()
        self.records: list[RoundRecord] = []
        self.last: tuple[float | None, float | None] = (None, None)

    def submit(self, rec: RoundRecord, vector: np.ndarray | None) -> None:
        """Queue ``rec``; evaluate ``vector`` (float32 ``(d,)``, copied by the evaluator) when given."""
        self._pending.append((rec, self.evaluator.submit(vector) if vector is not None and self.evaluator is not None
                              else None))

    def close(self) -> None:
        if self.evaluator is not None:
            self.evaluator.close(wait=False)

    def report_done(self, wait: bool) -> None:
        """Report the closed rounds whose evaluation finished (all of them when ``wait``), in
        round order: their test loss and accuracy into the database, then ``round_closed``."""
        while self._pending:
            rec, evaluation = self._pending[0]
            if evaluation is not None:
                if not wait and not evaluation.done():
                    return
                try:
                    loss, acc = evaluation.result()
                except Exception:  # noqa: BLE001 - a failed evaluation must not end the run
                    log.exception("round %d: evaluating model version %d failed", rec.round, rec.model_version)
                    loss, acc = None, None
                if loss is not None and not np.isfinite(loss):
                    log.error("round %d: model version %d evaluates to test loss %s", rec.round, rec.model_version,
                              loss)
                rec = replace(rec, test_loss=loss, test_accuracy=acc)
                self.db.set_evaluation(rec.round, loss, acc)
                self.last = (loss, acc)
            self._pending.popleft()
            self.records.append(rec)
            log.info("round %d %s: accepted %d/%d, rejected %s, test accuracy %s, %.1f s", rec.round, rec.state,
                     rec.accepted, rec.target, rec.rejected or "{}",
                     "n/a" if rec.test_accuracy is None else f"{rec.test_accuracy:.4f}", rec.wall_s)
            self.report(Progress("round_closed", rec.round, rec.participants, rec.target, rec.accepted,
                                 sum(rec.rejected.values()), online=self.online(), record=rec))
