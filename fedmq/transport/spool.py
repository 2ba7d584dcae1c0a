"""Disk spool of incoming blobs: one preallocated ``.part`` file per transfer plus its
manifest, so that a large blob is not held in memory and a receiver that restarts can
resume where it stopped.

Which chunks a ``.part`` file holds is not stored: on resume each chunk's bytes are
checked against the CRC-32 in the manifest (a chunk never written reads as zeros and
fails the check unless its content really is zeros, in which case it is right).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import msgpack

from fedmq.storage.atomic import atomic_write_bytes
from fedmq.errors import StateError

log = logging.getLogger(__name__)


class Spool:
    """Folder of partial transfers, one per base topic.

    Files: ``{key}.meta`` (msgpack ``{"base": str, "manifest": bytes}``, written atomically)
    and ``{key}.part`` (the blob's bytes at their offsets), ``key`` = first 32 hex chars of
    SHA-256(base).
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"blob spool folder {self.folder} cannot be created ({exc})") from None
        self._fds: dict[str, int] = {}

    @staticmethod
    def key(base: str) -> str:
        return hashlib.sha256(base.encode("utf-8")).hexdigest()[:32]

    def _part(self, key: str) -> Path:
        return self.folder / f"{key}.part"

    def _meta(self, key: str) -> Path:
        return self.folder / f"{key}.meta"

    def create(self, base: str, manifest: bytes, size: int) -> str:
        """Start a spooled transfer (replacing any other for ``base``); returns its key."""
        key = self.key(base)
        self.remove(key)
        fd = os.open(self._part(key), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(fd, size)
        self._fds[key] = fd
        atomic_write_bytes(self._meta(key), msgpack.packb({"base": base, "manifest": manifest}, use_bin_type=True))
        return key

    def _fd(self, key: str) -> int:
        fd = self._fds.get(key)
        if fd is None:
            fd = os.open(self._part(key), os.O_RDWR)
            self._fds[key] = fd
        return fd

    def write(self, key: str, offset: int, data: bytes | memoryview) -> None:
        os.pwrite(self._fd(key), data, offset)

    def read(self, key: str, offset: int, size: int) -> bytes:
        return os.pread(self._fd(key), size, offset)

    def read_all(self, key: str, size: int) -> bytes:
        return self.read(key, 0, size)

    def remove(self, key: str) -> None:
        fd = self._fds.pop(key, None)
        if fd is not None:
            os.close(fd)
        for path in (self._part(key), self._meta(key)):
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    def scan(self) -> Iterator[tuple[str, str, bytes]]:
        """``(key, base, manifest bytes)`` of every resumable transfer. Unreadable entries are
        removed (logged): the transfer is fetched again from the start."""
        for meta in sorted(self.folder.glob("*.meta")):
            key = meta.stem
            try:
                obj = msgpack.unpackb(meta.read_bytes(), raw=False)
                base, manifest = obj["base"], obj["manifest"]
                if not (isinstance(base, str) and isinstance(manifest, bytes) and self._part(key).is_file()):
                    raise ValueError("bad fields or missing .part file")
            except Exception as exc:  # msgpack / OS / shape errors all mean "start over"
                log.warning("blob spool entry %s unreadable (%s): removed", meta, exc)
                self.remove(key)
                continue
            yield key, base, manifest

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
