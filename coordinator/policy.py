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

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

from coordinator.config import CoordinatorConfig
from coordinator.faults import RunControl
from coordinator.presence import DeviceRegistry
from coordinator.privacy import PrivacyGuard
from coordinator.progress import Progress
from coordinator.publisher import Publisher
from coordinator.state import StateDB
from fedmq.errors import ConfigError
from fedmq.fl.buffered import BufferedEngine
from fedmq.fl.rounds import Accepted, Outcome, RoundEngine, RoundRecord, UpdateChecks
from fedmq.wire.messages import TrainPlan
from fedmq.model.params import ParamSpec
from fedmq.tasks import Task
from fedmq.transport import Link

if TYPE_CHECKING:
    from coordinator.driver import RoundDriver


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


class RoundPolicy(Protocol):
    """One protocol of rounds, composed by the round driver (module docstring)."""

    #: The pure engine that judges client updates (:mod:`fedmq.fl.rounds`, :mod:`fedmq.fl.buffered`).
    engine: RoundEngine | BufferedEngine
    #: Seconds a blob in assembly may wait for its next chunk (the receiver's timeout).
    receiver_timeout_s: float

    @property
    def round_in_progress(self) -> int:
        """The round (or server step) answers now belong to."""

    def resume(self, ctx: RoundDriver, step: int, version: int) -> None:
        """Stand where the checkpoint stands (``step`` done, model ``version``), before connecting."""

    def start(self, ctx: RoundDriver) -> None:
        """Connected and subscribed: settle what a killed run left (tasks in flight, receipts)."""

    def advance(self, ctx: RoundDriver) -> bool:
        """One turn of the loop (a round; a dispatch and an inbox drain). False: stop the run."""

    def presence(self, device: str, online: bool) -> None:
        """A status of ``device`` arrived (``online`` False: its last will or a clean leave)."""

    def before_receipt(self, device: str, transfer: str, outcome: Accepted) -> None:
        """An update was accepted; its receipt is about to be sent (make it durable first)."""

    def answered(self, ctx: RoundDriver, device: str, outcome: Outcome) -> None:
        """An update was answered (receipt sent)."""

    def progress(self) -> Progress:
        """The ``update`` progress event after an answer."""

    def checkpoint_meta(self) -> dict[str, str]:
        """Metadata this policy keeps with the step's checkpoint."""

    def after_checkpoint(self, ctx: RoundDriver, rec: RoundRecord, stepped: bool) -> None:
        """The step is durable and in the database; the new model is not published yet."""

    def finish(self, ctx: RoundDriver) -> None:
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
    # The built-in policies register themselves on import.
    import coordinator.buffered  # noqa: F401
    import coordinator.secure  # noqa: F401
    import coordinator.synchronous  # noqa: F401
    factory = _POLICIES.get(name)
    if factory is None:
        raise ConfigError(f"round policy {name!r}: expected one of {', '.join(sorted(_POLICIES))}")
    return factory(parts)
