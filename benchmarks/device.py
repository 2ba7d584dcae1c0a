"""Device cost of one round: McMahan MNIST CNN (task ``mnist-cnn``), 800 local samples
(client 0 of the MNIST-10k IID split over 10 devices), 1 local epoch, batch 32, on one core.

Measured in a fresh child process pinned to one CPU with one torch thread, so that its peak
resident set size is the device's alone: local training time, compression time (error
feedback + topk-int8 encode + decode of what is sent), envelope encode time, durable
commit time (residual + update written atomically, fsync included), bytes sent per round,
and the process's peak RSS. Targets (issue 5): compression under 5% of training time,
peak RSS under 400 MB.

Also (issue 13): the peak RSS of a predict-only device (onnxruntime on the CNN's ONNX
export, 1,000 images, :mod:`fedmq.model.inference` without torch; target under 120 MB) and the
installed size of the device install (the base dependencies of pyproject.toml and what they
require, summed over each installed distribution's files).

``python -m benchmarks.device`` prints the JSON result; ``run(quick)`` returns it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLAN = dict(local_epochs=1, local_steps=0, batch_size=32, lr=0.05, density=0.01)


def _rss_mb() -> float:
    """Peak resident memory of this process, MB (VmHWM). Not getrusage's ru_maxrss: Linux
    carries that across fork + exec, so a worker started by a big parent reports the
    parent's peak."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    raise RuntimeError("VmHWM missing from /proc/self/status")


def _worker(rounds: int, data: str) -> dict:
    """One device, ``rounds`` rounds, in this process (the child), on the .npz at ``data``."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    import torch

    torch.set_num_threads(1)
    import edge_client.agent  # noqa: F401  - the agent's imports (paho, onnx-free path) count in RSS
    from edge_client.localdata import load_local_data
    from edge_client.state import DeviceState
    from fedmq.fl.client import package_update, train_for_task
    from fedmq.fl.training import split_holdout
    from fedmq.wire.messages import RoundTask, TrainPlan
    from fedmq.model.params import ParamSpec
    from fedmq.tasks import get_task

    rss_after_import = _rss_mb()
    task = get_task("mnist-cnn")
    x, y = load_local_data(data, task)
    xt, yt, _, _ = split_holdout(x, y, 0.0, 0)
    model = task.build_model(0)
    spec = ParamSpec.from_module(model)
    plan = TrainPlan.from_table(PLAN)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedmq-bench-device-") as tmp:
        state = DeviceState(tmp)
        feedback = state.load_feedback(spec)
        for r in range(rounds):
            task = RoundTask("bench", "dev-0", r + 1, r, spec.hash, 0.0, plan)
            result = train_for_task(model, xt, yt, task, seed=0)
            t0 = time.perf_counter()
            data = package_update(result, task, federation="bench", device="dev-0", spec=spec, feedback=feedback,
                                  seed=0).data
            t1 = t2 = time.perf_counter()  # compress_s covers the envelope too
            state.begin_update(feedback, data, round=r, transfer_id=f"{r:032x}", base_version=r, deadline=0.0)
            state.commit()
            t3 = time.perf_counter()
            rows.append({"round": r, "train_s": result.seconds, "steps": result.steps,
                         "compress_s": t1 - t0, "commit_s": t3 - t2,
                         "bytes_sent": len(data), "train_loss": result.metrics["train_loss"]})
    return {"samples": int(len(yt)), "parameters": spec.size, "dense_bytes": 4 * spec.size, "rows": rows,
            "rss_after_import_mb": rss_after_import, "peak_rss_mb": _rss_mb(),
            "torch": torch.__version__, "cpu": _cpu()}


def _predict_worker(model: str, inputs: str) -> dict:
    """Predict-only device (the child): onnxruntime alone, no torch."""
    import numpy as np

    from fedmq.model.inference import OnnxPredictor

    x = np.load(inputs, allow_pickle=False)
    started = time.perf_counter()
    classes = OnnxPredictor(model).predict(x)
    return {"samples": int(len(classes)), "seconds": time.perf_counter() - started, "peak_rss_mb": _rss_mb(),
            "torch_imported": "torch" in sys.modules}


#: What a device installs: the base dependencies of pyproject.toml.
DEVICE_REQUIREMENTS = ("torch", "numpy", "msgpack", "paho-mqtt", "onnxruntime", "safetensors", "typer", "pydantic")


def install_size() -> dict:
    """Installed bytes of the device install: every distribution the base requirements pull
    in (their unconditional requirements, transitively), by the sizes of their files."""
    import re
    from importlib.metadata import PackageNotFoundError, distribution

    seen: dict[str, int] = {}
    todo = list(DEVICE_REQUIREMENTS)
    while todo:
        name = re.split(r"[ ;<>=!~\[(]", todo.pop(), maxsplit=1)[0].lower().replace("_", "-")
        if name in seen:
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        size = 0
        for f in dist.files or []:
            try:
                size += f.locate().stat().st_size
            except OSError:
                pass
        seen[name] = size
        todo += [r for r in (dist.requires or []) if "extra ==" not in r]
    return {"total_mb": sum(seen.values()) / 1e6, "by_package_mb": {k: v / 1e6 for k, v in sorted(
        seen.items(), key=lambda kv: -kv[1])}}


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def run(quick: bool) -> dict:
    """Measure ``2`` (quick) or ``5`` rounds in a child process; returns the figures
    (seconds, bytes, MB) with the median per-round values at the top level."""
    import numpy as np

    from fedmq.data import mnist10k_partitions, mnist10k_split, save_npz_atomic

    rounds = 2 if quick else 5
    x_train, y_train, _, _ = mnist10k_split()
    part = mnist10k_partitions(10, "iid", y_train=y_train)[0]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with tempfile.TemporaryDirectory(prefix="fedmq-bench-device-") as tmp:
        # The device holds only its own partition, as an .npz like the demo writes.
        data = Path(tmp) / "part.npz"
        save_npz_atomic(data, x_train[part], y_train[part])
        proc = subprocess.run([sys.executable, "-m", "benchmarks.device", "--worker", str(rounds), str(data)],
                              capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"device benchmark worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        from fedmq.model.modelio import export_onnx
        from fedmq.tasks import get_task

        task = get_task("mnist-cnn")
        export_onnx(task.build_model(0), task, Path(tmp) / "model.onnx")
        np.save(Path(tmp) / "x.npy", x_train[:1000])
        pred = subprocess.run([sys.executable, "-m", "benchmarks.device", "--predict", str(Path(tmp) / "model.onnx"),
                               str(Path(tmp) / "x.npy")], capture_output=True, text=True, env=env, cwd=ROOT,
                              timeout=600)
        if pred.returncode != 0:
            raise RuntimeError(f"predict worker failed ({pred.returncode}):\n{pred.stderr[-3000:]}")
    raw = json.loads(proc.stdout.strip().splitlines()[-1])
    predict = json.loads(pred.stdout.strip().splitlines()[-1])
    size = install_size()
    rows = raw["rows"]

    def median(key: str) -> float:
        return float(sorted(r[key] for r in rows)[len(rows) // 2])

    train_s, compress_s = median("train_s"), median("compress_s")
    bytes_sent = median("bytes_sent")
    result = {
        "task": "mnist-cnn", "samples": raw["samples"], "parameters": raw["parameters"],
        "plan": PLAN, "rounds": rounds, "cpu": raw["cpu"], "torch": raw["torch"], "threads": 1,
        "train_s": train_s, "compress_s": compress_s, "compress_fraction_of_train": compress_s / train_s,
        "commit_s": median("commit_s"),
        "bytes_sent": int(bytes_sent), "compression_ratio": raw["dense_bytes"] / bytes_sent,
        "peak_rss_mb": raw["peak_rss_mb"], "rss_after_import_mb": raw["rss_after_import_mb"],
        "predict_peak_rss_mb": predict["peak_rss_mb"], "predict_seconds_1000": predict["seconds"],
        "predict_torch_imported": predict["torch_imported"], "device_install_mb": size["total_mb"],
        "device_install_by_package_mb": size["by_package_mb"],
        "targets_met": {"compress_under_5pct_of_train": compress_s / train_s < 0.05,
                        "peak_rss_under_400mb": raw["peak_rss_mb"] < 400,
                        "predict_rss_under_120mb": predict["peak_rss_mb"] < 120},
    }
    result["tables"] = [{
        "title": "Per round, one core (median over rounds)",
        "columns": ["train (s)", "compress + envelope (s)", "compress / train", "commit (s)", "bytes sent",
                    "ratio vs dense fp32", "peak RSS (MB)"],
        "rows": [[f"{train_s:.2f}", f"{compress_s:.3f}", f"{compress_s / train_s:.1%}",
                  f"{result['commit_s']:.3f}", f"{int(bytes_sent):,}", f"{result['compression_ratio']:.0f}x",
                  f"{raw['peak_rss_mb']:.0f}"]],
    }, {
        "title": "Device install and predict-only device",
        "columns": ["device install (MB)", "largest packages (MB)", "predict peak RSS (MB)", "predict 1,000 images (s)"],
        "rows": [[f"{size['total_mb']:.0f}", ", ".join(f"{k} {v:.0f}" for k, v in list(size["by_package_mb"].items())[:4]),
                  f"{predict['peak_rss_mb']:.0f}", f"{predict['seconds']:.3f}"]],
    }]
    result["notes"] = [f"{raw['samples']} samples, 1 epoch of batch 32 ({rows[0]['steps']} steps), density 1%, "
                       f"{raw['parameters']:,} parameters; CPU {raw['cpu']}, torch {raw['torch']}.",
                       "Peak RSS is the child process's VmHWM (imports, its 800-sample .npz, model, residual, "
                       "state files); the first round includes torch's warm-up."]
    return result


def smoke() -> dict:
    return run(quick=True)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--predict":
        print(json.dumps(_predict_worker(sys.argv[2], sys.argv[3])))
    elif len(sys.argv) == 4 and sys.argv[1] == "--worker":
        print(json.dumps(_worker(int(sys.argv[2]), sys.argv[3])))
    else:
        print(json.dumps(run(quick="--full" not in sys.argv), indent=2))
