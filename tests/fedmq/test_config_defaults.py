"""One default per option: every default is read from one place, the configuration models
(through the shared loader's option catalogue), and the documented defaults must agree."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import pytest

from coordinator.config import SCHEMA as COORDINATOR
from coordinator.config import load_config as load_coordinator
from edge_client.config import SCHEMA as EDGE
from edge_client.config import load_config as load_edge
from fedmq.config.loader import REQUIRED
from fedmq.fl.server_opt import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi
from fedmq.project import new_project

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"

#: Options whose default is computed from other options or the surroundings: the model holds
#: None (or REQUIRED), the docs say how it is computed.
COMPUTED = {
    "round.min_devices": None,  # min_updates
    "privacy.rounds": None,  # the top-level rounds
    "privacy.count_stddev": None,  # max(expected participants / 20, sigma)
    "state_dir@edge": REQUIRED,  # $STATE_DIRECTORY under systemd
}
#: Tables documented in prose, owned by their own modules' defaults (the codec spec).
PROSE = ("plan.", "server_optimizer.")


def _rows(text: str, header: str, column: int = 1) -> list[tuple[str, list[str], str]]:
    """``(section, option names, cell of column)`` of every table with ``header`` under a
    ``### `[section]` `` or ``### Top level`` heading."""
    out: list[tuple[str, list[str], str]] = []
    section, in_table = "", False
    for line in text.splitlines():
        heading = re.match(r"### (?:`\[(\w+)\]`|Top level)", line)
        if heading:
            section, in_table = heading.group(1) or "", False
        elif line.startswith("| ") and line.split("|")[1].strip() == header.split("|")[1].strip():
            in_table = line.replace(" ", "") == header.replace(" ", "")
        elif in_table and line.startswith("|") and not line.startswith("| ---"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            out.append((section, re.findall(r"`([^`]+)`", cells[0]), cells[column]))
        elif not line.startswith("|"):
            in_table = False
    return out


def _value(text: str) -> Any:
    text = text.strip().strip("`").strip()
    if text in ("required", "unset"):
        return {"required": REQUIRED, "unset": None}[text]
    if text in ("true", "false"):
        return text == "true"
    if text == "[]":
        return ()
    try:
        return float(text)
    except ValueError:
        return text.strip('"')


def _same(doc: Any, model: Any) -> bool:
    if isinstance(doc, float) and isinstance(model, (int, float)) and not isinstance(model, bool):
        return math.isclose(doc, model)
    if doc == () and isinstance(model, (tuple, list)):
        return len(model) == 0
    return doc == model or (isinstance(doc, str) and str(model) == doc)


def _documented(schema: Any, doc: Path, header: str, edge: bool) -> dict[str, Any]:
    documented: dict[str, Any] = {}
    for section, names, cell in _rows(doc.read_text(encoding="utf-8"), header):
        if edge:
            section = "broker" if names and names[0] == "[broker]" else ""
            names = [n for n in names if n != "[broker]"]
            cell = cell if cell.startswith("as in ") else cell.rsplit(", ", 1)[-1]
        cells = cell.split(", ") if len(names) > 1 and len(cell.split(", ")) == len(names) else [cell] * len(names)
        for name, value in zip(names, cells):
            documented[f"{section}.{name}" if section else name] = value
    return documented


@pytest.mark.parametrize(("schema", "doc", "header", "edge"), [
    (COORDINATOR, DOCS / "coordinator.md", "| option | default | meaning |", False),
    (EDGE, DOCS / "edge-client.md", "| option | type, default | meaning |", True),
], ids=["coordinator", "edge"])
def test_every_documented_default_is_the_models(schema, doc, header, edge):
    documented = _documented(schema, doc, header, edge)
    wrong, missing = [], []
    for name, option in schema.options.items():
        if name.startswith(PROSE):
            continue
        if name not in documented:
            missing.append(name)
            continue
        cell = documented[name]
        if cell.startswith("as in docs/coordinator.md"):
            expected = COORDINATOR.options[name].default
            if not _same(expected, option.default):
                wrong.append(f"{name}: {option.default!r}, coordinator's {expected!r}")
            continue
        key = f"{name}@edge" if edge and f"{name}@edge" in COMPUTED else name
        if key in COMPUTED:
            assert option.default is COMPUTED[key], name
            continue
        if not _same(_value(cell), option.default):
            wrong.append(f"{name}: documented {cell!r}, the model's default is {option.default!r}")
    assert not missing, f"options missing from {doc.name}: {missing}"
    assert not wrong, f"{doc.name} disagrees with the configuration models:\n" + "\n".join(wrong)
    unknown = sorted(set(documented) - set(schema.options))
    assert not unknown, f"{doc.name} documents options the configuration does not have: {unknown}"


def test_the_server_optimizers_documented_defaults_are_the_classes():
    symbols = {"η": "eta", "μ": "momentum", "β1": "beta1", "β2": "beta2", "τ": "tau"}
    classes = {"fedavg": FedAvg, "fedavgm": FedAvgM, "fedadagrad": FedAdagrad, "fedyogi": FedYogi, "fedadam": FedAdam}
    rows = {names[0]: cell for _, names, cell in _rows((DOCS / "coordinator.md").read_text(encoding="utf-8"),
                                                      "| name | step | defaults |", column=2)}
    assert set(rows) == set(classes)
    for name, cls in classes.items():
        defaults = {symbols[s]: float(v) for s, v in re.findall(r"(η|μ|β1|β2|τ) ([0-9.e+-]+)", rows[name])}
        built = cls()
        assert defaults and all(getattr(built, k) == v for k, v in defaults.items()), (name, defaults, built)
    # The coordinator's [server_optimizer] adds no defaults of its own: the class's are the ones.
    opt = COORDINATOR.model(federation="f", task="t").server_optimizer.build()
    assert isinstance(opt, FedAvgM) and (opt.momentum, opt.eta) == (FedAvgM().momentum, FedAvgM().eta)


def test_project_templates_and_deploy_examples_use_current_names_only(tmp_path, caplog):
    folder = new_project("demo", tmp_path)
    creds = tmp_path / "creds"
    creds.mkdir()
    for name in ("username", "password", "ca.crt", "client.crt", "client.key"):
        (creds / name).write_text("x\n")
    with caplog.at_level(logging.WARNING, logger="fedmq.config.loader"):
        edge = load_edge(folder / "edge.toml", environ={})
        coordinator = load_coordinator(folder / "coordinator.toml", environ={})
        load_edge(ROOT / "deploy" / "edge.toml.example",
                  environ={"CREDENTIALS_DIRECTORY": str(creds), "STATE_DIRECTORY": str(tmp_path / "state")})
        load_coordinator(ROOT / "deploy" / "coordinator.toml.example", environ={})
    assert [r.getMessage() for r in caplog.records] == []
    assert edge.broker.url == coordinator.broker.url == "mqtt://127.0.0.1:1883"
