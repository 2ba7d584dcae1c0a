"""Coordinator configuration: the options, their defaults and their checks, read by the shared
loader (:mod:`fedmq.config.loader`): one TOML file plus environment overrides.

Environment overrides: ``FEDMQ_COORDINATOR__<OPTION>`` with ``__`` between table levels,
in any letter case, e.g. ``FEDMQ_COORDINATOR__ROUNDS=20`` or
``FEDMQ_COORDINATOR__ROUND__DEADLINE_S=30`` (how values and relative paths are read:
:mod:`fedmq.config.loader`). Overrides win over the file.

Every option with its default, unit and effect is in docs/coordinator.md. Errors are
:class:`fedmq.errors.ConfigError` naming the file, the option and what was expected.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, StrictInt, field_validator, model_validator

from fedmq.config.loader import ConfigSchema, Sourced, broker_table
from fedmq.fl.server_opt import OPTIMIZERS, ServerOptimizer, make_server_optimizer
# Re-exported for the callers that pass FedAvgM's defaults explicitly (fleet.demo); written
# once, in fedmq.fl.server_opt.
from fedmq.fl.server_opt import FEDAVGM_ETA as FEDAVGM_ETA, FEDAVGM_MOMENTUM as FEDAVGM_MOMENTUM
from fedmq.fl.aggregation import aggregator_names
from fedmq.fl.buffered import StalenessPolicy
from fedmq.fl.sampling import SelectionPolicy
from fedmq.fl.scaffold import check_plan
from fedmq.wire import topics
from fedmq.codecs import CodecSpec, all_param_names
from fedmq.codecs.schedule import DensityWarmup
from fedmq.errors import ConfigError, FedmqError
from fedmq.wire.messages import TrainPlan
from fedmq.transport.settings import BrokerSettings


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RoundConfig(_Section):
    """Who takes part in a round and for how long."""

    devices_per_round: StrictInt | float = 10
    min_updates: int = Field(1, ge=1)
    over_selection: float = Field(1.0, ge=1.0, le=10.0)
    deadline_s: float = Field(60.0, gt=0)
    wait_for_devices_s: float = Field(60.0, ge=0)
    min_devices: int | None = Field(None, ge=1)
    #: Seconds a selected device that went offline (last will, clean leave) before answering
    #: has to come back before it is counted as ``dropped`` (0: at once). A device restarted
    #: by systemd after a crash is back within a few seconds and still answers its task.
    drop_grace_s: float = Field(10.0, ge=0)
    mode: Literal["sync", "async"] = "sync"

    @field_validator("devices_per_round")
    @classmethod
    def _count_or_fraction(cls, value: int | float) -> int | float:
        if isinstance(value, int) and value < 1:
            raise ValueError("a count must be >= 1")
        if isinstance(value, float) and not 0.0 < value <= 1.0:
            raise ValueError("a fraction must be in (0, 1]; write a count as an integer")
        return value

    @model_validator(mode="after")
    def _min_not_above_count(self) -> RoundConfig:
        if isinstance(self.devices_per_round, int) and self.min_updates > self.devices_per_round:
            raise ValueError(f"min_updates ({self.min_updates}) must be <= devices_per_round "
                             f"({self.devices_per_round})")
        return self

    def participation(self) -> SelectionPolicy:
        return SelectionPolicy(self.devices_per_round, self.min_updates, self.over_selection)

    @property
    def devices_to_wait_for(self) -> int:
        """Eligible devices to wait for before selecting (``min_devices``, else ``min_updates``)."""
        return self.min_devices if self.min_devices is not None else self.min_updates


class AsyncConfig(_Section):
    """Buffered asynchronous aggregation (``[round] mode = "async"``; FedBuff, see
    :mod:`fedmq.fl.buffered`): the server steps every ``buffer_size`` accepted updates."""

    buffer_size: int = Field(10, ge=1)
    concurrency: int = Field(20, ge=1)
    staleness_exponent: float = Field(0.5, ge=0.0, le=10.0)
    max_staleness: int = Field(20, ge=0)
    task_timeout_s: float = Field(300.0, gt=0)

    def staleness(self) -> StalenessPolicy:
        return StalenessPolicy(self.staleness_exponent, self.max_staleness)


class ServerOptimizerConfig(_Section):
    """Server optimizer and its hyperparameters (unset ones take the optimizer's defaults,
    :mod:`fedmq.fl.server_opt`, e.g. ``fedavgm``'s :data:`~fedmq.fl.server_opt.FEDAVGM_MOMENTUM`
    and :data:`~fedmq.fl.server_opt.FEDAVGM_ETA`). Default: FedAvgM, the best measured for
    compressed federations (the coordinator's default codecs)."""

    name: Literal[OPTIMIZERS] = "fedavgm"  # type: ignore[valid-type]
    eta: float | None = Field(None, gt=0)
    momentum: float | None = Field(None, ge=0, lt=1)
    beta1: float | None = Field(None, ge=0, lt=1)
    beta2: float | None = Field(None, ge=0, lt=1)
    tau: float | None = Field(None, gt=0)

    def build(self) -> ServerOptimizer:
        """Raises: ConfigError when a hyperparameter does not apply to the optimizer."""
        hyper = {k: v for k, v in self.model_dump().items() if k != "name" and v is not None}
        return make_server_optimizer(self.name, **hyper)


#: ``evaluation.data`` values that name a data set rather than a path.
EVALUATION_KEYWORDS = ("none", "digits", "mnist10k", "task")


class EvaluationConfig(_Section):
    """Held-out data for the coordinator's evaluation of each new global model."""

    data: str = "none"
    batch_size: int = Field(512, ge=1)
    #: Held-out samples a new global model's loss must be finite on before it is published
    #: (0: no gate); the full evaluation runs in the background (coordinator.evaluation).
    gate_samples: int = Field(256, ge=0)

    @field_validator("data")
    @classmethod
    def _known(cls, value: str) -> str:
        if value:
            return value
        raise ValueError("expected 'none', 'digits', 'mnist10k', 'task' or a path the task's loader reads")


class AggregationConfig(_Section):
    """How accepted client updates are combined (the :class:`fedmq.fl.aggregation.Aggregator` seam)."""

    rule: str = "weighted-mean"
    #: Robust rules (fedmq.fl.robust, docs/robust.md); each rule takes the options it has.
    #: What an unsent coordinate counts as for ``median`` and ``trimmed-mean``.
    unsent: Literal["abstain", "zero"] = "abstain"
    #: ``trimmed-mean``: fraction of values cut at each end of every coordinate.
    trim: float = Field(0.2, ge=0, lt=0.5)
    #: ``krum`` / ``multi-krum``: fraction of a round's updates assumed Byzantine.
    byzantine: float = Field(0.2, ge=0, lt=0.5)
    #: ``multi-krum``: updates averaged (0: the round's updates minus the tolerated Byzantine).
    select: int = Field(0, ge=0)
    #: ``centered-clipping``: clip radius tau (L2, update units; 0: median distance) and iterations.
    clip_radius: float = Field(0.0, ge=0)
    clip_iterations: int = Field(3, ge=1)

    @field_validator("rule")
    @classmethod
    def _registered(cls, value: str) -> str:
        if value not in aggregator_names():
            raise ValueError(f"unknown aggregation rule {value!r}, expected one of {aggregator_names()}")
        return value

    def options(self) -> dict[str, Any]:
        """The options offered to the rule (:func:`fedmq.fl.aggregation.make_aggregator`)."""
        return self.model_dump(exclude={"rule"})


class PrivacyConfig(_Section):
    """Client-level differential privacy (DP-FedAvg; docs/privacy.md): off unless ``enabled``.

    ``noise_multiplier`` sigma (the noise on the sum of clipped updates has standard deviation
    sigma x ``clip_norm``) or, when unset, the smallest sigma for which ``rounds`` rounds
    (default: the top-level ``rounds``) spend at most ``target_epsilon`` at ``delta``; that
    calibration needs ``sampling_rate`` (``poisson``) or ``population`` (``without-replacement``:
    ``devices_per_round`` x ``over_selection`` of ``population``). ``target_epsilon`` is the
    privacy budget: a round that would spend past it is not opened.
    """

    enabled: bool = False
    noise: Literal["central", "distributed"] = "central"
    clip_norm: float = Field(1.0, gt=0)
    noise_multiplier: float | None = Field(None, gt=0)
    target_epsilon: float | None = Field(None, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    rounds: int | None = Field(None, ge=1)
    sampling: Literal["poisson", "without-replacement"] = "poisson"
    sampling_rate: float | None = Field(None, gt=0, le=1)
    population: int | None = Field(None, ge=1)
    adaptive_clipping: bool = False
    target_quantile: float = Field(0.5, gt=0, lt=1)
    clip_learning_rate: float = Field(0.2, gt=0)
    count_stddev: float | None = Field(None, gt=0)
    noise_seed: int | None = None

    @model_validator(mode="after")
    def _budget_or_sigma(self) -> PrivacyConfig:
        if self.enabled and self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError("privacy needs noise_multiplier or target_epsilon (to calibrate it from)")
        if self.adaptive_clipping and self.noise == "distributed":
            raise ValueError("adaptive_clipping needs central noise (its count noise is the coordinator's)")
        return self


class LimitsConfig(_Section):
    """Bounds on client updates and on what the coordinator holds for transfers in assembly.

    ``max_update_bytes`` applies together with the ParamSpec's own bound (the largest valid
    envelope, :func:`fedmq.wire.envelope.max_update_bytes`): the smaller one wins.
    """

    max_update_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    norm_bound: float | None = Field(None, gt=0)
    norm_bound_factor: float | None = Field(10.0, gt=1.0)
    norm_bound_warmup: int = Field(5, ge=1)
    norm_bound_initial: float = Field(1000.0, gt=0)
    max_samples: int = Field(1_000_000, ge=1)
    max_pending_bytes: int = Field(256 * 1024 * 1024, ge=1024)
    max_transfers_per_device: int = Field(2, ge=1)
    max_devices: int = Field(10_000, ge=1)


class SealingConfig(_Section):
    """Sealed client updates (fedmq.security.sealing; docs/security.md).

    The coordinator always holds a key pair (``seal-key.pem`` / ``seal-key.pub`` in
    ``state_dir``, created on first start) and opens every sealed update. ``required``
    (default false, so devices provisioned before sealing keep working) refuses plain
    envelopes with the reason ``unsealed``: set it once every device has the coordinator's
    public key (``fedmq broker add-device --coordinator-key``).
    """

    required: bool = False


class SecureAggregationConfig(_Section):
    """``[secure_aggregation]``: secure rounds (coordinator.secure; docs/security.md), in which
    the coordinator learns only the survivors' sum.

    Fields:
        enabled: run every round as a secure round (default off).
        degree: SecAgg+ neighbours per device; 0: 4 * ceil(log2 n), at most n - 1.
        threshold: t, shares that rebuild a secret; 0: degree // 3 + 1 (rounds of 100 complete
            at 30% dropout; degree // 2 + 1 also resists an equivocating coordinator, at the
            cost of dropout). Also each phase's quorum.
        clip: largest |value| a device sends, in update units (the rest stays in its residual).
        scale: fixed-point integers per unit (2^12: rounding error at most 1.2e-4 per value, kept
            by error feedback; 5 devices' ring is 16 bits, 2 bytes a value; on the digits demo
            (20 rounds) as accurate as 2^20 with 30% fewer bytes up).
        explore: share of the common support drawn at random (fedmq.secagg.support); 0.5: on
            the digits demo (10 rounds, scale 2^20) 90.6% test accuracy against 83.9% at 0.1
            and 88.9% at 1.
        phase_s: deadline of the keys, shares and reveal phases, seconds (the input phase
            ends at the round's deadline).
        ranking: what the common support's largest coordinates are ranked by: ``gradient``
            (default: the last global model step plus the loss gradient of the global model on
            the coordinator's gate samples, each of unit norm; without evaluation data the last
            step alone) or ``change`` (the last step alone: it lies only on the last support,
            so the support stays near round 1's random draw; issue #26, docs/security.md).
        density: the common support's share of the coordinates of the tensors the plan's
            codec sparsifies, in (0, 1]. Default 0.025: a masked input sends no indices, so it
            holds 2.5x a 1% client update's values at about twice its bytes; on the MNIST CNN
            set-ups B / C (10 devices, 5 per round, 30 rounds, through mosquitto) secure
            rounds then match plain ones (97.45% / 97.45% IID, 96.20% / 96.65% Dirichlet(0.5))
            at 1.93x the devices' bytes (docs/security.md). None: the plan's density.
    """

    enabled: bool = False
    degree: int = Field(0, ge=0)
    threshold: int = Field(0, ge=0)
    clip: float = Field(1.0, gt=0)
    scale: float = Field(float(2**12), gt=0)
    explore: float = Field(0.5, ge=0, le=1)
    phase_s: float = Field(30.0, gt=0)
    ranking: Literal["change", "gradient"] = "gradient"
    density: float | None = Field(0.025, gt=0, le=1)


class PublishConfig(_Section):
    """What is published with each global model version."""

    onnx: bool = True


class MetricsConfig(_Section):
    """The Prometheus metrics endpoint (coordinator.metrics): off while ``port`` is 0."""

    port: int = Field(0, ge=0, le=65535)
    address: str = "127.0.0.1"

    @field_validator("address")
    @classmethod
    def _host(cls, value: str) -> str:
        if not value or any(c.isspace() for c in value) or "/" in value:
            raise ValueError("expected an IP address or host name to bind, e.g. 127.0.0.1 or 0.0.0.0")
        return value


class ExportConfig(_Section):
    """When the ONNX export is made and published (with ``publish.onnx`` on).

    ``onnx_every``: every this many versions, plus the version a run starts from and the last
    one it makes; 0: only those two. Exporting costs 0.6-0.7 s whatever the model size, so
    exporting every version put most of a small model's round time on the critical path.
    """

    onnx_every: int = Field(10, ge=0)


class WarmupConfig(_Section):
    """Density warm-up of both codecs (docs/coordinator.md, ``[warmup]``): for the first
    ``rounds`` rounds the uplink plan's and the downlink's density go geometrically from
    ``start`` down to their configured values (Lin et al. 2018, DGC;
    :class:`fedmq.codecs.schedule.DensityWarmup`, which leaves a codec without a density, such
    as ``none``, as it is). 0 rounds: off, the default: on digits (BENCHMARKS.md) 5 rounds
    from 0.25 added 0.3 pp on top of server momentum but 70% more uplink bytes, and on the CNN
    its first rounds would cost several MB."""

    rounds: int = Field(0, ge=0)
    start: float = Field(0.25, gt=0.0, le=1.0)

    def apply(self, codec: CodecSpec, round_: int) -> CodecSpec:
        """The codec spec round ``round_`` uses (the same schedule for the uplink and the downlink)."""
        return DensityWarmup(self.rounds, self.start).apply(codec, round_)


def _codec_spec(value: Any) -> CodecSpec:
    """A codec spec from a CodecSpec or a codec name (its parameters at their defaults)."""
    if isinstance(value, CodecSpec):
        return value
    try:
        return CodecSpec(value)
    except FedmqError as exc:
        raise ValueError(str(exc)) from None


def _train_plan(value: Any) -> TrainPlan:
    """``[plan]``: a TrainPlan, or a flat table of plan fields, ``codec`` and codec parameters
    (:meth:`fedmq.wire.messages.TrainPlan.from_table`)."""
    try:
        if isinstance(value, TrainPlan):
            return value.validate("plan")
        if isinstance(value, Mapping):
            return TrainPlan.from_table(value, "plan")
    except FedmqError as exc:
        raise ValueError(str(exc)) from None
    raise ValueError(f"expected a table, got {type(value).__name__}")


class DownlinkConfig(_Section):
    """How the global model reaches devices (docs/coordinator.md, ``[downlink]``).

    ``codec``: the downlink codec with its parameters (:class:`fedmq.codecs.CodecSpec`, the
    same type as the uplink plan's; in the table, ``codec`` names it and its parameters are
    keys beside it, e.g. ``density``). ``topk-int8`` publishes each version as a compressed
    delta with server-side error feedback (:mod:`fedmq.fl.downlink`); ``none`` publishes every
    version as a full safetensors blob. ``window``: versions whose deltas stay retained.
    ``snapshot_every``: a full safetensors snapshot every this many versions (at most
    ``window``, so the deltas after the newest snapshot are always retained).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    codec: Annotated[CodecSpec, PlainValidator(_codec_spec)] = CodecSpec()
    window: int = Field(20, ge=1)
    snapshot_every: int = Field(10, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _codec_parameters(cls, value: Any) -> Any:
        """Fold the flat table's codec parameters into the codec spec."""
        if not isinstance(value, Mapping):
            return value
        params = {k: v for k, v in value.items() if k in all_param_names()}
        if not params:
            return value
        rest = {k: v for k, v in value.items() if k not in params}
        try:
            rest["codec"] = CodecSpec.from_table(str(rest.get("codec", CodecSpec().name)), params)
        except FedmqError as exc:
            raise ValueError(str(exc)) from None
        return rest

    @model_validator(mode="after")
    def _snapshot_within_window(self) -> DownlinkConfig:
        if self.snapshot_every > self.window:
            raise ValueError(f"snapshot_every ({self.snapshot_every}) must be at most window ({self.window}): "
                             f"the deltas after the newest snapshot must stay retained")
        return self

    @property
    def compressed(self) -> bool:
        return self.codec.name != "none"

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The keys ``[downlink]`` may hold: its fields and every registered codec's parameters."""
        return tuple(cls.model_fields) + all_param_names()


def _privacy_enabled(privacy: Any) -> bool:
    """Whether a ``[privacy]`` value (table or section) turns DP on; False if it is invalid
    (its own validation then reports it)."""
    if privacy is None:
        return False
    try:
        return bool(PrivacyConfig.model_validate(privacy).enabled)
    except ValueError:
        return False


class CoordinatorConfig(_Section, Sourced):
    """The whole coordinator configuration (see docs/coordinator.md).

    ``broker`` is :class:`fedmq.transport.BrokerSettings`, built from the ``[broker]`` table
    by :func:`fedmq.config.loader.broker_table` (the edge client's ``[broker]`` is the same).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True, populate_by_name=True)

    federation: str
    task: str
    rounds: int = Field(10, ge=1)
    seed: int = 0
    state_dir: Path = Path("coordinator-state")
    broker: BrokerSettings = BrokerSettings()
    round: RoundConfig = RoundConfig()
    async_: AsyncConfig = Field(AsyncConfig(), alias="async")
    plan: Annotated[TrainPlan, PlainValidator(_train_plan)] = TrainPlan()
    server_optimizer: ServerOptimizerConfig = ServerOptimizerConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    aggregation: AggregationConfig = AggregationConfig()
    limits: LimitsConfig = LimitsConfig()
    publish: PublishConfig = PublishConfig()
    sealing: SealingConfig = SealingConfig()
    secure_aggregation: SecureAggregationConfig = SecureAggregationConfig()
    metrics: MetricsConfig = MetricsConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    downlink: DownlinkConfig = DownlinkConfig()
    export: ExportConfig = ExportConfig()
    warmup: WarmupConfig = WarmupConfig()

    @model_validator(mode="before")
    @classmethod
    def _dense_downlink_under_privacy(cls, value: Any) -> Any:
        """Under differential privacy the downlink defaults to ``none`` (dense).

        Measured (BENCHMARKS.md, "Privacy"): the MNIST CNN at epsilon 8, 1,000 devices, 100 per
        round, reached 26.1% with the compressed downlink, whose Top-K of a noisy global step
        keeps mostly noise, and 87.35% with a dense downlink (the uplink compressed in both).
        A ``[downlink]`` that names its codec, or any codec parameter, is kept as written (the
        coordinator then warns).
        """
        if not isinstance(value, Mapping) or not _privacy_enabled(value.get("privacy")):
            return value
        downlink = value.get("downlink")
        if isinstance(downlink, DownlinkConfig):
            named = "codec" in downlink.model_fields_set
        elif isinstance(downlink, Mapping):
            named = any(k == "codec" or k in all_param_names() for k in downlink)
        else:
            named = downlink is not None
        if named:
            return value
        table = dict(downlink) if isinstance(downlink, Mapping) else {}
        return {**value, "downlink": {**table, "codec": "none"}}

    @field_validator("broker", mode="before")
    @classmethod
    def _broker_settings(cls, value: Any) -> Any:
        try:
            return broker_table(value, BrokerSettings())
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("federation")
    @classmethod
    def _federation_id(cls, value: str) -> str:
        try:
            return topics.check_id(value, "federation")
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _privacy_applies(self) -> CoordinatorConfig:
        if not self.privacy.enabled:
            return self
        if self.round.mode == "async":
            raise ValueError("privacy: asynchronous rounds (FedBuff) are not accounted; use [round] mode = \"sync\" "
                             "with differential privacy")
        if self.aggregation.rule != "weighted-mean":
            raise ValueError(f"privacy: the coordinator sums clipped updates with uniform weights; aggregation rule "
                             f"{self.aggregation.rule!r} is not accounted (keep \"weighted-mean\")")
        if self.privacy.noise == "distributed" and self.plan.codec.name != "none" \
                and not self.secure_aggregation.enabled:
            raise ValueError("privacy: distributed noise needs [plan] codec = \"none\" (a noise share must reach "
                             "every coordinate unquantized)")
        return self

    @model_validator(mode="after")
    def _secure_rounds_are_synchronous_means(self) -> CoordinatorConfig:
        # A secure round yields only the survivors' sum: no per-update rule can run on it, and
        # buffered asynchronous aggregation has no round for the phases.
        if self.secure_aggregation.enabled and (self.round.mode != "sync" or self.aggregation.rule != "weighted-mean"):
            raise ValueError("secure_aggregation.enabled needs round.mode 'sync' and aggregation.rule "
                             f"'weighted-mean' (got {self.round.mode!r}, {self.aggregation.rule!r}): robust rules "
                             "and asynchronous rounds need each update, which a secure round never shows")
        if self.secure_aggregation.enabled and self.privacy.enabled and self.privacy.noise != "distributed":
            # The coordinator would see the exact sum before adding its noise: under secure
            # aggregation the devices add the noise (distributed discrete Gaussian).
            raise ValueError("secure_aggregation.enabled with privacy.enabled needs privacy.noise = \"distributed\": "
                             "the devices add discrete Gaussian noise to their masked inputs, so the coordinator "
                             "never sees a sum without noise")
        return self

    @model_validator(mode="after")
    def _scaffold_applies(self) -> CoordinatorConfig:
        check_plan(self.plan.algorithm, mode=self.round.mode, secure=self.secure_aggregation.enabled,
                   privacy=self.privacy.enabled)
        return self

    @model_validator(mode="after")
    def _optimizer_options_apply(self) -> CoordinatorConfig:
        try:
            self.server_optimizer.build()
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self


#: How the coordinator's configuration is read (fedmq.config.loader): the file, then
#: ``FEDMQ_COORDINATOR__*``, then overrides from Python.
SCHEMA = ConfigSchema(
    app="coordinator", model=CoordinatorConfig, env_prefix="FEDMQ_COORDINATOR", reference="docs/coordinator.md",
    paths=("state_dir", "evaluation.data"),
    credentials=("broker.username_file", "broker.password_file", "broker.ca_file", "broker.cert_file",
                 "broker.key_file"),
    keywords={"evaluation.data": EVALUATION_KEYWORDS})


def config_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> CoordinatorConfig:
    """Validate a configuration mapping (already merged with overrides; no path is resolved).

    Raises:
        ConfigError: listing every invalid option with what was expected.
    """
    cfg: CoordinatorConfig = SCHEMA.validate(data, source)
    return cfg


def load_config(path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> CoordinatorConfig:
    """Read the TOML file at ``path``, apply environment overrides, validate.

    Args:
        path: TOML file; ``None`` builds the configuration from the environment alone.
        environ: environment to read overrides from (default ``os.environ``).
        overrides: a nested mapping merged last (used by the Python API and tests).

    Raises:
        ConfigError: the file is missing or not TOML (names the path and line), an
            environment variable names no option (names the closest), a credential file does
            not exist, or an option is invalid (names the option and what was expected).
    """
    cfg: CoordinatorConfig = SCHEMA.load(path, environ, overrides)
    return cfg
