"""The fedmq topic scheme: every MQTT topic fedmq uses is built here and nowhere else.

All topics live under ``fedmq/{federation}/``. Every topic a device may write has its
device id as a whole topic level right after the kind, so that a mosquitto ACL
``pattern write fedmq/+/status/%u`` / ``fedmq/+/update/%u/#`` confines a device to
its own topics (the broker username is the device id). See docs/wire-format.md.

======================================  =====================  =========  ==========================
topic                                    direction              retained   content
======================================  =====================  =========  ==========================
fedmq/F/status/D                         device -> all          yes        Status (and last will)
fedmq/F/model/latest                     coordinator -> all     yes        ModelPointer
fedmq/F/model/V/...                      coordinator -> all     yes        blob: global model version V
fedmq/F/model/chain                      coordinator -> all     yes        ModelChain (compressed downlink)
fedmq/F/model/delta/V/...                coordinator -> all     yes        blob: DeltaBlob, version V-1 -> V
fedmq/F/onnx/latest                      coordinator -> all     yes        ModelPointer (ONNX export)
fedmq/F/onnx/V/...                       coordinator -> all     yes        blob: ONNX export of version V
fedmq/F/round                            coordinator -> all     yes        RoundAnnouncement
fedmq/F/task/D                           coordinator -> D       yes        Task
fedmq/F/update/D/T/...                   D -> coordinator       no         blob: ClientUpdate, transfer T
fedmq/F/receipt/D                        coordinator -> D       no         Receipt
fedmq/F/xfer/D                           coordinator -> D       no         TransferRequest (resend chunks)
fedmq/F/secagg/D/K                       D -> coordinator       no         secure round, kind K (fedmq.secagg.messages)
fedmq/F/secagg-to/D                      coordinator -> D       sa_result  secure round messages to D
======================================  =====================  =========  ==========================

A *blob* at base topic B is a chunked transfer (fedmq.transport): manifest at ``B/m``,
chunk i at ``B/c/{i}``.
"""

from __future__ import annotations

import re

from fedmq.errors import ConfigError

ROOT = "fedmq"
_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def check_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is a valid federation or device id, else raise.

    Valid ids are 1 to 64 characters from ``[A-Za-z0-9_.-]``: no MQTT wildcard or level
    separator, so an id is always exactly one topic level.

    Raises:
        ConfigError: the id is empty, too long or has another character.
    """
    if not isinstance(value, str) or not _ID.match(value):
        raise ConfigError(f"{what} {value!r} is invalid: expected 1-64 characters from [A-Za-z0-9_.-]")
    return value


def federation_root(fed: str) -> str:
    return f"{ROOT}/{fed}"


def status(fed: str, device: str) -> str:
    """Retained device status; also the device's last will topic."""
    return f"{ROOT}/{fed}/status/{device}"


def status_filter(fed: str) -> str:
    return f"{ROOT}/{fed}/status/+"


def model_latest(fed: str) -> str:
    """Retained pointer to the newest global model version."""
    return f"{ROOT}/{fed}/model/latest"


def model_blob(fed: str, version: int) -> str:
    """Base topic of the retained chunked blob holding global model ``version``."""
    return f"{ROOT}/{fed}/model/{int(version)}"


def model_chain(fed: str) -> str:
    """Retained version chain of a compressed downlink (:class:`fedmq.fl.chain.ModelChain`)."""
    return f"{ROOT}/{fed}/model/chain"


def model_delta(fed: str, version: int) -> str:
    """Base topic of the retained blob holding the delta that produces global model ``version``."""
    return f"{ROOT}/{fed}/model/delta/{int(version)}"


def onnx_latest(fed: str) -> str:
    return f"{ROOT}/{fed}/onnx/latest"


def onnx_blob(fed: str, version: int) -> str:
    return f"{ROOT}/{fed}/onnx/{int(version)}"


def round_announcement(fed: str) -> str:
    return f"{ROOT}/{fed}/round"


def task(fed: str, device: str) -> str:
    return f"{ROOT}/{fed}/task/{device}"


def update_base(fed: str, device: str, transfer_id: str) -> str:
    """Base topic of one client-update transfer from ``device``."""
    return f"{ROOT}/{fed}/update/{device}/{transfer_id}"


def update_filter(fed: str) -> str:
    """Subscription of the coordinator to every device's client updates."""
    return f"{ROOT}/{fed}/update/#"


def receipt(fed: str, device: str) -> str:
    return f"{ROOT}/{fed}/receipt/{device}"


def transfer_requests(fed: str, device: str) -> str:
    return f"{ROOT}/{fed}/xfer/{device}"


def secagg_up(fed: str, device: str, kind: str) -> str:
    """A secure-round message of ``kind`` (keys, shares, input, reveal) from ``device``."""
    return f"{ROOT}/{fed}/secagg/{device}/{kind}"


def secagg_up_filter(fed: str) -> str:
    """Subscription of the coordinator to every device's secure-round messages."""
    return f"{ROOT}/{fed}/secagg/+/+"


def secagg_down(fed: str, device: str) -> str:
    """Secure-round messages to ``device`` (its result retained)."""
    return f"{ROOT}/{fed}/secagg-to/{device}"


def parse_secagg_up(fed: str, topic: str) -> tuple[str, str] | None:
    """``(device, kind)`` of ``fedmq/F/secagg/D/K``; None for any other topic or an invalid id."""
    prefix = f"{ROOT}/{fed}/secagg/"
    if not topic.startswith(prefix):
        return None
    levels = topic[len(prefix):].split("/")
    if len(levels) != 2 or not _ID.fullmatch(levels[0]) or not _ID.fullmatch(levels[1]):
        return None
    return levels[0], levels[1]


def blob_manifest(base: str) -> str:
    return f"{base}/m"


def blob_chunk(base: str, index: int) -> str:
    return f"{base}/c/{int(index)}"


def device_of_update(fed: str, topic: str) -> str | None:
    """Device id of a topic under ``fedmq/F/update/D/...`` (``None`` for any other topic)."""
    prefix = f"{ROOT}/{fed}/update/"
    if not topic.startswith(prefix):
        return None
    rest = topic[len(prefix):].split("/", 1)[0]
    return rest if _ID.match(rest) else None


def parse_update_topic(fed: str, topic: str) -> tuple[str, str, str] | None:
    """``(device, transfer_id, part)`` of a client-update message topic
    ``fedmq/F/update/D/T/m`` (part ``"m"``) or ``fedmq/F/update/D/T/c/I`` (part ``"c"``);
    None for any other topic, or a device or transfer level that is not a valid id."""
    prefix = f"{ROOT}/{fed}/update/"
    if not topic.startswith(prefix):
        return None
    levels = topic[len(prefix):].split("/")
    if len(levels) == 3 and levels[2] == "m":
        part = "m"
    elif len(levels) == 4 and levels[2] == "c" and levels[3].isdigit():
        part = "c"
    else:
        return None
    device, transfer = levels[0], levels[1]
    if not (_ID.fullmatch(device) and _ID.fullmatch(transfer)):
        return None
    return device, transfer, part


def device_of_status(fed: str, topic: str) -> str | None:
    """Device id of a status topic ``fedmq/F/status/D`` (None for any other topic)."""
    prefix = f"{ROOT}/{fed}/status/"
    if not topic.startswith(prefix):
        return None
    device = topic[len(prefix):]
    return device if _ID.fullmatch(device) else None
