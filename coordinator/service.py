"""The coordinator of one federation, built whole from its parts; the loop is the round driver's.

:class:`Coordinator` builds, at construction, every part a run needs and hands them to the
round driver (:mod:`coordinator.driver`):

* who takes part and when: the round policy (:mod:`coordinator.policy`; synchronous rounds
  :mod:`coordinator.synchronous`, secure rounds :mod:`coordinator.secure`, FedBuff
  :mod:`coordinator.buffered`), with the presence registry (:mod:`coordinator.presence`)
  telling who is online and the pure engine (:mod:`fedmq.fl.rounds`, :mod:`fedmq.fl.buffered`)
  judging each client update;
* what arrives: the inbox (:mod:`coordinator.inbox`: routing, admission, receipts);
* how the global model steps: the stepper (:mod:`coordinator.stepper`: server optimizer,
  gate, compressed downlink), under differential privacy the guard (:mod:`coordinator.privacy`);
* what devices see: the publisher (:mod:`coordinator.publisher`: snapshot, version chain,
  ONNX, retained-state repair);
* where a run stops: the stop request and the fault-injection points (:mod:`coordinator.faults`).

After every round the model, the optimizer state and the round's record are checkpointed
(coordinator.state) before anything is published, so a kill -9 at any instant resumes
from the last finished round and reruns the one in flight.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np

# The built-in round policies register themselves on import: sync, secure, async.
import coordinator.buffered  # noqa: F401
import coordinator.secure  # noqa: F401
import coordinator.synchronous  # noqa: F401
from coordinator.config import CoordinatorConfig
from coordinator.driver import RoundDriver
from coordinator.evaluation import BackgroundEvaluator
from coordinator.faults import PAUSE_POINTS, ROUND_PAUSE_POINTS, SECURE_PAUSE_POINTS, RunControl
from coordinator.inbox import Inbox
from coordinator.metrics import CoordinatorMetrics
from coordinator.policy import PolicyParts, RoundPolicy, make_policy, policy_name
from coordinator.presence import DeviceRegistry
from coordinator.privacy import PrivacyChecks, PrivacyGuard
from coordinator.progress import Evaluations, Progress, Reporter, RunResult
from coordinator.publisher import Publisher
from coordinator.scaffold import ScaffoldServer, fleet_size_of
from coordinator.state import StateDB
from coordinator.stepper import Stepper
from fedmq.data import load_split
from fedmq.wire.envelope import max_update_bytes
from fedmq.fl.buffered import BufferedEngine
from fedmq.fl.rounds import RoundEngine, UpdateChecks
from fedmq.model.params import ParamSpec
from fedmq.security.sealing import SEAL_OVERHEAD, load_or_create_key
from fedmq.tasks import get_task
from fedmq.transport import Link, open_link
from fedmq.transport.counting import CountingLink
from fedmq.transport.receiver import BlobReceiver

__all__ = ["PAUSE_POINTS", "ROUND_PAUSE_POINTS", "SECURE_PAUSE_POINTS", "Coordinator", "Progress", "RunResult",
           "make_coordinator"]

#: MQTT 5 session expiry of the coordinator's link when ``broker.session_expiry`` is 0,
#: seconds: the broker queues the client updates sent while the coordinator reconnects or
#: restarts, instead of dropping them.
SESSION_EXPIRY_S = 3600


class Coordinator:
    """The federated-learning coordinator of one federation.

    Args:
        config: validated configuration (coordinator.config.load_config).
        link: the connection to the broker, not yet connected (default:
            :func:`fedmq.transport.open_link` for ``config.broker``, chosen by the URL's
            scheme, with client id ``fedmq-coordinator-<federation>``).
        metrics: where the run's Prometheus metrics go (:class:`coordinator.metrics.CoordinatorMetrics`);
            the caller serves it. Default: a registry of this coordinator's own, served
            during :meth:`run` on ``config.metrics`` when its ``port`` is set.
        policy: the round policy's name (:func:`coordinator.policy.register_policy`); default:
            the configuration's (``async``, ``secure`` or ``sync``).

    Construction opens the state folder's database and the sealing key (made on the first
    start) and loads the evaluation data. Use :meth:`run` once, from the thread that should
    own the rounds; :meth:`stop` from any thread (or a signal handler) ends the run after the
    current step, keeping the last checkpoint; the round in flight is rerun by the next start.

    Raises:
        ConfigError: unknown task, round policy or aggregation rule (at construction).
        StateError: (from :meth:`run`) the state folder holds another task's checkpoint, or a
            corrupt one; (at construction) an unreadable database.
        TransportError: (from :meth:`run`) the broker cannot be reached at start.
    """

    def __init__(self, config: CoordinatorConfig, link: Link | None = None,
                 metrics: CoordinatorMetrics | None = None, policy: str | None = None) -> None:
        self.config = config
        self.metrics = metrics if metrics is not None else CoordinatorMetrics()
        self.fed = config.federation
        self.task = get_task(config.task, where=config.where("task"))
        self.model = self.task.build_model(config.seed)
        self.spec = ParamSpec.from_module(self.model)
        self.optimizer = config.server_optimizer.build()
        #: Differential privacy (``[privacy] enabled``; coordinator/privacy.py), else None.
        self.privacy = PrivacyGuard(config, self.spec) if config.privacy.enabled else None
        self.registry = DeviceRegistry(config.limits.max_devices)
        self.control = RunControl()
        settings = config.broker
        if settings.protocol == "5" and settings.session_expiry == 0:
            settings = settings.with_(session_expiry=SESSION_EXPIRY_S)
        self.link = CountingLink(link if link is not None else open_link(settings,
                                                                         client_id=f"fedmq-coordinator-{self.fed}"))
        #: Largest client-update blob admitted: the configured limit or the ParamSpec's own bound.
        self.update_limit = min(config.limits.max_update_bytes, max_update_bytes(self.spec) + SEAL_OVERHEAD)
        registry = self.registry
        task, spec = self.task, self.spec
        #: Scaffold's server control variate (``[plan] algorithm = "scaffold"``; coordinator/scaffold.py).
        self.scaffold = ScaffoldServer(
            spec, self.fed, config.state_dir, config.downlink.codec, window=config.downlink.window,
            snapshot_every=config.downlink.snapshot_every,
            fleet_size=lambda: fleet_size_of(registry.devices, task.name, spec.hash),
            norm_factor=config.limits.norm_bound_factor, norm_warmup=config.limits.norm_bound_warmup) \
            if config.plan.algorithm == "scaffold" else None
        self.db = StateDB(config.state_dir)
        try:
            #: The key pair devices seal their client updates to (fedmq.security.sealing), kept in the state folder.
            self.seal_key = load_or_create_key(config.state_dir)
            eval_data = self._eval_data()
            self.stepper = Stepper(config, self.task, self.spec, self.model, self.optimizer, eval_data)
            privacy = self.privacy
            self.publisher = Publisher(config, self.link, self.task, self.spec, self.model, self.db,
                                       lambda: privacy.model_metadata() if privacy is not None else None,
                                       scaffold=self.scaffold)
            parts = PolicyParts(config, self.task, self.spec, self.registry, self.db, self.link, self.publisher,
                                self._update_checks(), self.update_limit, self.privacy, self.control)
            self.policy: RoundPolicy = make_policy(policy or policy_name(config), parts)
            report = Reporter(self.metrics)
            evaluator = None if eval_data is None else BackgroundEvaluator(
                self.task, self.task.build_model(config.seed), self.spec, eval_data, config.evaluation.batch_size)
            meta = {"task": self.task.name, "spec_hash": self.spec.hash, "optimizer": self.optimizer.name,
                    "seed": str(config.seed), "federation": self.fed}
            self.driver = RoundDriver(config, self.link, self.policy, self.stepper, self.publisher, self.registry,
                                      self.db, self.seal_key, self.privacy, self.control,
                                      Evaluations(evaluator, self.db, report, self.registry.online_count), report,
                                      meta, metrics is None and config.metrics.port > 0, scaffold=self.scaffold)
        except BaseException:
            self.db.close()  # the one resource opened so far (the evaluator's thread starts last)
            raise

    def _eval_data(self) -> tuple[np.ndarray, np.ndarray] | None:
        data = self.config.evaluation.data
        if data == "none":
            return None
        if data == "task":
            _, _, x, y = self.task.reference_split()
        elif data in ("digits", "mnist10k"):
            _, _, x, y = load_split(data)
        else:
            x, y = self.task.load_local(data, self.config.where("evaluation.data"))
        return x, y

    def _update_checks(self) -> UpdateChecks:
        """The claim and content checks of ``[limits]`` (data-set norm bound on by default),
        the same in every policy; the driver resumes their norms from the checkpoint."""
        lim = self.config.limits
        registry = self.registry

        def announced(device: str) -> int:
            dev = registry.devices.get(device)
            return dev.samples if dev is not None else 0

        if self.privacy is not None:
            # Under DP the clip norm replaces the data-set norm bound (a data-dependent rule is
            # not post-processing of the noisy aggregate).
            return PrivacyChecks(self.privacy, max_samples=lim.max_samples, samples_of=announced)
        checks = UpdateChecks(max_samples=lim.max_samples, samples_of=announced, norm_bound=lim.norm_bound,
                              norm_factor=lim.norm_bound_factor, norm_warmup=lim.norm_bound_warmup,
                              norm_initial=lim.norm_bound_initial)
        # Scaffold: the control-variate change in each envelope is judged too.
        return checks if self.scaffold is None else self.scaffold.checks(checks)

    # -- the parts tests and the simulator reach -------------------------------------------

    @property
    def engine(self) -> RoundEngine | BufferedEngine:
        """The policy's engine (the round in progress, or FedBuff's buffer)."""
        return self.policy.engine

    @property
    def inbox(self) -> Inbox:
        return self.driver.inbox

    @property
    def receiver(self) -> BlobReceiver:
        return self.driver.receiver

    @property
    def rejections(self) -> Counter[str]:
        """Rejections counted by reason since the last flush into the database (a Counter)."""
        return self.driver.inbox.rejections

    # -- control -------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the run to end (thread- and signal-safe)."""
        self.control.stop()

    @property
    def stopping(self) -> bool:
        return self.control.stopping

    def run(self, progress_callback: Callable[[Progress], None] | None = None) -> RunResult:
        """Run rounds until ``config.rounds`` rounds (server steps in FedBuff) are finished
        (failed ones count) or :meth:`stop` is called. Resumes from the checkpoint in
        ``config.state_dir``.

        Args:
            progress_callback: ``(Progress) -> None``, called on the round thread with each
                :class:`Progress`.

        Returns:
            :class:`RunResult` with the records of the rounds this run finished.
        """
        self.driver.report.callback = progress_callback
        return self.driver.run()


def make_coordinator(config: CoordinatorConfig, link: Link | None = None, **kwargs: Any) -> Coordinator:
    """The coordinator for ``config`` (its round policy chosen by the configuration's
    ``[round] mode`` and ``[secure_aggregation]``); ``kwargs``: :class:`Coordinator`'s."""
    return Coordinator(config, link, **kwargs)
