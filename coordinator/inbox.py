"""The coordinator's inbox: routing, admission and receipts of every message it receives.

:class:`Inbox` takes each message off the link's queue on the round thread and routes it:
a status to the presence registry (an offline one to the round policy), a client-update
chunk or manifest through admission (the engine's :meth:`admit`, the assembly limits
``busy``, retained messages refused and cleared) into the blob receiver, an assembled blob
through unsealing (:mod:`fedmq.security.sealing`) to the engine, and the engine's outcome to a
receipt. Nothing is allocated for a transfer before its manifest is admitted. Every refusal
is counted by reason (:attr:`Inbox.rejections`, flushed into the database).
"""

from __future__ import annotations

import logging
import queue
from collections import Counter
from collections.abc import Callable

from coordinator.config import CoordinatorConfig
from coordinator.faults import RunControl
from coordinator.policy import RoundPolicy
from coordinator.presence import DeviceRegistry
from coordinator.progress import Reporter
from coordinator.publisher import Publisher
from coordinator.state import StateDB
from fedmq.wire import topics
from fedmq.errors import TransportError, WireError
from fedmq.fl.rounds import Accepted, Outcome, Rejected, Repeat
from fedmq.wire.messages import Receipt, Status
from fedmq.security.sealing import CoordinatorKey, SealError, is_sealed
from fedmq.transport import Link, Message
from fedmq.transport.receiver import BlobReceiver
from fedmq.transport.wire import Manifest

log = logging.getLogger("fedmq.coordinator")


def _manifest_round(payload: bytes) -> int | None:
    """The round a client update's manifest names, None when it names none or is unreadable."""
    try:
        return Manifest.from_bytes(payload).round
    except WireError:
        return None


class Inbox:
    """Routing, admission and receipts.

    Args:
        config: ``[limits]``, ``[sealing]``, the federation.
        link: the coordinator's link; ``queue``: the inbox its subscriptions deliver to.
        receiver: reassembles client-update blobs (bounded by ``[limits]``).
        registry: presence; ``db``: where duplicate-id conflicts are written.
        publisher: clears retained client updates.
        seal_key: the key devices seal their updates to.
        policy: the round policy (its engine judges, its hooks hear the answers).
        answered: called ``(device, outcome)`` once an answer's receipt is sent (the
            driver hands it to the policy, which may take a server step).
        control: the run's test hook (``receipt``); ``report``: progress events.
    """

    def __init__(self, config: CoordinatorConfig, link: Link, messages: queue.SimpleQueue[Message],
                 receiver: BlobReceiver, registry: DeviceRegistry, db: StateDB, publisher: Publisher,
                 seal_key: CoordinatorKey, policy: RoundPolicy, answered: Callable[[str, Outcome], None],
                 control: RunControl, report: Reporter) -> None:
        self.config, self.link, self.queue, self.receiver = config, link, messages, receiver
        self.registry, self.db, self.publisher, self.seal_key = registry, db, publisher, seal_key
        self.policy, self.answered, self.control, self.report = policy, answered, control, report
        self.fed = config.federation
        #: Every rejection by reason, the ones outside a round and malformed messages included
        #: (flushed into the database's ``rejections`` table).
        self.rejections: Counter[str] = Counter()
        self._receiver_seen: Counter[str] = Counter()

    def drain(self, timeout: float, notify: bool = True) -> bool:
        """Handle the messages waiting (waiting up to ``timeout`` seconds for the first).
        ``notify``: send an ``update`` progress event per answer. True when one was handled."""
        try:
            msg = self.queue.get(timeout=timeout)
        except queue.Empty:
            return False
        while True:
            self.handle(msg, notify)
            try:
                msg = self.queue.get_nowait()
            except queue.Empty:
                return True

    def handle(self, msg: Message, notify: bool = True) -> None:
        """Route one message (a status or a client-update manifest or chunk)."""
        device = topics.device_of_status(self.fed, msg.topic)
        if device is not None:
            self._on_status(device, msg.payload)
            return
        parsed = topics.parse_update_topic(self.fed, msg.topic)
        if parsed is None or not msg.payload:
            return
        device, transfer, part = parsed
        engine = self.policy.engine
        if msg.retain:
            # Every later subscription would replay it: never assembled, cleared at once.
            self.publisher.clear_retained(msg.topic)
            if part == "m":
                self.answer(device, transfer, engine.refuse(device, transfer, "retained",
                                                            "client update published as a retained message",
                                                            _manifest_round(msg.payload)), notify)
            return
        if device not in self.registry.devices:
            # No status ever seen: not one of ours. Nothing is allocated or answered for it.
            self.rejections["unknown_device"] += 1
            return
        self.registry.seen(device)
        dev = self.registry.devices.get(device)
        if dev is not None:
            dev.bytes_up += len(msg.payload)
        engine.count_bytes(device, transfer, len(msg.payload))
        if part == "c":
            blob = self.receiver.feed(msg.topic, msg.payload)
        else:
            # The manifest is parsed once, here, and its announced size judged before the
            # receiver allocates anything for the transfer.
            base = msg.topic[:-2]
            try:
                manifest = Manifest.from_bytes(msg.payload)
            except WireError as exc:
                self.answer(device, transfer, engine.refuse(device, transfer, "malformed", f"blob manifest: {exc}"),
                            notify)
                return
            verdict = (engine.admit(device, transfer, manifest.size, manifest.round)
                       or self._capacity(device, base, manifest.size))
            if isinstance(verdict, Rejected):
                # A device refused busy with none of its transfers in assembly settles on the
                # receipt (rolls its update back) and sends nothing more: its answer. While one
                # is in assembly, that one may still be its update.
                own, _ = self.receiver.pending_bytes(topics.update_base(self.fed, device, ""))
                verdict = engine.refuse(device, transfer, verdict.reason, verdict.detail, manifest.round,
                                        answered=(own == 0) if verdict.reason == "busy" else None)
            if verdict is not None:
                self.answer(device, transfer, verdict, notify)
                return
            blob = self.receiver.feed_manifest(base, manifest, msg.payload)
        if blob is not None:
            data = self._unseal(device, transfer, blob.data, blob.round)
            outcome = data if isinstance(data, Rejected) else engine.offer(device, transfer, data, blob.round)
            self.answer(device, transfer, outcome, notify)

    def _unseal(self, device: str, transfer: str, data: bytes, round_: int | None) -> bytes | Rejected:
        """The envelope inside a sealed update, a plain envelope as it is (unless sealing is
        required), or the refusal: ``unsealed`` or ``bad_seal`` (counted like every reason), naming
        ``round_``, the round the transfer's manifest named (None: the round in progress)."""
        engine = self.policy.engine
        if not is_sealed(data):
            if self.config.sealing.required:
                return engine.refuse(device, transfer, "unsealed", "a plain client update, [sealing] required is set",
                                     round_)
            return data
        try:
            return self.seal_key.open_update(data, federation=self.fed, device=device, transfer_id=transfer)
        except SealError as exc:
            return engine.refuse(device, transfer, "bad_seal", str(exc), round_)

    def _capacity(self, device: str, base: str, size: int) -> Rejected | None:
        """``busy`` when admitting the transfer would exceed the assembly limits."""
        limits = self.config.limits
        if self.receiver.manifest(base) is not None:
            return None  # a duplicate manifest of a transfer already in assembly
        count, _ = self.receiver.pending_bytes(topics.update_base(self.fed, device, ""))
        if count >= limits.max_transfers_per_device:
            return Rejected("busy", f"{device!r} already has {count} transfers in assembly "
                                    f"(limits.max_transfers_per_device {limits.max_transfers_per_device})")
        _, total = self.receiver.pending_bytes()
        if total + size > limits.max_pending_bytes:
            return Rejected("busy", f"{total} bytes in assembly, {size} more would exceed "
                                    f"limits.max_pending_bytes {limits.max_pending_bytes}")
        return None

    def _on_status(self, device: str, payload: bytes) -> None:
        if not payload:
            self.registry.on_cleared(device)
            return
        try:
            status = Status.from_bytes(payload)
        except WireError as exc:
            self.rejections["malformed_status"] += 1
            log.warning("status of %s ignored: %s", device, exc)
            return
        dev = self.registry.on_status(device, status)
        if dev is None and status.device != device:
            self.rejections["device_mismatch"] += 1
        if dev is not None:
            self.policy.presence(device, dev.online)
        for conflict in self.registry.conflict_reports():
            self.db.write_conflict(conflict)

    # -- answers ---------------------------------------------------------------------------

    def answer(self, device: str, transfer: str, outcome: Outcome, notify: bool = True) -> None:
        """Send the receipt the engine's outcome calls for; count the device's rounds; let the
        policy hear the answer (FedBuff journals an accepted update before its receipt and
        steps once its buffer is full)."""
        policy = self.policy
        self.control.pause("receipt", policy.round_in_progress)
        if isinstance(outcome, Repeat):
            self.receipt(device, outcome.round, transfer, outcome.status, outcome.reason)
            return
        if isinstance(outcome, Accepted):
            policy.before_receipt(device, transfer, outcome)
            self.control.pause("accepted", policy.round_in_progress)
            if device in self.registry.devices:
                self.registry.devices[device].rounds += 1
            self.receipt(device, outcome.round, transfer, "accepted", "")
        else:
            self.rejections[outcome.reason] += 1
            log.info("update from %s (transfer %s) rejected: %s (%s)", device, transfer, outcome.reason,
                     outcome.detail)
            if outcome.answer:
                self.receipt(device, outcome.round, transfer, "rejected", outcome.reason)
        self.answered(device, outcome)
        if notify:
            self.report(policy.progress())

    def receipt(self, device: str, round_: int, transfer: str, status: str, reason: str) -> None:
        try:
            self.link.publish(topics.receipt(self.fed, device),
                              Receipt(device, round_, transfer, status, reason).to_bytes())
        except TransportError as exc:
            log.warning("receipt to %s not sent: %s", device, exc)

    def flush_rejections(self) -> None:
        """Add the rejections counted since the last flush (with the receiver's malformed
        chunks and the presence registry's refusals) to the database."""
        sources = dict(self.receiver.stats)
        sources["registry_full"] = self.registry.refused
        for key, name in (("bad_messages", "malformed_chunk"), ("corrupt_chunks", "corrupt_chunk"),
                          ("hash_mismatch", "hash_mismatch"), ("early_dropped", "early_dropped"),
                          ("expired", "transfer_expired"), ("registry_full", "registry_full")):
            now = int(sources.get(key, 0))
            if now > self._receiver_seen[key]:
                self.rejections[name] += now - self._receiver_seen[key]
                self._receiver_seen[key] = now
        if self.rejections:
            self.db.add_rejections(self.rejections)
            self.rejections.clear()
