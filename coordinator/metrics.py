"""The coordinator's Prometheus metrics, fed from its progress events.

:class:`CoordinatorMetrics` owns one :class:`prometheus_client.CollectorRegistry` (never the
process-wide default one, so that tests and several coordinators in one process keep
their numbers apart) and turns the service's :class:`coordinator.service.Progress` events
into metrics (:meth:`CoordinatorMetrics.observe`). Counters move when a round closes, from
its :class:`fedmq.fl.rounds.RoundRecord`, so what Prometheus shows adds up to the records
in the state folder (``rounds.csv``, ``fedmq coordinator status``). In buffered asynchronous
mode a server step is a round: its ``round_closed`` event carries the step's record.

=========================================== ========= ===========================================
metric                                      type      meaning
=========================================== ========= ===========================================
``fedmq_rounds_total{state}``               counter   rounds finished, ``state`` closed / failed
``fedmq_round_duration_seconds``            histogram wall time of a round, open to close (s)
``fedmq_devices_online``                    gauge     devices whose retained status says online
``fedmq_devices_selected``                  gauge     devices sent a task in the latest round
``fedmq_devices_answered``                  gauge     selected devices that sent an update
                                                      (accepted or rejected) in the latest round
``fedmq_updates_accepted_total``            counter   client updates added into an aggregate
``fedmq_updates_rejected_total{reason}``    counter   client updates rejected, by reason
                                                      (:data:`fedmq.fl.rounds.REASONS`,
                                                      async mode's ``stale`` and ``finished``
                                                      too)
``fedmq_bytes_total{direction}``            counter   ``up``: client-update bytes received
                                                      (manifests included); ``down``: global
                                                      model bytes x devices sent a task
``fedmq_model_version``                     gauge     the current global model version
``fedmq_test_accuracy``, ``fedmq_test_loss`` gauge    the coordinator's evaluation of the
                                                      current model (NaN until evaluated)
``fedmq_privacy_epsilon``                   gauge     epsilon the global model has spent at
                                                      ``[privacy] delta`` (NaN without
                                                      differential privacy; docs/privacy.md)
=========================================== ========= ===========================================

Every metric carries no federation label: one coordinator serves one federation and the
scrape configuration labels its target.
"""

from __future__ import annotations

import math
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fedmq.fl.buffered import REASONS as BUFFERED_REASONS
from fedmq.fl.rounds import REASONS, ParticipationRecord, RoundRecord
from fedmq.metrics_http import MetricsServer, serve_metrics

#: Round wall-time buckets (seconds): from a simulated round to the default 60 s deadline and beyond.
DURATION_BUCKETS = (0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class _Event(Protocol):
    """What :meth:`CoordinatorMetrics.observe` reads of a ``coordinator.service.Progress``."""

    kind: str
    selected: int
    online: int
    record: RoundRecord | None


class CoordinatorMetrics:
    """The metrics of one coordinator (see the module docstring for the list).

    Args:
        registry: where the metrics live (default: a new registry of their own).

    Thread safety: :meth:`observe` runs on the round thread; prometheus_client's metrics
    are safe to read from the HTTP server's thread meanwhile.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.rounds = Counter("fedmq_rounds", "Rounds finished, by state (closed: model stepped; failed).",
                              ["state"], registry=r)
        self.round_duration = Histogram("fedmq_round_duration_seconds", "Wall time of a round, open to close.",
                                        buckets=DURATION_BUCKETS, registry=r)
        self.devices_online = Gauge("fedmq_devices_online", "Devices whose retained status says online.",
                                    registry=r)
        self.devices_selected = Gauge("fedmq_devices_selected", "Devices sent a task in the latest round.",
                                      registry=r)
        self.devices_answered = Gauge("fedmq_devices_answered",
                                      "Selected devices that sent an update (accepted or rejected) in the latest "
                                      "round.", registry=r)
        self.accepted = Counter("fedmq_updates_accepted", "Client updates added into an aggregate.", registry=r)
        self.rejected = Counter("fedmq_updates_rejected", "Client updates rejected, by reason.", ["reason"],
                                registry=r)
        self.bytes = Counter("fedmq_bytes", "Payload bytes: up = client updates received, down = global model "
                                            "bytes x devices sent a task.", ["direction"], registry=r)
        self.model_version = Gauge("fedmq_model_version", "Current global model version.", registry=r)
        self.test_accuracy = Gauge("fedmq_test_accuracy", "Test accuracy of the current global model (NaN until "
                                                          "evaluated).", registry=r)
        self.test_loss = Gauge("fedmq_test_loss", "Test loss of the current global model (NaN until evaluated).",
                               registry=r)
        self.privacy_epsilon = Gauge("fedmq_privacy_epsilon", "Epsilon spent by the current global model at "
                                                              "[privacy] delta (NaN without differential privacy).",
                                     registry=r)
        self.privacy_epsilon.set(math.nan)
        # Every label value exists from the start, so that a query sees 0, not "no data".
        for state in ("closed", "failed"):
            self.rounds.labels(state)
        for reason in dict.fromkeys(REASONS + BUFFERED_REASONS):
            self.rejected.labels(reason)
        for direction in ("up", "down"):
            self.bytes.labels(direction)
        self.test_accuracy.set(math.nan)
        self.test_loss.set(math.nan)
        self.server: MetricsServer | None = None

    # -- serving --------------------------------------------------------------------------

    def serve(self, address: str, port: int) -> MetricsServer:
        """Start the HTTP endpoint (``/metrics``) on ``address:port`` (0: a free port).

        Raises:
            ConfigError: the address cannot be bound (names ``metrics.port``).
        """
        self.close()
        self.server = serve_metrics(self.registry, address, port, "metrics.port")
        return self.server

    def close(self) -> None:
        """Stop the endpoint, if one runs."""
        if self.server is not None:
            self.server.close()
            self.server = None

    # -- updates --------------------------------------------------------------------------

    def started(self, version: int, loss: float | None, accuracy: float | None) -> None:
        """The coordinator (re)started at global model ``version`` with its last evaluation."""
        self.model_version.set(version)
        self._evaluation(loss, accuracy)

    def observe(self, event: _Event) -> None:
        """Apply one progress event (``waiting``, ``round_open``, ``update``, ``round_closed``)."""
        if event.kind in ("waiting", "round_open", "round_closed"):
            self.devices_online.set(event.online)
        if event.kind == "round_open":
            self.devices_selected.set(event.selected)
            self.devices_answered.set(0)
        elif event.kind == "round_closed" and event.record is not None:
            self.record(event.record)

    def record(self, rec: RoundRecord) -> None:
        """Count one finished round."""
        self.rounds.labels(rec.state).inc()
        self.round_duration.observe(max(0.0, rec.wall_s))
        self.devices_selected.set(rec.participants)
        self.devices_answered.set(len({p.device for p in rec.participations if _answered(p)}))
        self.accepted.inc(rec.accepted)
        for reason, count in rec.rejected.items():
            self.rejected.labels(reason).inc(count)
        self.bytes.labels("up").inc(rec.bytes_up)
        self.bytes.labels("down").inc(rec.bytes_down)
        self.model_version.set(rec.model_version)
        self._evaluation(rec.test_loss, rec.test_accuracy)
        if rec.epsilon is not None:
            self.privacy_epsilon.set(rec.epsilon)

    def spent(self, epsilon: float) -> None:
        """The epsilon spent so far (a resumed run under differential privacy)."""
        self.privacy_epsilon.set(epsilon)

    def _evaluation(self, loss: float | None, accuracy: float | None) -> None:
        if accuracy is not None:
            self.test_accuracy.set(accuracy)
        if loss is not None:
            self.test_loss.set(loss)



#: Rejections that say nothing about the device's answer to this round's task (it was not
#: selected, or the update was for another round).
_NOT_THIS_ROUNDS_ANSWER = ("late", "wrong_round", "unselected", "device_mismatch", "unknown_device")


def _answered(p: ParticipationRecord) -> bool:
    return p.status == "accepted" or (p.status == "rejected" and p.reason not in _NOT_THIS_ROUNDS_ANSWER)
