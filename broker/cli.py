"""``fedmq broker``: set up the production broker (mosquitto) and run the development one.

Commands:

* ``init-ca DIR``: a local CA and the broker's server certificate;
* ``add-device NAME``: a device account (password entry, credential files for the
  device, optionally a client certificate, the coordinator's public key the device seals
  its client updates to) and the device's edge-client TOML snippet;
* ``add-coordinator NAME``: a coordinator account, granted its federation's topic tree
  in the ACL;
* ``bridge-config --site NAME --devices ...``: a site bridge routed to the site's devices
  and its account's ACL block on the central broker (broker/bridge_routes.py);
* ``render``: the shipped mosquitto.conf for other folders, listeners (bind addresses,
  ports) or TLS authentication (``--tls-auth certificate|password``);
* ``run``: the embedded amqtt broker on loopback, for development only; ``run
  --mosquitto``: mosquitto from the shipped configuration, for hosts without docker.

Default paths are those broker/docker-compose.yml mounts, relative to the folder the
command runs in (run it in broker/): ``auth/passwd``, ``auth/acl``, ``certs/``,
``devices/NAME/``. See docs/broker.md.
"""

from __future__ import annotations

import getpass
import ipaddress
import os
from pathlib import Path

import typer

from broker import credentials as cred
from broker.bridge_routes import central_acl_rules, check_devices, render_central_acl, render_site_bridge
from broker.conf import PLAIN_PORT, TLS_AUTH_MODES, TLS_PORT, BrokerDirs, check_bind, render_mosquitto_conf
from fedmq.storage.atomic import atomic_write_text
from fedmq.errors import ConfigError, FedmqError
from fedmq.security.sealing import fingerprint, load_public_key, public_pem
from fedmq.wire.topics import check_id

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Set up the production MQTT broker (mosquitto) or run the development one.")

_PASSWD = typer.Option(Path("auth/passwd"), "--passwd-file", help="mosquitto password file to add the account to.")
_ACL = typer.Option(Path("auth/acl"), "--acl-file",
                    help="Deployed ACL file (broker/acl plus coordinator blocks); rewritten, created if missing.")
_CA_DIR = typer.Option(Path("certs"), "--ca-dir", help="Folder of the CA made by 'fedmq broker init-ca'.")
_FEDERATION = typer.Option("default", "--federation", help="Federation id.")
_URL = typer.Option("mqtts://localhost:8883", "--broker-url",
                    help="Broker URL written into the snippet (mqtts:// for TLS, mqtt:// for plain).")
_CERT = typer.Option(False, "--cert/--no-cert", help="Also issue a client certificate signed by the CA in --ca-dir.")
_HASHER = typer.Option("auto", "--hasher",
                       help="Password hashing: mosquitto_passwd, fedmq (built-in PBKDF2-SHA512) or auto "
                            "(mosquitto_passwd where installed).")
_REPLACE = typer.Option(False, "--replace", help="Replace the password (and certificate) of an existing account.")
_DAYS = typer.Option(cred.LEAF_DAYS, "--days", help="Validity of issued certificates, days.")


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=1)


def _tls(url: str) -> bool:
    scheme = url.partition("://")[0]
    if scheme not in ("mqtt", "mqtts") or "://" not in url:
        raise ConfigError(f"--broker-url {url!r} is invalid: expected mqtt://host[:port] or mqtts://host[:port]")
    return scheme == "mqtts"


def _check_writable(path: Path, option: str) -> None:
    """Raise unless ``path`` could be created or replaced: its nearest existing ancestor
    must be a folder this process can write to."""
    if path.is_dir():
        raise cred.CredentialError(f"{option} {path}: is a folder, expected a file")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise cred.CredentialError(f"{option} {path}: cannot be created: {parent} is not a writable folder")


def _toml(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _issue_account(name: str, role: str, *, passwd_file: Path, acl_file: Path, out_dir: Path | None,
                   ca_dir: Path, broker_url: str, cert: bool, hasher: str, replace: bool, days: int,
                   federation: str, reader: bool = False) -> tuple[Path, dict[str, str]]:
    """Shared part of add-device and add-coordinator: checks, credential files, password
    entries, ACL. With ``reader`` (devices only) also the device's read-only companion
    account (:func:`broker.credentials.reader_account`). Returns the account folder and
    its files by role (``username``, ``password``, ``ca``, ``cert``, ``key``, and
    ``predict_`` + each of these but ``ca`` for the companion), relative to that folder."""
    check_id(name, f"{role} name")
    check_id(federation, "federation")
    if name.endswith(cred.READER_SUFFIX):
        raise ConfigError(f"{role} name {name!r} ends in {cred.READER_SUFFIX!r}, which names the read-only companion "
                          f"account of a device: choose another name")
    tls = _tls(broker_url)
    acl = cred.read_acl(acl_file)
    accounts = acl.coordinators
    users = cred.read_password_file(passwd_file)
    if role == "device" and name in accounts:
        raise cred.CredentialError(f"{name!r} is a coordinator account in {acl_file}; a device needs its own name")
    if role == "coordinator" and name in users and name not in accounts:
        raise cred.CredentialError(f"{name!r} is a device in {passwd_file} (no coordinator block in {acl_file}); "
                                   f"a coordinator needs its own name")
    if name in users and not replace:
        raise cred.CredentialError(f"{name!r} already has a password in {passwd_file}; use --replace to issue new "
                                   f"credentials")
    companion = cred.reader_account(name) if reader else None
    if companion is not None:
        if companion in accounts:
            raise cred.CredentialError(f"{companion!r}, the companion account of device {name!r}, is a coordinator "
                                       f"account in {acl_file}: rename one of them, or use --no-predict-account")
        if companion in users and companion not in acl.readers and not replace:
            raise cred.CredentialError(f"{companion!r}, the companion account of device {name!r}, already has a "
                                       f"password in {passwd_file}; use --replace to issue new credentials")
    if hasher not in cred.HASHERS:
        raise ConfigError(f"--hasher {hasher!r} is unknown: expected one of {', '.join(cred.HASHERS)}")
    ca = cred.CaFiles(ca_dir)
    if cert:
        cred.load_ca(ca_dir)
    folder = out_dir if out_dir is not None else Path("devices" if role == "device" else "coordinators") / name
    # Every check before the first write: a failed command leaves nothing half made.
    for path, what in ((passwd_file, "--passwd-file"), (acl_file, "--acl-file"), (folder / "password", "--out-dir")):
        _check_writable(path, what)
    identities = [(name, "")] + ([(companion, "predict_")] if companion is not None else [])
    files: dict[str, str] = {}
    passwords = {}
    for user, prefix in identities:
        stem = prefix.replace("_", "-")
        passwords[user] = cred.generate_password()
        cred.write_file(folder / f"{stem}username", f"{user}\n".encode(), 0o644, "user name file")
        cred.write_file(folder / f"{stem}password", f"{passwords[user]}\n".encode(), 0o600, "password file")
        files.update({f"{prefix}username": f"{stem}username", f"{prefix}password": f"{stem}password"})
        if cert:
            # The CN is the user name: the shipped TLS listener takes it as the identity.
            cred.issue_client_cert(ca_dir, user, folder / f"{stem}client.crt", folder / f"{stem}client.key", days=days)
            files.update({f"{prefix}cert": f"{stem}client.crt", f"{prefix}key": f"{stem}client.key"})
    if tls and ca.ca_cert.is_file():
        try:
            ca_pem = ca.ca_cert.read_bytes()
        except OSError as exc:
            raise cred.CredentialError(f"{ca.ca_cert}: cannot read the CA certificate ({exc})") from None
        cred.write_file(folder / "ca.crt", ca_pem, 0o644, "CA certificate")
        files["ca"] = "ca.crt"
    used = {cred.set_password(passwd_file, user, passwords[user], hasher=hasher) for user, _ in identities}
    if role == "coordinator":
        feds = accounts.setdefault(name, [])
        if federation not in feds:
            feds.append(federation)
        if len(feds) > 1:
            typer.echo(f"# note: {name!r} now serves {', '.join(feds)}: the broker binds the client id to the user "
                       f"name, so run one coordinator process per account (two would close each other's "
                       f"connection); give each federation's coordinator its own account", err=True)
    if companion is not None and companion not in acl.readers:
        acl.readers.append(companion)
    cred.write_acl(acl_file, acl)
    extra = f" and read-only companion {companion!r}" if companion is not None else ""
    typer.echo(f"# {role} {name!r}{extra}: password entries in {passwd_file} ({', '.join(sorted(used))}), ACL "
               f"{acl_file}, files in {folder}/", err=True)
    if tls and "cert" not in files:
        typer.echo("# note: the shipped TLS listener requires a client certificate (require_certificate true); "
                   "add --cert unless this broker is rendered with --tls-auth password", err=True)
    if tls and "ca" not in files:
        typer.echo(f"# note: no CA in {ca_dir}: the client will verify the broker against the system CAs", err=True)
    return folder, files


@app.command("init-ca")
def init_ca(folder: Path = typer.Argument(..., help="Folder for ca.crt, ca.key, server.crt, server.key."),
            hostname: list[str] = typer.Option(["localhost", "127.0.0.1"], "--hostname",
                                               help="DNS name or IP address of the broker (repeat for several)."),
            days: int = _DAYS,
            force: bool = typer.Option(False, "--force", help="Replace an existing CA (its certificates stop working).")
            ) -> None:
    """Create a local CA and issue the broker's server certificate."""
    try:
        files = cred.init_ca(folder, hostname, days=days, force=force)
    except FedmqError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"CA {files.ca_cert} (key {files.ca_key}: keep it off the broker), server certificate "
               f"{files.server_cert} for {', '.join(hostname)}")


@app.command("add-device")
def add_device(name: str = typer.Argument(..., help="Device id; also its broker user name."),
               federation: str = _FEDERATION, passwd_file: Path = _PASSWD, acl_file: Path = _ACL,
               ca_dir: Path = _CA_DIR, cert: bool = _CERT, broker_url: str = _URL,
               out_dir: Path | None = typer.Option(None, "--out-dir",
                                                   help="Folder for the device's files (default devices/NAME)."),
               hasher: str = _HASHER, replace: bool = _REPLACE, days: int = _DAYS,
               predict: bool = typer.Option(True, "--predict-account/--no-predict-account",
                                            help="Also add the device's read-only companion account NAME.predict "
                                                 "(reads global models and ONNX exports only), which "
                                                 "'fedmq edge predict' uses beside the running agent."),
               coordinator_key: Path | None = typer.Option(
                   None, "--coordinator-key",
                   help="The coordinator's public key (seal-key.pub in its state folder, made by its first start "
                        "or 'fedmq coordinator seal-key'): written beside the device's credentials as "
                        "coordinator.pub; the device seals every client update to it and pins it.")) -> None:
    """Add a device account and print its edge-client configuration snippet (TOML).

    Files for the device (copy them next to its edge.toml, or into systemd's
    $CREDENTIALS_DIRECTORY), in a folder of mode 0700: username, password (0600),
    ca.crt, with --cert client.crt and client.key (0600, CN = NAME); and for the
    companion account predict-username, predict-password (0600), with --cert
    predict-client.crt and predict-client.key (0600, CN = NAME.predict); with
    --coordinator-key coordinator.pub (0644), the key the device seals its updates to.
    """
    try:
        # Checked before anything is written: a bad key file leaves no half-made account.
        sealing_key = load_public_key(coordinator_key) if coordinator_key is not None else None
        folder, files = _issue_account(name, "device", passwd_file=passwd_file, acl_file=acl_file, out_dir=out_dir,
                                       ca_dir=ca_dir, broker_url=broker_url, cert=cert, hasher=hasher,
                                       replace=replace, days=days, federation=federation, reader=predict)
        if sealing_key is not None:
            cred.write_file(folder / "coordinator.pub", public_pem(sealing_key), 0o644, "coordinator public key")
    except (FedmqError, OSError) as exc:
        raise _fail(str(exc)) from None
    if sealing_key is not None:
        typer.echo(f"# client updates sealed to coordinator key {fingerprint(sealing_key)[:16]}... "
                   f"({folder}/coordinator.pub)", err=True)
    else:
        typer.echo("# note: no --coordinator-key: this device's client updates travel in the clear through the "
                   "broker (docs/security.md)", err=True)
    lines = [f"# fedmq edge client, device {name}. Paths are relative to edge.toml's folder",
             f"# (or $CREDENTIALS_DIRECTORY): copy {folder}/* there. Add task, data and state_dir.",
             f"device_id = {_toml(name)}",
             f"federation = {_toml(federation)}"]
    for key, role in (("predict_username_file", "predict_username"), ("predict_password_file", "predict_password"),
                      ("predict_tls_cert", "predict_cert"), ("predict_tls_key", "predict_key")):
        if role in files:
            lines.append(f"{key} = {_toml(files[role])}")
    if sealing_key is not None:
        lines.append(f"coordinator_key = {_toml('coordinator.pub')}")
    lines += ["", "[broker]", f"url = {_toml(broker_url)}",
              f"username_file = {_toml(files['username'])}",
              f"password_file = {_toml(files['password'])}"]
    for key, role in (("ca_file", "ca"), ("cert_file", "cert"), ("key_file", "key")):
        if role in files:
            lines.append(f"{key} = {_toml(files[role])}")
    typer.echo("\n".join(lines))


@app.command("add-coordinator")
def add_coordinator(name: str = typer.Argument(..., help="Coordinator account name (broker user name)."),
                    federation: str = _FEDERATION, passwd_file: Path = _PASSWD, acl_file: Path = _ACL,
                    ca_dir: Path = _CA_DIR, cert: bool = _CERT, broker_url: str = _URL,
                    out_dir: Path | None = typer.Option(None, "--out-dir",
                                                        help="Folder for its files (default coordinators/NAME)."),
                    hasher: str = _HASHER, replace: bool = _REPLACE, days: int = _DAYS) -> None:
    """Add a coordinator account: read and write on the federation's tree fedmq/F/#.

    The account is a `user NAME` block in the ACL file; running it again with --replace
    and another --federation adds that federation to the same account. Prints the
    [broker] section of the coordinator's TOML.
    """
    try:
        folder, files = _issue_account(name, "coordinator", passwd_file=passwd_file, acl_file=acl_file,
                                       out_dir=out_dir, ca_dir=ca_dir, broker_url=broker_url, cert=cert,
                                       hasher=hasher, replace=replace, days=days, federation=federation)
    except FedmqError as exc:
        raise _fail(str(exc)) from None
    base = folder.resolve()
    lines = [f"# fedmq coordinator {name}: broker settings (paths relative to the coordinator's TOML file).",
             f"federation = {_toml(federation)}",
             "",
             "[broker]",
             f"url = {_toml(broker_url)}",
             f"username = {_toml(name)}",
             f"password_file = {_toml(str(base / files['password']))}"]
    for key, role in (("ca_file", "ca"), ("cert_file", "cert"), ("key_file", "key")):
        if role in files:
            lines.append(f"{key} = {_toml(str(base / files[role]))}")
    typer.echo("\n".join(lines))


def _install_bridge_block(acl_file: Path, site: str, devices: list[str], federation: str | None) -> None:
    account = f"bridge-{site}"
    acl = cred.read_acl(acl_file)
    if account in acl.coordinators or account in acl.readers:
        raise cred.CredentialError(f"{account!r} is a coordinator or companion account in {acl_file}")
    acl.bridges[account] = central_acl_rules(site, devices, federation=federation)
    cred.write_acl(acl_file, acl)


@app.command("bridge-config")
def bridge_config(site: str = typer.Option(..., "--site", help="Site name; its bridge account is bridge-SITE."),
                  devices: str | None = typer.Option(None, "--devices", help="The site's device ids, comma-separated."),
                  devices_file: Path | None = typer.Option(None, "--devices-file",
                                                           help="File of the site's device ids, one a line."),
                  federation: str | None = typer.Option(None, "--federation",
                                                        help="Route one federation only (default: every one)."),
                  address: str | None = typer.Option(None, "--central", help="The central broker's TLS host:port."),
                  out_dir: Path | None = typer.Option(None, "--out-dir",
                                                      help="Folder for the two files (default bridges/SITE)."),
                  acl_file: Path | None = typer.Option(
                      None, "--acl-file", help="Also put the bridge account's block into this deployed ACL file of "
                                               "the central broker (replacing the site's previous block).")) -> None:
    """Write a routed site bridge: OUT/site-bridge.conf (append to the site broker's
    mosquitto.conf; set remote_password) and OUT/central-acl (append to the central's ACL
    file, or let --acl-file do it). The bridge carries down only the tasks, receipts and resend requests of the
    listed devices, and the global models, ONNX exports and round announcements every
    device needs (broker/bridge/README.md). Run it again when the site's devices change.
    """
    ids: list[str] = []
    if devices:
        ids += devices.split(",")
    try:
        if devices_file is not None:
            ids += [line for line in devices_file.read_text().splitlines() if line.strip()]
        ids = check_devices(ids)
        bridge = render_site_bridge(site, ids, federation=federation, address=address)
        acl = render_central_acl(site, ids, federation=federation)
        folder = out_dir if out_dir is not None else Path("bridges") / site
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "site-bridge.conf", bridge)
        atomic_write_text(folder / "central-acl", acl)
        if acl_file is not None:
            _install_bridge_block(acl_file, site, ids, federation)
    except (FedmqError, OSError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"site {site}: {len(ids)} devices; bridge section {folder / 'site-bridge.conf'} (set remote_password), "
               f"central ACL block {folder / 'central-acl'} (account bridge-{site})")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_PLAIN_BIND = typer.Option("127.0.0.1", "--plain-bind",
                           help="Address of the plain listener (passwords in clear, so loopback only).")
_PLAIN_PORT = typer.Option(PLAIN_PORT, "--plain-port", help="TCP port of the plain listener.")
_TLS_PORT = typer.Option(TLS_PORT, "--tls-port", help="TCP port of the TLS listener.")
_TLS_AUTH = typer.Option("certificate", "--tls-auth",
                         help="certificate: a client certificate from the CA is required and its CN is the user "
                              "name (the password is not checked on TLS); password: server-authenticated TLS, "
                              "user name and password (no client certificate).")
_RUN_AS = typer.Option(None, "--run-as", help="Account mosquitto drops to when started as root (default: the "
                                              "current user, who owns the 0600 secrets).")


def _listener_options(plain_bind: str, plain_port: int, tls_bind: str, tls_port: int, tls_auth: str) -> str | None:
    """Check the listener flags under their own names; returns the TLS bind address
    (None for '*', every interface)."""
    check_bind(plain_bind, "--plain-bind", loopback_only=True)
    for value, flag in ((plain_port, "--plain-port"), (tls_port, "--tls-port")):
        if not 1 <= value <= 65535:
            raise ConfigError(f"{flag} {value} is out of range: expected a TCP port 1..65535")
    if plain_port == tls_port:
        raise ConfigError(f"--plain-port and --tls-port are both {plain_port}: expected two different ports")
    if tls_auth not in TLS_AUTH_MODES:
        raise ConfigError(f"--tls-auth {tls_auth!r} is unknown: expected one of {', '.join(TLS_AUTH_MODES)}")
    return None if tls_bind == "*" else check_bind(tls_bind, "--tls-bind")


@app.command("render")
def render(config_dir: Path = typer.Option(Path("/mosquitto/config"), "--config-dir",
                                           help="Folder holding auth/passwd, auth/acl and certs/."),
           data_dir: Path = typer.Option(Path("/mosquitto/data"), "--data-dir", help="Persistence folder."),
           log_dir: Path = typer.Option(Path("/mosquitto/log"), "--log-dir", help="Folder of mosquitto.log."),
           plain_bind: str = _PLAIN_BIND, plain_port: int = _PLAIN_PORT,
           tls_bind: str = typer.Option("*", "--tls-bind",
                                        help="Address of the TLS listener; '*' for every interface."),
           tls_port: int = _TLS_PORT, tls_auth: str = _TLS_AUTH,
           run_as: str | None = typer.Option(None, "--run-as", help="Append 'user NAME' (mosquitto's account "
                                                                    "when started as root).")) -> None:
    """Print the shipped mosquitto.conf for other folders, listeners or TLS authentication.

    Only the /mosquitto/... folders, the two listener lines and, with --tls-auth
    password, require_certificate and use_identity_as_username change. Redirect it to a
    file, e.g. for the distribution's mosquitto: fedmq broker render --config-dir
    /etc/mosquitto/fedmq ... > /etc/mosquitto/conf.d/fedmq.conf
    """
    try:
        bind = _listener_options(plain_bind, plain_port, tls_bind, tls_port, tls_auth)
        text = render_mosquitto_conf(BrokerDirs(config_dir, data_dir, log_dir), plain_port=plain_port,
                                     tls_port=tls_port, plain_bind=plain_bind, tls_bind=bind,
                                     tls_auth=tls_auth, run_as=run_as)
    except FedmqError as exc:
        raise _fail(str(exc)) from None
    typer.echo(text, nl=False)


@app.command("run")
def run(mosquitto: bool = typer.Option(False, "--mosquitto",
                                       help="Run mosquitto with the shipped configuration instead of the embedded "
                                            "development broker."),
        host: str | None = typer.Option(None, "--host", help="Embedded broker: loopback address (127.0.0.1)."),
        port: int | None = typer.Option(None, "--port", help="Embedded broker: TCP port (1883)."),
        verbose: bool = typer.Option(False, "--verbose", help="Embedded broker: log at INFO level."),
        run_dir: Path | None = typer.Option(None, "--dir", help="--mosquitto: folder for the rendered "
                                                                "mosquitto.conf, data/ and log/ (new, empty, or "
                                                                "made by an earlier run)."),
        config_dir: Path = typer.Option(Path("."), "--config-dir",
                                        help="--mosquitto: folder holding auth/ and certs/ (where init-ca and "
                                             "add-* ran)."),
        plain_bind: str = _PLAIN_BIND, plain_port: int = _PLAIN_PORT,
        tls_bind: str = typer.Option("127.0.0.1", "--tls-bind",
                                     help="--mosquitto: address of the TLS listener; '*' for every interface "
                                          "(to serve devices on the network)."),
        tls_port: int = _TLS_PORT, tls_auth: str = _TLS_AUTH, run_as: str | None = _RUN_AS) -> None:
    """Run a broker in the foreground until Ctrl-C or SIGTERM.

    Without --mosquitto: the embedded broker (amqtt, MQTT 3.1.1) for development:
    anonymous, in memory, loopback only. With --mosquitto: mosquitto from the shipped
    configuration, rendered into --dir, with the accounts and certificates of
    --config-dir; both listeners on loopback unless --tls-bind says otherwise. For
    hosts without docker (broker/docker-compose.yml).
    """
    if mosquitto:
        if host is not None or port is not None or verbose:
            raise _fail("--host, --port and --verbose are options of the embedded broker: with --mosquitto use "
                        "--plain-bind/--plain-port and --tls-bind/--tls-port")
        if run_dir is None:
            raise _fail("--mosquitto needs --dir DIR: the folder for the rendered configuration, data and log")
        from broker import local

        try:
            bind = _listener_options(plain_bind, plain_port, tls_bind, tls_port, tls_auth)
            prepared = local.prepare_run_dir(run_dir, config_dir, plain_bind=plain_bind, plain_port=plain_port,
                                             tls_bind=bind, tls_port=tls_port, tls_auth=tls_auth,
                                             run_as=run_as if run_as is not None else getpass.getuser())
            status = local.run_foreground(prepared, on_ready=lambda line: typer.echo(line, err=True))
        except FedmqError as exc:
            raise _fail(str(exc)) from None
        raise typer.Exit(code=status)
    host = "127.0.0.1" if host is None else host
    port = 1883 if port is None else port
    if not _loopback(host):
        raise _fail(f"--host {host!r} is not a loopback address: the embedded broker has no authentication "
                    f"and is for development only; run mosquitto (fedmq broker run --mosquitto, or "
                    f"broker/docker-compose.yml) for a fleet")
    if not 1 <= port <= 65535:
        raise _fail(f"--port {port} is out of range: expected 1..65535")
    from broker import embedded  # amqtt is imported only by the one command that needs it

    embedded.main(["--host", host, "--port", str(port)] + (["--verbose"] if verbose else []))
