"""Robust aggregation against Byzantine devices, through mosquitto with ``fedmq fleet``.

For every cell (aggregation rule x attack x Byzantine fraction) one ``fedmq fleet run -c
fleet.toml --coordinator coordinator.toml`` runs in its own process against one mosquitto
on loopback: virtual devices (the real edge agent; the Byzantine ones poison their data
or their update, fleet/adversary.py) on a Dirichlet(``alpha``) label-skewed split, each
with its own broker account (password file, the shipped ACL, client id bound to the user
name; ``--anonymous`` to skip), the
real coordinator with ``[aggregation] rule``, the shipped defaults both ways (Top-K +
int8 + error feedback up, the compressed downlink, FedAvgM, the data-set norm bound).
Reported per cell: the final test accuracy (the coordinator's own evaluation), the
backdoor's attack success rate on triggered test images (``backdoor`` only), accepted and
rejected client updates.

Fraction 0 runs once per rule (no attacker: what the rule costs with honest devices).

``python -m benchmarks.robust`` runs the issue's size (100 devices, 20 per round, 30
rounds, digits-logreg); ``--quick`` a reduced one that takes minutes on 2 cores; every
size is a flag (``--task mnist-cnn --data mnist10k --samples 100`` for the CNN).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from broker import credentials as cred
from fleet.launch import ROOT, Broker, child_env, coordinator_options, merge_tables, start_broker, write_toml

RULES = ("weighted-mean", "median", "trimmed-mean", "krum", "multi-krum", "centered-clipping")
ATTACKS = ("sign-flip", "scale", "label-flip", "little-is-enough", "backdoor")
#: digits-logreg's plan in the scale benchmark (5 local epochs, lr 0.3, batch 16); codec defaults.
PLANS: dict[str, dict[str, Any]] = {
    "digits-logreg": {"local_epochs": 5, "lr": 0.3, "batch_size": 16},
    "mnist-cnn": {"local_epochs": 1, "lr": 0.05, "batch_size": 32},
}


COORDINATOR = "robust-coordinator"


def _accounts(work: Path, devices: int, feds: list[str]) -> tuple[str, Path]:
    """Broker accounts: one per device id (``vd-<index>``, the fleet's ids) and the
    coordinator's, granted the ``feds`` trees; the devices' rights are the shipped ACL's
    patterns on their user name. Returns mosquitto's security section and the fleet's
    ``credentials_dir``."""
    passwd, acl, creds = work / "auth" / "passwd", work / "auth" / "acl", work / "creds"
    for name in [f"vd-{i:05d}" for i in range(devices)] + [COORDINATOR]:
        password = cred.generate_password()
        cred.set_password(passwd, name, password, hasher="fedmq")
        (creds / name).mkdir(parents=True)
        (creds / name / "username").write_text(name + "\n")
        (creds / name / "password").write_text(password + "\n")
    cred.write_acl(acl, {COORDINATOR: feds})
    conf = (f"allow_anonymous false\npassword_file {passwd}\nacl_file {acl}\n"
            "use_username_as_clientid true\n")
    return conf, creds


def _cell(args: argparse.Namespace, work: Path, broker: Broker, rule: str, attack: str, fraction: float,
          index: int, creds: Path | None) -> dict[str, Any]:
    fed = f"rb{index}"
    folder = work / fed
    folder.mkdir(parents=True)
    fleet: dict[str, Any] = {
        "broker_url": broker.url, "federation": fed, "task": args.task, "devices": args.devices,
        "processes": args.processes, "data": args.data, "samples_per_device": args.samples, "seed": args.seed,
        "work_dir": str(folder / "fleet"), "partition": "dirichlet", "alpha": args.alpha,
        "adversary": {"attack": attack, "fraction": fraction, "target": 0}}
    account: dict[str, Any] = {}
    if creds is not None:
        fleet["credentials_dir"] = str(creds)
        account = {"broker": {"username_file": str(creds / COORDINATOR / "username"),
                              "password_file": str(creds / COORDINATOR / "password")}}
    fleet_file = write_toml(folder / "fleet.toml", fleet)
    plan = dict(PLANS.get(args.task, {}))
    if args.density is not None:
        plan["density"] = args.density
    if args.dense_below is not None:
        plan["dense_below"] = args.dense_below
    coord_file = write_toml(folder / "coordinator.toml", merge_tables(coordinator_options(
        federation=fed, task=args.task, broker=broker, rounds=args.rounds, seed=args.seed,
        state_dir=folder / "coordinator", evaluation_data=folder / "fleet" / "test.npz", publish_onnx=False,
        round={"devices_per_round": args.per_round, "over_selection": 1.0, "deadline_s": args.deadline,
               "min_devices": args.devices, "wait_for_devices_s": 120.0},
        plan=plan, aggregation={"rule": rule, "unsent": args.unsent}), account))
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "fedmq.cli", "fleet", "run", "-c", str(fleet_file),
                           "--coordinator", str(coord_file), "--connect-timeout", "300"],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=args.cell_timeout)
    out: dict[str, Any] = {"rule": rule, "attack": attack, "fraction": fraction,
                           "wall_s": round(time.monotonic() - t0, 1)}
    summary_path = folder / "fleet" / "summary.json"
    if proc.returncode != 0 or not summary_path.is_file():
        out["error"] = (proc.stderr or proc.stdout)[-2000:]
        return out
    rounds = json.loads(summary_path.read_text())["rounds"]
    evaluated = [r for r in rounds if r.get("test_accuracy") is not None]
    out["rounds"] = len(rounds)
    out["accuracy"] = round(evaluated[-1]["test_accuracy"], 4) if evaluated else None
    out["accepted"] = sum(r["accepted"] for r in rounds)
    out["rejected"] = sum(r["rejected_total"] for r in rounds)
    if attack == "backdoor":
        out["attack_success"] = round(_attack_success(args.task, folder), 4)
    return out


def _attack_success(task_name: str, folder: Path) -> float:
    """The backdoor's success rate on the final global model (the coordinator's checkpoint)."""
    import torch

    from coordinator.state import load_checkpoint
    from fedmq.data import load_npz
    from fedmq.model.params import load_params
    from fedmq.tasks import get_task
    from fleet.adversary import attack_success_rate

    ckpt = load_checkpoint(folder / "coordinator")
    assert ckpt is not None, folder
    model = get_task(task_name).build_model(0)
    load_params(model, ckpt.model)
    model.eval()
    x, y = load_npz(folder / "fleet" / "test.npz")

    def predict(xs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(np.ascontiguousarray(xs, dtype=np.float32))).argmax(1).numpy()

    return attack_success_rate(predict, x, y, target=0)


def run_table(args: argparse.Namespace) -> dict[str, Any]:
    """Every cell of ``args.rules`` x ``args.attacks`` x ``args.fractions`` (module docstring)."""
    cells = [(rule, "none", 0.0) for rule in args.rules if 0.0 in args.fractions]
    cells += [(rule, attack, f) for f in args.fractions if f > 0 for attack in args.attacks for rule in args.rules]
    work = Path(tempfile.mkdtemp(prefix="fedmq-robust-"))
    conf, creds = (None, None) if args.anonymous else _accounts(work, args.devices, [f"rb{i}" for i in range(len(cells))])
    broker = start_broker("mosquitto", work, mosquitto_conf="max_connections -1", mosquitto_security=conf)
    rows = []
    try:
        for i, (rule, attack, f) in enumerate(cells):
            row = _cell(args, work, broker, rule, attack, f, i, creds)
            print(json.dumps(row), flush=True)
            if "error" not in row:
                # A finished cell's devices keep model copies and residuals (about 2 GB a
                # mnist-cnn cell): 66 of them would fill the disk. A failed one stays to be read.
                shutil.rmtree(work / f"rb{i}")
            rows.append(row)
    finally:
        broker.close()
    setup = {k: v for k, v in vars(args).items() if k not in ("out", "quick")}
    columns, body = grid(rows)
    title = (f"Final test accuracy % (backdoor: / attack success %), {args.task}, {args.devices} devices, "
             f"{args.per_round} a round, {args.rounds} rounds, Dirichlet({args.alpha})")
    return {"setup": setup, "rows": rows, "table": table(rows),
            "tables": [{"title": title, "columns": columns, "rows": body}]}


def grid(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """``(columns, rows)``: one row per (attack, fraction), one column per rule; accuracy in
    %, and the attack success rate in % after a slash for the backdoor."""
    rules = list(dict.fromkeys(r["rule"] for r in rows))
    keys = list(dict.fromkeys((r["attack"], r["fraction"]) for r in rows))
    by = {(r["rule"], r["attack"], r["fraction"]): r for r in rows}
    out = []
    for attack, f in keys:
        cells = []
        for rule in rules:
            r = by.get((rule, attack, f))
            if r is None or r.get("accuracy") is None:
                cells.append("error" if r is not None else "")
                continue
            text = f"{100 * r['accuracy']:.1f}"
            if "attack_success" in r:
                text += f" / {100 * r['attack_success']:.0f}"
            cells.append(text)
        out.append([attack, f"{100 * f:.0f}%", *cells])
    return ["attack", "Byzantine", *rules], out


def table(rows: list[dict[str, Any]]) -> str:
    """:func:`grid` as Markdown."""
    columns, body = grid(rows)
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="reduced size: 40 devices, 10 per round, 15 rounds, 2 worker processes")
    p.add_argument("--task", default="digits-logreg")
    p.add_argument("--data", default="digits", help="fleet data: digits or mnist10k")
    p.add_argument("--devices", type=int, default=100)
    p.add_argument("--per-round", type=int, default=20)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--samples", type=int, default=64, help="local samples per device")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label skew")
    p.add_argument("--processes", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--deadline", type=float, default=60.0, help="round deadline, seconds")
    p.add_argument("--rules", type=lambda s: s.split(","), default=list(RULES))
    p.add_argument("--attacks", type=lambda s: s.split(","), default=list(ATTACKS))
    p.add_argument("--fractions", type=lambda s: [float(x) for x in s.split(",")], default=[0.0, 0.1, 0.3])
    p.add_argument("--unsent", default="abstain", help="[aggregation] unsent for median / trimmed mean")
    p.add_argument("--density", type=float, default=None, help="[plan] density (default: the shipped one)")
    p.add_argument("--dense-below", type=int, default=None, help="[plan] dense_below (default: the shipped one)")
    p.add_argument("--anonymous", action="store_true", help="no broker accounts (anonymous mosquitto)")
    p.add_argument("--cell-timeout", type=float, default=1800.0, help="seconds one cell may take")
    p.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    return p


QUICK = {"devices": 40, "per_round": 10, "rounds": 15, "processes": 2}


def run(quick: bool = True) -> dict[str, Any]:
    """The harness entry (benchmarks/harness.py): the reduced or the issue's size."""
    args = parser().parse_args(["--quick"] if quick else [])
    if quick:
        vars(args).update(QUICK)
    return run_table(args)


def main() -> None:
    args = parser().parse_args()
    if args.quick:
        defaults = parser().parse_args([])
        for k, v in QUICK.items():
            if getattr(args, k) == getattr(defaults, k):
                setattr(args, k, v)
    result = run_table(args)
    print(result["table"])
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
