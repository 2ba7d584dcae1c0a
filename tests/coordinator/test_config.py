"""Coordinator configuration: TOML, environment overrides, clear errors."""

from pathlib import Path

import msgpack
import pytest

from coordinator.config import load_config
from fedmq.codecs import CodecSpec
from fedmq.errors import ConfigError, WireError
from fedmq.wire.messages import RoundTask, TrainPlan

GOOD = """
federation = "lab"
task = "digits-mlp"
rounds = 5
state_dir = "state"

[round]
devices_per_round = 4
min_updates = 2
deadline_s = 12.5

[plan]
local_steps = 3
local_epochs = 0
lr = 0.1

[server_optimizer]
name = "fedadam"
eta = 0.01

[limits]
norm_bound = 50.0
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "coordinator.toml"
    p.write_text(text)
    return p


def test_file_is_read_and_relative_paths_follow_the_file(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), environ={})
    assert cfg.rounds == 5 and cfg.round.devices_per_round == 4 and cfg.round.over_selection == 1.0
    assert cfg.plan.local_steps == 3 and cfg.plan.lr == 0.1
    assert cfg.state_dir == tmp_path / "state"
    opt = cfg.server_optimizer.build()
    assert opt.name == "fedadam" and opt.eta == 0.01 and opt.tau == 1e-3


def test_the_default_server_optimizer_is_fedavgm_with_momentum_0_5_and_eta_1_5(tmp_path):
    # The best measured with the default codecs (Top-K 1% both ways; BENCHMARKS.md).
    opt = load_config(write(tmp_path, GOOD.replace('name = "fedadam"\neta = 0.01\n', "")), environ={}
                      ).server_optimizer.build()
    assert (opt.name, opt.momentum, opt.eta) == ("fedavgm", 0.5, 1.5)
    named = load_config(write(tmp_path, GOOD.replace('name = "fedadam"\neta = 0.01', 'name = "fedavgm"')), environ={})
    assert (named.server_optimizer.build().momentum, named.server_optimizer.build().eta) == (0.5, 1.5)
    own = load_config(write(tmp_path, GOOD.replace('name = "fedadam"\neta = 0.01', 'name = "fedavgm"\nmomentum = 0.9')),
                      environ={})
    assert own.server_optimizer.build().momentum == 0.9


def test_environment_overrides_win(tmp_path):
    env = {"FEDMQ_COORDINATOR__ROUNDS": "9", "FEDMQ_COORDINATOR__ROUND__DEVICES_PER_ROUND": "0.5",
           "fedmq_coordinator__broker__url": "mqtt://h:1", "OTHER": "x"}
    cfg = load_config(write(tmp_path, GOOD), environ=env)
    assert cfg.rounds == 9 and cfg.round.devices_per_round == 0.5 and cfg.broker.url == "mqtt://h:1"


def test_errors_name_option_and_expectation(tmp_path):
    bad = GOOD.replace("rounds = 5", "rounds = 0").replace("devices_per_round = 4", "devices_per_round = 1.5")
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, bad), environ={})
    text = str(err.value)
    assert "coordinator.toml" in text
    assert "rounds: Input should be greater than or equal to 1" in text
    assert "round.devices_per_round" in text and "(0, 1]" in text


def test_unknown_option_and_foreign_hyperparameter(tmp_path):
    with pytest.raises(ConfigError, match=r"round.deadline: unknown option"):
        load_config(write(tmp_path, GOOD.replace("deadline_s", "deadline")), environ={})
    with pytest.raises(ConfigError, match=r"'momentum'.*'fedadam'"):
        load_config(write(tmp_path, GOOD), environ={"FEDMQ_COORDINATOR__SERVER_OPTIMIZER__MOMENTUM": "0.9"})


def test_train_plan_is_validated(tmp_path):
    with pytest.raises(ConfigError, match="exactly one of local_steps / local_epochs"):
        load_config(write(tmp_path, GOOD.replace("local_epochs = 0", "local_epochs = 2")), environ={})
    with pytest.raises(ConfigError, match=r"plan: unknown option\(s\) \['momentum'\]"):
        load_config(write(tmp_path, GOOD.replace("lr = 0.1", "momentum = 0.1")), environ={})


def test_min_updates_above_count_and_bad_federation(tmp_path):
    with pytest.raises(ConfigError, match="min_updates"):
        load_config(write(tmp_path, GOOD.replace("min_updates = 2", "min_updates = 8")), environ={})
    with pytest.raises(ConfigError, match=r"federation.*\[A-Za-z0-9_.-\]"):
        load_config(write(tmp_path, GOOD.replace('"lab"', '"a/#"')), environ={})


def test_missing_file_bad_toml_and_missing_required(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml", environ={})
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "rounds = = 3"), environ={})
    with pytest.raises(ConfigError, match="task: required option is missing"):
        load_config(write(tmp_path, 'federation = "x"'), environ={})


def test_evaluation_data_choices(tmp_path):
    cfg = load_config(write(tmp_path, GOOD + '\n[evaluation]\ndata = "held.npz"\n'), environ={})
    assert cfg.evaluation.data == str(tmp_path / "held.npz")
    # Any other value is a path read by the task's loader (checked at coordinator start).
    cfg = load_config(write(tmp_path, GOOD + '\n[evaluation]\ndata = "sensors/held.csv"\n'), environ={})
    assert cfg.evaluation.data == str(tmp_path / "sensors" / "held.csv")
    assert load_config(write(tmp_path, GOOD + '\n[evaluation]\ndata = "task"\n'), environ={}).evaluation.data == "task"
    with pytest.raises(ConfigError, match="evaluation.data"):
        load_config(write(tmp_path, GOOD + '\n[evaluation]\ndata = ""\n'), environ={})


def test_broker_table_is_validated_by_the_transport_settings(tmp_path):
    (tmp_path / "pw").write_text("secret\n")
    text = GOOD + '\n[broker]\nurl = "mqtt://127.0.0.1:1884"\nusername = "coord"\npassword_file = "pw"\n'
    cfg = load_config(write(tmp_path, text), environ={"FEDMQ_COORDINATOR__BROKER__PROTOCOL": "3.1.1"})
    assert cfg.broker.port == 1884 and cfg.broker.protocol == "3.1.1"
    assert cfg.broker.credentials() == ("coord", "secret")
    with pytest.raises(ConfigError, match="broker.*ca_file.*does not exist"):
        load_config(write(tmp_path, GOOD + '\n[broker]\nurl = "mqtts://h"\nca_file = "nope.pem"\n'), environ={})
    with pytest.raises(ConfigError, match="broker.*unknown option"):
        load_config(write(tmp_path, GOOD + '\n[broker]\nhost = "h"\n'), environ={})


@pytest.mark.parametrize(("var", "closest"), [
    ("FEDMQ_COORDINATOR__ROUNDZ", "FEDMQ_COORDINATOR__ROUNDS (option 'rounds')"),
    ("FEDMQ_COORDINATOR__ROUND__DEADLINE", "FEDMQ_COORDINATOR__ROUND__DEADLINE_S (option 'round.deadline_s')"),
    ("FEDMQ_COORDINATOR__BROKER__CAFILE", "FEDMQ_COORDINATOR__BROKER__CA_FILE (option 'broker.ca_file')"),
])
def test_unknown_environment_variable_names_the_closest_option(tmp_path, var, closest):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, GOOD), environ={var: "3"})
    assert str(err.value).startswith(f"environment variable {var} matches no coordinator option; "
                                     f"did you mean {closest}?")


def test_async_mode_and_its_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from coordinator.buffered import BufferedRounds
    from coordinator.service import make_coordinator

    monkeypatch.chdir(tmp_path)  # the default state_dir, coordinator-state/, is made here, not in the checkout
    path = tmp_path / "c.toml"
    path.write_text('federation = "lab"\ntask = "digits-logreg"\n[round]\nmode = "async"\n'
                    '[async]\nbuffer_size = 4\nstaleness_exponent = 1.0\nmax_staleness = 3\n')
    cfg = load_config(path, environ={})
    assert cfg.round.mode == "async" and cfg.async_.buffer_size == 4 and cfg.async_.concurrency == 20
    assert cfg.async_.staleness().weight(3) == pytest.approx(0.25)
    assert isinstance(make_coordinator(cfg).policy, BufferedRounds)
    path.write_text('federation = "lab"\ntask = "digits-logreg"\n[round]\nmode = "later"\n[async]\nbuffer_size = 0\n')
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert "round.mode" in str(err.value) and "async.buffer_size" in str(err.value)


def test_topk_selection_is_configured_and_checked(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), environ={})
    assert cfg.plan.codec.params.topk == "global" and cfg.downlink.codec.params.topk == "global"  # the defaults
    cfg = load_config(write(tmp_path, GOOD.replace("lr = 0.1", 'lr = 0.1\ntopk = "per-tensor"')
                            + '\n[downlink]\ntopk = "per-tensor"\n'), environ={})
    assert cfg.plan.codec.params.topk == "per-tensor" and cfg.downlink.codec.params.topk == "per-tensor"
    with pytest.raises(ConfigError, match=r"plan: topk-int8: topk must be one of .*got .layer."):
        load_config(write(tmp_path, GOOD.replace("lr = 0.1", 'lr = 0.1\ntopk = "layer"')), environ={})
    with pytest.raises(ConfigError, match=r"downlink: topk-int8: topk must be one of"):
        load_config(write(tmp_path, GOOD + '\n[downlink]\ntopk = "layer"\n'), environ={})


def test_task_plan_carries_topk_and_refuses_an_unknown_one():
    task = RoundTask(federation="lab", device="pi-01", round=3, model_version=2, spec_hash="0" * 16, deadline=1.5,
                plan=TrainPlan(codec=CodecSpec.of(topk="per-tensor")))
    assert RoundTask.from_bytes(task.to_bytes()).plan.codec.params.topk == "per-tensor"
    assert RoundTask.from_bytes(RoundTask(federation="lab", device="pi-01", round=3, model_version=2, spec_hash="0" * 16,
                                deadline=1.5).to_bytes()).plan.codec.params.topk == "global"
    raw = msgpack.unpackb(task.to_bytes())
    raw["plan"]["topk"] = "layer"
    with pytest.raises(WireError, match=r"topk must be one of .*R25"):
        RoundTask.from_bytes(msgpack.packb(raw))
