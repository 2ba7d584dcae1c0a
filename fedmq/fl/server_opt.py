"""Server optimizers: how the global model steps, given the round's pseudo-gradient.

Follows Reddi et al. 2020, "Adaptive Federated Optimization" (arXiv 2003.00295),
Algorithm 2. ``delta`` is the aggregated model change of the round (the weighted mean of
client deltas, or ``-mean(gradient)`` for ``gradient`` updates); Reddi et al.'s
pseudo-gradient is ``-delta``. With ``m_{-1} = 0`` and ``v_{-1} = tau**2``:

* FedAvg:      ``x += eta * delta``  (``eta = 1`` is plain averaging; with client
  ``gradient`` updates and ``eta`` = learning rate it is FedSGD)
* FedAvgM:     ``m = momentum * m + delta;  x += eta * m``  (heavy-ball server momentum,
  Hsu et al. 2019, "Measuring the Effects of Non-Identical Data Distribution")
* FedAdagrad:  ``m = b1 m + (1-b1) delta;  v = v + delta**2``
* FedYogi:     ``m = b1 m + (1-b1) delta;  v = v - (1-b2) delta**2 sign(v - delta**2)``
* FedAdam:     ``m = b1 m + (1-b1) delta;  v = b2 v + (1-b2) delta**2``

and for the three adaptive ones ``x += eta * m / (sqrt(v) + tau)``. As in the paper
there is **no bias correction** of ``m`` or ``v`` (unlike Adam of Kingma and Ba), so the
first steps are ``(1-b1)`` times smaller than a bias-corrected Adam's.

Each optimizer is a small object: hyperparameters (documented with defaults) and state
arrays (float32, the model's shape), so that its state is checkpointed as named arrays
(:meth:`ServerOptimizer.state_arrays`) and restored bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedmq.errors import ConfigError, StateError

OPTIMIZERS = ("fedavg", "fedavgm", "fedadagrad", "fedyogi", "fedadam")

#: FedAvgM's server momentum and server learning rate, for the library and the coordinator's
#: ``[server_optimizer]`` alike: with Top-K 1% both ways on the MNIST-10k CNN this pair came
#: within 0.3 pp of dense FedAvg on IID and above it on Dirichlet(0.5); momentum 0.7 (eta 1)
#: was as good on IID but 1.15 pp below on Dirichlet, FedAvg 0.6-0.75 pp below on both
#: (BENCHMARKS.md, "Both directions through mosquitto"). Until issue #22 the class itself
#: defaulted to Hsu et al.'s 0.9 with eta 1, while the coordinator always used this pair.
FEDAVGM_MOMENTUM = 0.5
FEDAVGM_ETA = 1.5


@dataclass
class ServerOptimizer:
    """Base of the server optimizers; ``step`` updates ``x`` in place.

    Attributes:
        eta: server learning rate (dimensionless multiplier of the step).
    """

    eta: float = 1.0
    name: str = field(default="fedavg", init=False)

    def step(self, x: np.ndarray, delta: np.ndarray) -> None:
        """Apply one server step in place.

        Args:
            x: global model, float32 (d,), updated in place.
            delta: aggregated model change of the round, float32 (d,) (``-pseudo-gradient``).

        Raises:
            ValueError: shapes differ.
        """
        raise NotImplementedError

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Optimizer state as named float32 arrays (empty before the first step for some)."""
        return {}

    def load_state_arrays(self, arrays: dict[str, np.ndarray], size: int) -> None:
        """Restore state saved by :meth:`state_arrays` (nothing saved: a fresh optimizer).

        Raises:
            StateError: some but not all arrays are present, or one has the wrong shape or dtype.
        """
        names = self.state_arrays_names()
        if not any(key in arrays for key in names):
            return
        for key in names:
            arr = arrays.get(key)
            if arr is None or arr.shape != (size,) or arr.dtype != np.float32:
                raise StateError(f"server optimizer {self.name}: state array {key!r} missing or not float32 ({size},)")
            setattr(self, key, arr.copy())

    def state_arrays_names(self) -> tuple[str, ...]:
        """Names of the state arrays this optimizer keeps."""
        return ()


def _check(x: np.ndarray, delta: np.ndarray) -> None:
    if x.shape != delta.shape:
        raise ValueError(f"model has shape {x.shape} but the aggregated delta has {delta.shape}")


@dataclass
class FedAvg(ServerOptimizer):
    """FedAvg (McMahan et al. 2017) with a server learning rate: ``x += eta * delta``.

    Attributes:
        eta: server learning rate, default 1.0 (plain averaging of client models).
    """

    name: str = field(default="fedavg", init=False)

    def step(self, x: np.ndarray, delta: np.ndarray) -> None:
        _check(x, delta)
        x += np.float32(self.eta) * delta


@dataclass
class FedAvgM(ServerOptimizer):
    """FedAvg with server momentum (Hsu et al. 2019): ``m = momentum*m + delta; x += eta*m``.

    Attributes:
        eta: server learning rate, default :data:`FEDAVGM_ETA` (1.5).
        momentum: server momentum, default :data:`FEDAVGM_MOMENTUM` (0.5; Hsu et al.'s best
            range with uncompressed updates is 0.7 to 0.97).
    """

    eta: float = FEDAVGM_ETA
    momentum: float = FEDAVGM_MOMENTUM
    m: np.ndarray | None = None
    name: str = field(default="fedavgm", init=False)

    def step(self, x: np.ndarray, delta: np.ndarray) -> None:
        _check(x, delta)
        if self.m is None:
            self.m = np.zeros_like(x, dtype=np.float32)
        self.m *= np.float32(self.momentum)
        self.m += delta
        x += np.float32(self.eta) * self.m

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {} if self.m is None else {"m": self.m}

    def state_arrays_names(self) -> tuple[str, ...]:
        return ("m",)


@dataclass
class _Adaptive(ServerOptimizer):
    """Shared part of FedAdagrad, FedYogi and FedAdam (Reddi et al. 2020, Algorithm 2).

    Attributes:
        eta: server learning rate, default 1e-3 (tune it: Reddi et al. grid-search
            10^-3 to 10^0 per task).
        beta1: first-moment decay, default 0.9.
        beta2: second-moment decay, default 0.99 (unused by FedAdagrad).
        tau: adaptivity, default 1e-3; also sets ``v_{-1} = tau**2``.
    """

    eta: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    m: np.ndarray | None = None
    v: np.ndarray | None = None

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> None:
        raise NotImplementedError

    def step(self, x: np.ndarray, delta: np.ndarray) -> None:
        _check(x, delta)
        if self.m is None or self.v is None:
            self.m = np.zeros_like(x, dtype=np.float32)
            self.v = np.full_like(x, np.float32(self.tau) ** 2, dtype=np.float32)
        self.m *= np.float32(self.beta1)
        self.m += np.float32(1.0 - self.beta1) * delta
        self._second_moment(self.v, delta * delta)
        x += np.float32(self.eta) * self.m / (np.sqrt(self.v) + np.float32(self.tau))

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {} if self.m is None else {"m": self.m, "v": self.v}

    def state_arrays_names(self) -> tuple[str, ...]:
        return ("m", "v")


@dataclass
class FedAdagrad(_Adaptive):
    """FedAdagrad (Reddi et al. 2020): ``v = v + delta**2``."""

    name: str = field(default="fedadagrad", init=False)

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> None:
        v += d2


@dataclass
class FedYogi(_Adaptive):
    """FedYogi (Reddi et al. 2020; Zaheer et al. 2018): ``v = v - (1-b2) d2 sign(v - d2)``."""

    name: str = field(default="fedyogi", init=False)

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> None:
        v -= np.float32(1.0 - self.beta2) * d2 * np.sign(v - d2)


@dataclass
class FedAdam(_Adaptive):
    """FedAdam (Reddi et al. 2020): ``v = b2 v + (1-b2) delta**2``."""

    name: str = field(default="fedadam", init=False)

    def _second_moment(self, v: np.ndarray, d2: np.ndarray) -> None:
        v *= np.float32(self.beta2)
        v += np.float32(1.0 - self.beta2) * d2


_CLASSES: dict[str, type[ServerOptimizer]] = {
    "fedavg": FedAvg, "fedavgm": FedAvgM, "fedadagrad": FedAdagrad, "fedyogi": FedYogi, "fedadam": FedAdam,
}


def make_server_optimizer(name: str, **hyper: float) -> ServerOptimizer:
    """Build a server optimizer by name with the given hyperparameters.

    Args:
        name: one of ``fedavg``, ``fedavgm``, ``fedadagrad``, ``fedyogi``, ``fedadam``.
        hyper: ``eta`` and, where they apply, ``momentum`` (FedAvgM), ``beta1``,
            ``beta2``, ``tau`` (adaptive ones). Omitted ones take the class defaults.

    Raises:
        ConfigError: unknown name, or a hyperparameter that does not apply to it.
    """
    cls = _CLASSES.get(name)
    if cls is None:
        raise ConfigError(f"server_optimizer.name: unknown optimizer {name!r}, expected one of {OPTIMIZERS}")
    allowed = {"eta"} | ({"momentum"} if cls is FedAvgM else set()) | (
        {"beta1", "beta2", "tau"} if issubclass(cls, _Adaptive) else set())
    extra = set(hyper) - allowed
    if extra:
        raise ConfigError(f"server_optimizer: option(s) {sorted(extra)} do not apply to {name!r} "
                          f"(expected some of {sorted(allowed)})")
    return cls(**{k: float(v) for k, v in hyper.items()})
