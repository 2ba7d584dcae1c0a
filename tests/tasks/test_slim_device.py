"""The device runs with the base install only: matplotlib, scikit-learn, scipy, pandas,
sktime, amqtt, onnx and onnxscript blocked from import in a child process (cryptography is
a base dependency since devices seal their client updates: fedmq.security.sealing)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from fedmq.model.modelio import export_onnx
from fedmq.tasks import get_task

from conftest import child_env  # type: ignore[import-not-found]

BLOCKED = ("matplotlib", "sklearn", "scipy", "pandas", "sktime", "amqtt", "onnx", "onnxscript", "tomli_w")

BLOCKER = f'''
import sys
BLOCKED = {BLOCKED!r}
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is not part of the device install")
        return None
sys.meta_path.insert(0, Blocker())
'''


def test_edge_client_runs_without_the_extras(tmp_path: Path) -> None:
    site = tmp_path / "blocker"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    task = get_task("userpkg.sensors:classify")
    export_onnx(task.build_model(0), task, tmp_path / "model.onnx")
    np.save(tmp_path / "x.npy", task.reference_split()[2][:3])
    script = f'''
import sys, numpy as np
try:
    import matplotlib
except ImportError:
    pass
else:
    sys.exit("the blocker did not block")
import edge_client.agent
from fedmq.fl.training import train_local
from fedmq.wire.messages import TrainPlan
from fedmq.tasks import get_task
for name in ("mnist-cnn", "userpkg.sensors:classify"):
    task = get_task(name)
x, y, _, _ = task.reference_split()
r = train_local(task.build_model(0), x, y, TrainPlan(local_epochs=1), rng=np.random.default_rng(0), task=task)
print("trained", r.steps)
'''
    env = child_env(site)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and "trained" in out.stdout, out.stderr
    for args in (["edge", "--help"], ["edge", "predict", "--model", str(tmp_path / "model.onnx"),
                                      "--input", str(tmp_path / "x.npy")]):
        out = subprocess.run([sys.executable, "-m", "fedmq.cli", *args], capture_output=True, text=True, env=env,
                             timeout=120)
        assert out.returncode == 0, out.stderr
    assert len(out.stdout.split()) == 3
