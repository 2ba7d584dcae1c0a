"""Per-site bridge routes: a site broker's bridge that carries down only what its devices need.

The shipped bridge (broker/bridge/site-bridge.conf) subscribes the central broker to
``fedmq/+/task/#``, ``receipt/#`` and ``xfer/#`` for every site, so each site broker
receives (and stores, tasks being retained) every device's tasks, receipts and chunk
resend requests. These three kinds name their device as the last topic level
(fedmq/wire/topics.py), so a bridge that lists its own devices' topics receives only theirs;
the global model chain, ONNX exports and round announcements are for every device and
still cross every bridge, once.

The same list narrows the bridge account's ACL block on the central broker: it may read the
tasks, receipts and resend requests of its own devices only, and write the statuses and
client updates of its own devices only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from fedmq.errors import ConfigError
from fedmq.wire.topics import ROOT, check_id

BRIDGE_DIR = Path(__file__).resolve().parent / "bridge"
SITE_BRIDGE_TEMPLATE = BRIDGE_DIR / "site-bridge.conf"

#: Kinds of topic the coordinator publishes to one device (``fedmq/F/KIND/DEVICE``).
PER_DEVICE_DOWN = ("task", "receipt", "xfer", "secagg-to")
#: Kinds of topic a device writes (``fedmq/F/status/DEVICE``, ``fedmq/F/update/DEVICE/...``,
#: ``fedmq/F/secagg/DEVICE/...`` in secure rounds).
PER_DEVICE_UP = (("status", ""), ("update", "/#"), ("secagg", "/#"))
#: What every device needs, whichever site it is on.
SHARED_DOWN = ("model/#", "onnx/#", "round")

_MAX_DEVICES = 100_000


def check_devices(devices: Iterable[str]) -> list[str]:
    """The site's device ids, checked, without duplicates, in the given order.

    Raises:
        ConfigError: an id is not a valid fedmq id (fedmq.wire.topics.check_id), the list is
            empty, or it has more than 100,000 ids (each is one subscription of the
            bridge on the central broker).
    """
    seen: dict[str, None] = {}
    for device in devices:
        seen.setdefault(check_id(device.strip(), "device id"), None)
        if len(seen) > _MAX_DEVICES:
            raise ConfigError(f"more than {_MAX_DEVICES} devices behind one bridge")
    if not seen:
        raise ConfigError("a routed bridge needs at least one device id")
    return list(seen)


def _fed(federation: str | None) -> str:
    return "+" if federation is None else check_id(federation, "federation id")


def down_topics(devices: Sequence[str], federation: str | None = None) -> list[str]:
    """Topic filters the site receives from the central broker: the shared ones, then
    ``fedmq/F/{task,receipt,xfer}/D`` for each device D (F is ``+`` when no federation
    is given: every federation the device belongs to)."""
    fed = _fed(federation)
    shared = [f"{ROOT}/{fed}/{kind}" for kind in SHARED_DOWN]
    return shared + [f"{ROOT}/{fed}/{kind}/{device}" for device in devices for kind in PER_DEVICE_DOWN]


def up_topics(federation: str | None = None) -> list[str]:
    """Topic filters the site sends to the central broker (only its own devices publish
    there: the site's ACL confines each to its own topics)."""
    fed = _fed(federation)
    return [f"{ROOT}/{fed}/status/#", f"{ROOT}/{fed}/update/#", f"{ROOT}/{fed}/secagg/#"]


def render_site_bridge(site: str, devices: Sequence[str], *, federation: str | None = None,
                       address: str | None = None, template: str | None = None) -> str:
    """The site's bridge section: the shipped template with its connection names set to
    ``bridge-SITE`` and its topic lines replaced by routed ones (one ``topic`` line per
    filter of :func:`up_topics` and :func:`down_topics`, QoS 1).

    Args:
        site: site name (a fedmq id); the bridge account is ``bridge-SITE``.
        devices: the site's device ids (checked by :func:`check_devices`).
        federation: restrict to one federation id; None for all (``+``).
        address: the central broker's ``host:port``; None keeps the template's line.
        template: the bridge section to start from; default broker/bridge/site-bridge.conf.

    Raises:
        ConfigError: bad site name, device id or federation id, or a template without
            the connection and topic lines it should have.
    """
    check_id(site, "site name")
    devices = check_devices(devices)
    text = SITE_BRIDGE_TEMPLATE.read_text() if template is None else template
    account = f"bridge-{site}"
    head: list[str] = []
    for line in text.splitlines():
        word = line.split(" ", 1)[0]
        if word == "topic":
            continue
        if word == "connection":
            line = f"connection fedmq-central-{site}"
        elif word in ("remote_clientid", "remote_username"):
            line = f"{word} {account}"
        elif word == "local_clientid":
            line = f"local_clientid {account}-local"
        elif word == "address" and address is not None:
            line = f"address {address}"
        head.append(line)
    if not any(line.startswith("connection ") for line in head):
        raise ConfigError("bridge template has no 'connection' line")
    while head and (not head[-1].strip() or head[-1].lstrip().startswith("#")):
        head.pop()
    lines = head + ["", f"# Routed for site {site}: written by 'fedmq broker bridge-config' for {len(devices)} "
                        "devices.", "# Up: statuses (with last wills) and client updates of this site's devices."]
    lines += [f"topic {t} out 1" for t in up_topics(federation)]
    lines += ["# Down: the global model chain, ONNX exports and round announcements (every device needs them),",
              "# then the tasks, receipts and resend requests of this site's devices only."]
    lines += [f"topic {t} in 1" for t in down_topics(devices, federation)]
    return "\n".join(lines) + "\n"


def central_acl_rules(site: str, devices: Sequence[str], *, federation: str | None = None) -> list[str]:
    """The rules of the bridge account's ``user`` block on the central broker, narrowed to
    the site's devices: write each device's status and client updates, read the shared
    topics and the per-device topics of :func:`down_topics`.

    Raises:
        ConfigError: as :func:`render_site_bridge`.
    """
    check_id(site, "site name")
    devices = check_devices(devices)
    fed = _fed(federation)
    rules = [f"topic write {ROOT}/{fed}/{kind}/{device}{tail}" for device in devices for kind, tail in PER_DEVICE_UP]
    return rules + [f"topic read {t}" for t in down_topics(devices, federation)]


def render_central_acl(site: str, devices: Sequence[str], *, federation: str | None = None) -> str:
    """The bridge account's ``user bridge-SITE`` block (:func:`central_acl_rules`), to append
    to the central's ACL file after broker/acl's patterns.

    Raises:
        ConfigError: as :func:`render_site_bridge`.
    """
    devices = check_devices(devices)
    rules = central_acl_rules(site, devices, federation=federation)
    return "\n".join([f"# Bridge of site {site} ({len(devices)} devices): written by "
                      "'fedmq broker bridge-config'.", f"user bridge-{site}", *rules]) + "\n"
