"""``fedmq edge``: run the device agent, predict with the global model, show local state.

Commands:

* ``fedmq edge run [-c FILE]``: the agent (see :mod:`edge_client.agent`); without ``-c``
  the configuration is ``$CONFIGURATION_DIRECTORY/edge.toml`` (systemd).
* ``fedmq edge predict --input X.npy [--model FILE.onnx | -c FILE]``: onnxruntime inference
  with an ONNX export of the global model: the file given, or the latest export fetched
  from the broker (``fedmq/F/onnx/latest``). Prints one predicted class per line (a
  regression model: its predicted values, space-separated, one sample per line).
* ``fedmq edge status [-c FILE]``: the device's durable state as JSON (read only).

Exit codes: 0 success; 2 bad configuration, data, model or state (the message names the
option or path; systemd does not restart on 2); 1 any other fedmq error (e.g. the broker
is unreachable; systemd restarts the agent).
"""

from __future__ import annotations

import json
import signal
import threading
from dataclasses import asdict
from pathlib import Path
from typing import NoReturn, Optional

import numpy as np
import typer

from edge_client.config import load_config
from fedmq.cli import LogLevel, run_app, setup_logging
from fedmq.errors import ConfigError, DataError, FedmqError, StateError, WireError

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="fedmq edge client: the device agent of a federation.")

ConfigOption = typer.Option(None, "-c", "--config", help="edge.toml (default $CONFIGURATION_DIRECTORY/edge.toml)")

#: Errors a restart cannot fix (systemd's RestartPreventExitStatus=2).
_USER_ERRORS = (ConfigError, DataError, StateError, WireError)


def _fail(exc: FedmqError) -> NoReturn:
    typer.echo(f"fedmq edge: error: {exc}", err=True)
    raise typer.Exit(2 if isinstance(exc, _USER_ERRORS) else 1)


@app.command()
def run(config: Optional[Path] = ConfigOption,
        log_level: LogLevel = typer.Option("INFO", case_sensitive=False,
                                           help="DEBUG, INFO, WARNING or ERROR")) -> None:
    """Run the device agent until SIGTERM / SIGINT."""
    setup_logging(log_level, fmt="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        from edge_client.agent import EdgeAgent

        agent = EdgeAgent(load_config(config))
        agent.run(stop)
    except FedmqError as exc:
        _fail(exc)


@app.command()
def predict(input: Path = typer.Option(..., "--input", "-i", help="samples, .npy float (N, *input_shape)"),
            model: Optional[Path] = typer.Option(None, "--model", "-m", help="ONNX model file"),
            config: Optional[Path] = ConfigOption,
            save_logits: Optional[Path] = typer.Option(None, help="also write the logits (N, classes) to this .npy"),
            timeout: float = typer.Option(30.0, help="seconds to wait for the model from the broker")) -> None:
    """Predict with the global model's ONNX export: classes of the samples in --input (a
    regression model: its predicted values)."""
    from fedmq.model.inference import OnnxPredictor

    try:
        x = _load_npy(input)
        if model is not None:
            predictor = OnnxPredictor(model)
        else:
            from edge_client.agent import fetch_latest_onnx

            predictor = OnnxPredictor(fetch_latest_onnx(load_config(config), timeout=timeout))
        if tuple(x.shape) == predictor.input_shape:
            x = x[None]
        logits = predictor.logits(x)
    except FedmqError as exc:
        _fail(exc)
    if save_logits is not None:
        np.save(save_logits, logits, allow_pickle=False)
    if predictor.kind == "regression":
        rows = logits.reshape(len(logits), -1)
        typer.echo("\n".join(" ".join(f"{v:.7g}" for v in row) for row in rows))
    else:
        typer.echo("\n".join(str(int(c)) for c in logits.argmax(axis=1)))


def _load_npy(path: Path) -> np.ndarray:
    try:
        x = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: input file not found") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npy array of numbers ({exc})") from None
    if not isinstance(x, np.ndarray) or not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise DataError(f"{path}: expected a numeric .npy array")
    return x.astype(np.float32, copy=False)


@app.command()
def status(config: Optional[Path] = ConfigOption) -> None:
    """Print the durable state (last round, update in flight, cached models) as JSON."""
    from edge_client.state import DeviceState

    try:
        cfg = load_config(config)
        state = DeviceState(cfg.state_dir, readonly=True)
    except FedmqError as exc:
        _fail(exc)
    rec = state.record
    out = {"device": cfg.device_id, "federation": cfg.federation, "task": cfg.task,
           "state_dir": str(cfg.state_dir), "spec_hash": rec.spec_hash, "last_round": rec.last_round,
           "seq": rec.seq, "residual_file": rec.residual_file,
           "inflight": None if rec.inflight is None else asdict(rec.inflight),
           "cached_models": state.cached_versions()}
    typer.echo(json.dumps(out, indent=2))


def main() -> None:
    run_app(app, "fedmq edge")
