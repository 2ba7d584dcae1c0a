"""The round-policy seam: what a protocol tells the round driver, and the registry of protocols.

The driver (:mod:`coordinator.driver`) is the coordinator's loop, written once; a
:class:`RoundPolicy` answers its questions: who gets a task and when (:meth:`advance`),
when a server step happens (the policy hands a closed round or a full buffer to
``ctx.step``), what an answer means (:meth:`before_receipt`, :meth:`answered`), what a
device going offline means (:meth:`presence`), and what is kept with each checkpoint.
Built in: ``sync`` (synchronous rounds, :mod:`coordinator.synchronous`), ``secure`` (the same
rounds whose phases are SecAgg+'s, :mod:`coordinator.secure`) and ``async`` (FedBuff,
:mod:`coordinator.buffered`). A new protocol is a module and one :func:`register_policy` line;
``Coordinator(config, policy=NAME)`` picks it (default: by the configuration).
"""

from __future__ import annotations

import queue
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from coordinator.config import CoordinatorConfig
from coordinator.faults import RunControl
from coordinator.presence import DeviceRegistry
from coordinator.privacy import PrivacyGuard
from coordinator.phases import PhaseIO
from coordinator.progress import Progress, Reporter
from coordinator.publisher import Publisher
from coordinator.stepper import Stepper
from coordinator.state import StateDB
from fedmq.errors import ConfigError
from fedmq.fl.buffered import BufferedEngine
from fedmq.fl.rounds import Accepted, ClosedRound, Outcome, RoundEngine, RoundRecord, UpdateChecks
from fedmq.wire.messages import TrainPlan
from fedmq.model.params import ParamSpec
from fedmq.tasks import Task
from fedmq.transport import Link
from fedmq.transport.base import Message
from fedmq.transport.receiver import BlobReceiver


@dataclass(frozen=True)
class PolicyParts:
    """What a policy factory may build its policy from (the coordinator's parts).

    Attributes:
        config, task, spec: the configuration, the learning task and its ParamSpec.
        registry, db, link, publisher: presence, the state database, the link, the publisher.
        checks: the claim and content checks (the engine's; their norms resumed by the driver).
        update_limit: largest client-update blob admitted, bytes.
        privacy: differential privacy (``[privacy] enabled``), else None.
        control: the stop request and the fault-injection points.
    """

    config: CoordinatorConfig
    task: Task
    spec: ParamSpec
    registry: DeviceRegistry
    db: StateDB
    link: Link
    publisher: Publisher
    checks: UpdateChecks
    update_limit: int
    privacy: PrivacyGuard | None
    control: RunControl


class InboxView(Protocol):
    """What a policy uses of the coordinator's inbox (coordinator.inbox.Inbox)."""

    queue: queue.SimpleQueue[Message]
    rejections: Counter[str]

    def handle(self, msg: Message, notify: bool = True) -> None: ...

    def answer(self, device: str, transfer: str, outcome: Outcome, notify: bool = True) -> None: ...

    def receipt(self, device: str, round_: int, transfer: str, status: str, reason: str) -> None: ...


class RoundContext(Protocol):
    """What a policy sees of the loop that drives it (coordinator.driver.RoundContext, which
    imports the policies' protocol, so the policies name this view of it instead)."""

    poll_s: float
    vector: np.ndarray
    version: int
    publisher: Publisher
    stepper: Stepper
    receiver: BlobReceiver
    inbox: InboxView
    report: Reporter

    def pump(self, timeout: float, notify: bool = True) -> bool: ...

    def phase_io(self, other: Callable[[Message], None], parse: Callable[[str], tuple[str, str] | None],
                 gone: Callable[[str], bool]) -> PhaseIO: ...

    def wait_for_devices(self, round_: int) -> list[str]: ...

    def step(self, closed: ClosedRound) -> tuple[RoundRecord, bool]: ...


class RoundPolicy(Protocol):
    """One protocol of rounds, composed by the round driver (module docstring)."""

    #: The pure engine that judges client updates (:mod:`fedmq.fl.rounds`, :mod:`fedmq.fl.buffered`).
    engine: RoundEngine | BufferedEngine
    #: Seconds a blob in assembly may wait for its next chunk (the receiver's timeout).
    receiver_timeout_s: float

    @property
    def round_in_progress(self) -> int:
        """The round (or server step) answers now belong to."""

    def resume(self, ctx: RoundContext, step: int, version: int) -> None:
        """Stand where the checkpoint stands (``step`` done, model ``version``), before connecting."""

    def start(self, ctx: RoundContext) -> None:
        """Connected and subscribed: settle what a killed run left (tasks in flight, receipts)."""

    def advance(self, ctx: RoundContext) -> bool:
        """One turn of the loop (a round; a dispatch and an inbox drain). False: stop the run."""

    def presence(self, device: str, online: bool) -> None:
        """A status of ``device`` arrived (``online`` False: its last will or a clean leave)."""

    def before_receipt(self, device: str, transfer: str, outcome: Accepted) -> None:
        """An update was accepted; its receipt is about to be sent (make it durable first)."""

    def answered(self, ctx: RoundContext, device: str, outcome: Outcome) -> None:
        """An update was answered (receipt sent)."""

    def progress(self) -> Progress:
        """The ``update`` progress event after an answer."""

    def checkpoint_meta(self) -> dict[str, str]:
        """Metadata this policy keeps with the step's checkpoint."""

    def checkpoint_arrays(self, vector: np.ndarray, stepped: bool) -> dict[str, np.ndarray]:
        """Float32 ``(d,)`` arrays this policy keeps with the step's checkpoint (saved as
        ``opt.<name>``), given the global model after the step (``vector``) and whether it
        stepped. Optional: a policy without it keeps none."""

    def after_checkpoint(self, ctx: RoundContext, rec: RoundRecord, stepped: bool) -> None:
        """The step is durable and in the database; the new model is not published yet."""

    def finish(self, ctx: RoundContext) -> None:
        """Every step is done (not called on a stop request)."""


def warmed_plan(config: CoordinatorConfig, round_: int) -> TrainPlan:
    """The train plan of task round ``round_``: ``[plan]`` with the density warm-up applied
    (``[warmup]``; a plan without a codec has no density to warm up)."""
    return replace(config.plan, codec=config.warmup.apply(config.plan.codec, round_))


PolicyFactory = Callable[[PolicyParts], RoundPolicy]
_POLICIES: dict[str, PolicyFactory] = {}


def register_policy(name: str, factory: PolicyFactory) -> None:
    """Make the round policy ``name`` available to ``Coordinator(config, policy=name)``."""
    _POLICIES[name] = factory


def policy_name(config: CoordinatorConfig) -> str:
    """The policy the configuration asks for: ``async`` (``[round] mode``), ``secure``
    (``[secure_aggregation] enabled``) or ``sync``."""
    if config.round.mode == "async":
        return "async"
    return "secure" if config.secure_aggregation.enabled else "sync"


def make_policy(name: str, parts: PolicyParts) -> RoundPolicy:
    """Build the registered policy ``name``.

    Raises:
        ConfigError: no policy of that name is registered.
    """
    # The built-in policies register themselves when coordinator.service imports them.
    factory = _POLICIES.get(name)
    if factory is None:
        raise ConfigError(f"round policy {name!r}: expected one of {', '.join(sorted(_POLICIES))}")
    return factory(parts)
