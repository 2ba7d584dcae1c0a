"""The device's connection to the broker: the link of the current session, the blob sender on
it, and what the device says about itself there (its retained status and last will).

The fleet simulator gives an agent a new link for each session (``EdgeAgent.link = ...``
between two runs, fleet/fleet.py); every part of the agent reaches the broker through this
one object, so none of them keeps the old link.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any

from edge_client.config import EdgeConfig
from edge_client.localdata import LocalData
from fedmq import __version__
from fedmq.wire import topics
from fedmq.wire.messages import Status
from fedmq.model.params import ParamSpec
from fedmq.transport import Link, Will
from fedmq.transport.counting import CountingLink
from fedmq.transport.sender import BlobSender

log = logging.getLogger("edge_client.agent")


class Connection:
    """The link a device's agent talks on, and its status on the broker.

    Args:
        cfg: the device's configuration (federation and device ids).
        link: the link, not yet connected; wrapped in a :class:`CountingLink` (what it carries
            is reported with each client update).
        task_name, spec: the device's task and its ParamSpec, named in every status.
        local: the local data; its training split's size is the status's ``samples``.

    Attributes:
        link: the current link (a :class:`CountingLink`).
        sender: the blob sender on it (client updates, repairs); a new one per session.
        instance: random id of this agent's run, sent in every status (tells two agents with
            one device id apart).
        refusal: why this device refuses to train ("" while it does not), in its status.
    """

    def __init__(self, cfg: EdgeConfig, link: Link, *, task_name: str, spec: ParamSpec, local: LocalData) -> None:
        self.cfg = cfg
        self.task_name, self.spec, self.local = task_name, spec, local
        self.instance = secrets.token_hex(6)
        self.refusal = ""
        self.link: Any = CountingLink(link)
        self.sender = BlobSender(self.link)

    def replace(self, link: Any) -> None:
        """Talk on ``link`` from the next session on (its counters are the caller's choice)."""
        self.link = link

    def open_session(self) -> None:
        """Set the last will (offline status) and a new blob sender, before connecting."""
        fed, dev = self.cfg.federation, self.cfg.device_id
        self.link.set_will(Will(topics.status(fed, dev), self.status(False), qos=1, retain=True))
        self.sender = BlobSender(self.link)

    def status(self, online: bool) -> bytes:
        """This device's Status message (``fedmq/F/status/D``, retained)."""
        return Status(device=self.cfg.device_id, online=online, task=self.task_name, spec_hash=self.spec.hash,
                      samples=len(self.local.y), software=f"fedmq-edge {__version__}", ts=time.time(),
                      instance=self.instance, refusal=self.refusal).to_bytes()

    def publish_status(self) -> None:
        """Publish the online status again (retained; not waited for)."""
        self.link.publish(topics.status(self.cfg.federation, self.cfg.device_id), self.status(True), retain=True)

    def refuse(self, reason: str) -> None:
        """Say in the retained status why this device does not train (logged once per reason)."""
        if reason != self.refusal:
            self.refusal = reason
            log.error("refusing to train: %s", reason)
            self.publish_status()

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> Any:
        """Publish on the current link (secure rounds' messages, edge_client.secure)."""
        return self.link.publish(topic, payload, qos=qos, retain=retain)
