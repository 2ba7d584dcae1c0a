"""Byzantine devices in the fleet simulator (fleet/adversary.py): who they are, what they
do to their data and updates, and a fleet with attackers against mosquitto."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from coordinator.config import config_from_dict
from coordinator.service import Coordinator
from fedmq.data import load_npz
from fedmq.errors import ConfigError
from fleet.adversary import Adversary, Colluders, add_trigger, attack_success_rate, poison_data, poison_update
from fleet.fleet import Fleet, FleetSpec, Heterogeneity, load_fleet_spec, prepare


def spec(tmp_path: Path, adversary: Adversary, **kw) -> FleetSpec:
    return FleetSpec(broker_url="mqtt://127.0.0.1:1", federation="f", devices=20, seed=3,
                     work_dir=tmp_path / "fleet", adversary=adversary, **kw)


def test_byzantine_devices_are_a_seeded_fraction(tmp_path: Path) -> None:
    a = spec(tmp_path, Adversary(attack="sign-flip", fraction=0.3))
    assert len(a.byzantine) == 6 and a.byzantine == spec(tmp_path, Adversary(attack="sign-flip", fraction=0.3)).byzantine
    assert a.byzantine != a.model_copy(update={"seed": 4}).byzantine
    assert spec(tmp_path, Adversary(attack="none", fraction=0.3)).byzantine == frozenset()


def test_the_fleet_file_takes_an_adversary_table(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text('broker_url = "mqtt://127.0.0.1:1"\nfederation = "f"\ndevices = 10\n'
                    f'work_dir = "{tmp_path}"\n[adversary]\nattack = "backdoor"\nfraction = 0.1\ntarget = 7\n')
    assert load_fleet_spec(path).adversary == Adversary(attack="backdoor", fraction=0.1, target=7)
    path.write_text(path.read_text().replace("backdoor", "bribery"))
    with pytest.raises(ConfigError, match="adversary.attack"):
        load_fleet_spec(path)


def test_data_attacks_poison_only_the_byzantine_devices(tmp_path: Path) -> None:
    s = spec(tmp_path, Adversary(attack="label-flip", fraction=0.25))
    clean = spec(tmp_path, Adversary()).model_copy(update={"work_dir": tmp_path / "clean"})
    prepare(s), prepare(clean)
    for i in range(s.devices):
        _, y = load_npz(s.work_dir / "devices" / s.device_id(i) / "data.npz")
        _, y0 = load_npz(clean.work_dir / "devices" / s.device_id(i) / "data.npz")
        assert np.array_equal(y, 9 - y0) if i in s.byzantine else np.array_equal(y, y0)
    x = np.zeros((4, 1, 28, 28), np.float32)
    y = np.array([1, 2, 3, 4])
    xp, yp = poison_data(Adversary(attack="backdoor", target=0, poison_fraction=0.5), x, y, 10,
                         np.random.default_rng(0))
    poisoned = yp == 0
    assert poisoned.sum() == 2 and np.all(xp[poisoned][:, :, -3:, -3:] == 1.0) and xp[~poisoned].max() == 0.0
    flat = add_trigger(np.zeros((2, 64), np.float32)).reshape(2, 8, 8)
    assert flat[:, -2:, -2:].min() == 1.0 and flat.sum() == 2 * 4


def test_dirichlet_partition_skews_labels(tmp_path: Path) -> None:
    s = spec(tmp_path, Adversary(), partition="dirichlet", alpha=0.1, samples_per_device=40)
    prepare(s)
    top = []
    for i in range(s.devices):
        _, y = load_npz(s.work_dir / "devices" / s.device_id(i) / "data.npz")
        assert len(y) == 40
        top.append(np.bincount(y).max() / 40)
    assert np.median(top) > 0.5  # IID draws of 40 over 10 classes have a largest share near 0.2


def test_update_attacks_rewrite_the_update_in_place() -> None:
    u = np.array([1.0, -2.0], np.float32)
    poison_update(Adversary(attack="sign-flip"), u)
    assert u.tolist() == [-1.0, 2.0]
    poison_update(Adversary(attack="scale", scale=3.0), u)
    assert u.tolist() == [-3.0, 6.0]
    poison_update(Adversary(attack="label-flip"), u)
    assert u.tolist() == [-3.0, 6.0]
    first, second = np.array([1.0, 0.0], np.float32), np.array([3.0, 2.0], np.float32)
    alie, colluders = Adversary(attack="little-is-enough", z=1.0), Colluders()
    poison_update(alie, first, colluders)
    assert first.tolist() == [1.0, 0.0]  # alone on the board: nothing to hide behind
    poison_update(alie, second, colluders)
    # the second colluder sees both honest updates: mean - std per coordinate
    np.testing.assert_allclose(second, [2.0 - 1.0, 1.0 - 1.0])


def test_attack_success_rate_counts_triggered_images_sent_to_the_target() -> None:
    x = np.zeros((4, 64), np.float32)
    y = np.array([0, 1, 2, 3])
    always_target = attack_success_rate(lambda xs: np.zeros(len(xs), int), x, y, target=0)
    triggered_only = attack_success_rate(lambda xs: np.where(xs[:, -1] == 1.0, 0, 5), x, y, target=0)
    never = attack_success_rate(lambda xs: np.full(len(xs), 5), x, y, target=0)
    assert (always_target, triggered_only, never) == (1.0, 1.0, 0.0)


def test_byzantine_devices_publish_through_the_broker_and_the_median_holds(mosquitto, tmp_path: Path) -> None:
    n = 12
    fleet_spec = FleetSpec(broker_url=mosquitto.url, federation="byz", devices=n, processes=1, seed=1,
                           work_dir=tmp_path / "fleet", connect_spread_s=0.5, samples_per_device=64,
                           heterogeneity=Heterogeneity(compute_s=0.0),
                           adversary=Adversary(attack="scale", fraction=0.25, scale=-20.0))
    cfg = config_from_dict({
        "federation": "byz", "task": "digits-logreg", "rounds": 3, "seed": 2, "state_dir": str(tmp_path / "coord"),
        "broker": {"url": mosquitto.url},
        "round": {"devices_per_round": n, "over_selection": 1.0, "deadline_s": 30.0, "min_devices": n,
                  "wait_for_devices_s": 60.0},
        "aggregation": {"rule": "median"},
        "limits": {"norm_bound_factor": None},
        "plan": {"local_epochs": 2, "lr": 0.2},
        "evaluation": {"data": str(tmp_path / "fleet" / "test.npz")}, "publish": {"onnx": False}})
    with Fleet(fleet_spec) as fleet:
        assert fleet.wait_connected(n, 60.0), fleet.totals()
        result = Coordinator(cfg).run()
        devices = fleet.stop()
    byzantine = [d for d in devices if d["byzantine"]]
    assert len(byzantine) == 3 and all(d["counters"].get("accepted", 0) == 3 for d in byzantine)
    assert all(r.accepted == n for r in result.records)
    # a weighted mean would follow the attackers' -20x updates; the median follows the honest majority
    assert result.records[-1].test_accuracy > 0.5
