"""mosquitto from the shipped configuration on a host without docker: ``fedmq broker run
--mosquitto``.

:func:`prepare_run_dir` renders broker/mosquitto.conf (:func:`broker.conf.render_mosquitto_conf`)
into a run folder it owns (``mosquitto.conf``, ``data/``, ``log/``), reading the
accounts and certificates from a configuration folder laid out as the docker image's
``/mosquitto/config`` (``auth/passwd``, ``auth/acl``, ``certs/``: what ``fedmq broker
init-ca / add-*`` write); :func:`run_foreground` starts mosquitto on it and stops it on
every exit path.
"""

from __future__ import annotations

import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from broker.conf import BrokerDirs, render_mosquitto_conf
from broker.credentials import PRIVATE_DIR_MODE, CredentialError, make_dirs, write_file
from broker.launch import START_TIMEOUT, _wait_accepting, mosquitto_binary, terminate

#: File that marks a run folder as made by :func:`prepare_run_dir`, so that a second run
#: reuses it (persistence kept) while a folder of someone else's is refused.
MARKER = ".fedmq-broker-run"
#: Files of the configuration folder the rendered configuration reads.
REQUIRED = ("auth/passwd", "auth/acl", "certs/ca.crt", "certs/server.crt", "certs/server.key")


@dataclass(frozen=True)
class LocalBroker:
    """A rendered run folder.

    Attributes:
        conf: the rendered ``mosquitto.conf``.
        log: mosquitto's log file.
        listeners: ``(host, port)`` of the plain and the TLS listener, as a client on this
            host reaches them (``127.0.0.1`` for a TLS listener on every interface).
    """

    conf: Path
    log: Path
    listeners: tuple[tuple[str, int], tuple[str, int]]


def prepare_run_dir(run_dir: Path, config_dir: Path, *, plain_bind: str, plain_port: int, tls_bind: str | None,
                    tls_port: int, tls_auth: str, run_as: str | None) -> LocalBroker:
    """Render the shipped configuration into ``run_dir``.

    Every argument is checked before anything is written. ``run_dir`` is created (mode
    0700) with a marker file; an existing folder is used only if it is empty or holds
    the marker (then its ``data/`` keeps the retained messages and sessions of the last
    run, and ``mosquitto.conf`` is rendered anew).

    Args:
        run_dir: folder for ``mosquitto.conf``, ``data/`` and ``log/``.
        config_dir: folder holding :data:`REQUIRED` (``fedmq broker init-ca certs`` and
            ``add-*`` run in it).
        plain_bind, plain_port, tls_bind, tls_port, tls_auth, run_as: as
            :func:`broker.conf.render_mosquitto_conf` (``tls_bind`` None: every interface).

    Raises:
        ConfigError: a port, address or ``tls_auth`` is invalid.
        CredentialError: a required file is missing, ``run_dir`` is a non-empty folder
            this function did not make, or a file cannot be written.
    """
    run_dir, config_dir = Path(run_dir), Path(config_dir)
    dirs = BrokerDirs(config_dir, run_dir / "data", run_dir / "log")
    text = render_mosquitto_conf(dirs, plain_port=plain_port, tls_port=tls_port, plain_bind=plain_bind,
                                 tls_bind=tls_bind, tls_auth=tls_auth, run_as=run_as)
    missing = [name for name in REQUIRED if not (config_dir / name).is_file()]
    if missing:
        raise CredentialError(f"--config-dir {config_dir}: missing {', '.join(missing)}; expected the files of "
                              f"'fedmq broker init-ca certs' and 'fedmq broker add-device / add-coordinator' run in "
                              f"that folder")
    if run_dir.exists():
        if not run_dir.is_dir():
            raise CredentialError(f"--dir {run_dir}: is a file, expected a folder")
        if any(run_dir.iterdir()) and not (run_dir / MARKER).is_file():
            raise CredentialError(f"--dir {run_dir}: not empty and not made by 'fedmq broker run --mosquitto' (no "
                                  f"{MARKER}); give a new or empty folder")
    try:
        make_dirs(run_dir, PRIVATE_DIR_MODE)
        for sub in (dirs.data, dirs.log):
            make_dirs(sub, PRIVATE_DIR_MODE)
    except OSError as exc:
        raise CredentialError(f"--dir {run_dir}: cannot create it ({exc})") from None
    write_file(run_dir / MARKER, b"made by fedmq broker run --mosquitto\n", 0o644, "run folder marker")
    conf = run_dir / "mosquitto.conf"
    write_file(conf, text.encode("utf-8"), 0o600, "mosquitto configuration")
    tls_host = {None: "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(tls_bind, tls_bind)
    return LocalBroker(conf, dirs.log / "mosquitto.log", ((plain_bind, plain_port), (tls_host, tls_port)))


def run_foreground(broker: LocalBroker, *, on_ready=print) -> int:  # noqa: ANN001 - a print-like callable
    """Start mosquitto on ``broker.conf``, call ``on_ready(message)`` once both listeners
    accept connections, and wait for it to exit.

    SIGTERM and SIGINT (Ctrl-C) are passed on to mosquitto, which saves its persistence
    file and exits; on any other way out (an exception) mosquitto is stopped too, so the
    command never leaves it behind.

    Returns:
        mosquitto's exit status: 0 after a SIGTERM or SIGINT (also one that reached it
        before its own handler was set up, when it had nothing new to save).

    Raises:
        BrokerLaunchError: mosquitto is missing, exits before listening, or does not
            listen within START_TIMEOUT seconds (the message has its log's tail).
    """
    proc = subprocess.Popen([mosquitto_binary(), "-c", str(broker.conf)], stdin=subprocess.DEVNULL)
    asked: list[int] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        if proc.poll() is None:
            asked.append(signum)
            proc.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for host, port in broker.listeners:
            _wait_accepting(proc, host, port, START_TIMEOUT, broker.log, "mosquitto")
        (plain_host, plain_port), (tls_host, tls_port) = broker.listeners
        on_ready(f"mosquitto (pid {proc.pid}) listening: plain mqtt://{plain_host}:{plain_port}, TLS "
                 f"mqtts://{tls_host}:{tls_port}; configuration {broker.conf}, log {broker.log}; Ctrl-C to stop")
        status = proc.wait()
        if asked and status == -signal.SIGTERM:
            # Our stop reached mosquitto before it had set up its own handler (it accepts
            # connections first): it ended at once, without writing its persistence file,
            # whose last saved copy stays as it was. The stop the user asked for happened.
            return 0
        return status
    finally:
        terminate(proc)
        for sig, handler in previous.items():
            signal.signal(sig, handler)

