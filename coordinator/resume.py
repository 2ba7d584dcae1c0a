"""Where a coordinator starts: the checkpoint it resumes from, or the first one it writes.

:func:`resume` reads ``checkpoint.safetensors`` (coordinator.state), checks that it was made
for this task, ParamSpec, optimizer and federation, restores the server optimizer, the
privacy ledger, the update norms of the data-set bound, the compressed downlink's server
residual and the presence registry, and writes the last round's record into the database
again (the checkpoint is written before the database, so a kill -9 between the two loses
nothing). A fresh state folder gets a checkpoint of round 0 at once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from coordinator.config import CoordinatorConfig
from coordinator.evaluation import evaluate_vector
from coordinator.presence import DeviceRegistry
from coordinator.privacy import PrivacyGuard
from coordinator.scaffold import ScaffoldServer
from coordinator.state import CHECKPOINT_NAME, Checkpoint, StateDB, load_checkpoint, save_checkpoint
from coordinator.stepper import Stepper
from fedmq.storage.atomic import remove_stale_temporaries
from fedmq.errors import StateError
from fedmq.fl import downlink
from fedmq.model.params import flatten_params

log = logging.getLogger("fedmq.coordinator")


@dataclass(frozen=True)
class Resumed:
    """Where the run starts: the global model ``vector`` (float32 ``(d,)``), the last finished
    round (or server step), the model version, the accepted update norms (oldest first) and
    the evaluation of the model (``(test_loss, test_accuracy)``, None when unknown)."""

    vector: np.ndarray
    round: int
    version: int
    norms: list[float]
    evaluation: tuple[float | None, float | None]


def resume(config: CoordinatorConfig, db: StateDB, stepper: Stepper, privacy: PrivacyGuard | None,
           registry: DeviceRegistry, meta: Mapping[str, str], scaffold: ScaffoldServer | None = None) -> Resumed:
    """Resume from ``config.state_dir`` (module docstring); ``meta``: what the checkpoint must name;
    ``scaffold``: Scaffold's server control variate, restored from the checkpoint.

    Raises:
        StateError: the checkpoint was made for another task, ParamSpec, optimizer or
            federation, or is corrupt.
    """
    state_dir = config.state_dir
    for path in remove_stale_temporaries(state_dir, (CHECKPOINT_NAME,)):
        log.warning("removed %s, left by a run killed while writing its checkpoint", path)
    spec, optimizer = stepper.spec, stepper.optimizer
    ckpt = load_checkpoint(state_dir)
    norms: list[float] = []
    evaluation: tuple[float | None, float | None] = (None, None)
    if ckpt is None:
        vector = flatten_params(stepper.model, spec)
        save_checkpoint(state_dir, Checkpoint(0, 0, vector, {}, dict(meta), downlink_residual=stepper.residual))
        db.delete_rounds_after(0)
        round_done, version = 0, 0
    else:
        for key in ("task", "spec_hash", "optimizer", "federation"):
            if ckpt.meta.get(key) != meta[key]:
                raise StateError(f"{state_dir}/checkpoint.safetensors was made with {key} "
                                 f"{ckpt.meta.get(key)!r}, the configuration says {meta[key]!r}: "
                                 f"use another state_dir")
        if ckpt.model.shape != (spec.size,):
            raise StateError(f"{state_dir}/checkpoint.safetensors: model of {ckpt.model.shape[0]} parameters, "
                             f"expected {spec.size}")
        optimizer.load_state_arrays(ckpt.optimizer_state, spec.size)
        if scaffold is not None:
            scaffold.restore(ckpt.optimizer_state, f"{state_dir}/{CHECKPOINT_NAME}")
        vector, round_done, version = ckpt.model.copy(), ckpt.round, ckpt.version
        if privacy is not None:
            privacy.restore(ckpt.meta.get("privacy"), f"{state_dir}/{CHECKPOINT_NAME}")
        try:
            norms = [float(n) for n in json.loads(ckpt.meta.get("norms", "[]"))]
        except (ValueError, TypeError):
            raise StateError(f"{state_dir}/{CHECKPOINT_NAME}: bad 'norms' metadata") from None
        if config.downlink.compressed:
            # A checkpoint of a dense downlink starts with a zero residual.
            stepper.residual = (ckpt.downlink_residual.copy() if ckpt.downlink_residual is not None
                                else np.zeros(spec.size, dtype=np.float32))
        elif ckpt.downlink_residual is not None and np.any(ckpt.downlink_residual):
            # Switching the downlink off publishes the server model itself: nothing is lost.
            vector = downlink.server_model(vector, ckpt.downlink_residual)
        if ckpt.record is not None:
            # The checkpoint is written before the database (and before the round's model
            # is evaluated): replay its record with the evaluation the database has, or
            # evaluate the model now when the run was killed before that finished.
            rec = ckpt.record
            data = stepper.eval_data
            if rec.test_loss is None and data is not None and rec.state == "closed":
                stored = db.evaluation(rec.round)
                loss, acc = stored if stored is not None else evaluate_vector(
                    stepper.task, stepper.model, spec, vector, *data, batch_size=config.evaluation.batch_size)
                rec = replace(rec, test_loss=loss, test_accuracy=acc)
            db.write_round(rec)
            evaluation = (rec.test_loss, rec.test_accuracy)
        db.delete_rounds_after(round_done)
        log.info("resumed from round %d, model version %d", round_done, version)
    for dev in db.devices():
        registry.restore(dev)
    return Resumed(vector, round_done, version, norms, evaluation)
