"""The dashboard over HTTPS (dashboard.tls_cert_file / tls_key_file, or systemd's credentials): a real gateway
process serves its API with a certificate made by the command docs/install.md gives, `visita survey` on the same
machine expects exactly that certificate, a remote caller needs it (--cafile) or is told so, and certificates or keys
that cannot be served are refused at start and by `config check`, naming the file and what to do."""

from __future__ import annotations

import contextlib
import datetime as dt
import http.server
import ipaddress
import json
import logging
import signal
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
from conftest import VISITA, free_port, self_signed_cert
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from firmware_sim.scenario import beacon_subject_id, load_scenario
from gateway.config import DashboardConfig, load_tls
from gateway.runtime import recheck_certificate

TOKEN = "installer-token-for-tests-0123456789"


def _config(where: Path, port: int, cert: Path | None, key: Path | None, listen: str | None = None) -> Path:
    token = where / "installer-token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    tag = beacon_subject_id(load_scenario("default").beacons[0])
    cfg = where / "visita.toml"
    text = f'[dashboard]\nlisten = "{listen or f"127.0.0.1:{port}"}"\ninstaller_token_file = "{token}"\n'
    if cert is not None:
        text += f'tls_cert_file = "{cert}"\n'
    if key is not None:
        text += f'tls_key_file = "{key}"\n'
    cfg.write_text(text + f'\n[survey]\ntransmitter = "{tag}"\n')
    return cfg


def _https(url: str, cafile: Path) -> dict[str, object]:
    with urllib.request.urlopen(url, timeout=5, context=ssl.create_default_context(cafile=str(cafile))) as r:
        out: dict[str, object] = json.loads(r.read())
        return out


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VISITA, *args], capture_output=True, text=True, timeout=60)


def test_the_dashboard_serves_https_and_the_cli_expects_its_certificate(tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    port = free_port()
    cfg = _config(tmp_path, port, cert, key)
    args = [*VISITA, "run", "--sim", "--speed", "10", "--until", "2h", "--mqtt", "off", "--config", str(cfg)]
    proc = subprocess.Popen(
        [*args, "--data-dir", str(tmp_path / "data")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    base = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"gateway exited: {proc.communicate()[0]}"
            try:
                health = _https(f"{base}/healthz", cert)
                break
            except OSError:
                assert time.monotonic() < deadline, "the gateway did not answer over HTTPS within 30 s"
                time.sleep(0.2)
        assert health["status"] == "ok"
        served = _https(f"{base}/api/v1/status", cert)["dashboard"]
        assert served["https"] is True and served["certificate_names"] == ["visita-gw.local", "127.0.0.1"], served
        until = dt.datetime.fromisoformat(str(served["certificate_until"]))
        assert 820 <= (until - dt.datetime.now(dt.UTC)).days <= 825, served
        # Plain HTTP gets no answer from the HTTPS port.
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).read()
        # A client that does not trust the certificate is refused by its own TLS check.
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            urllib.request.urlopen(f"{base}/healthz", timeout=5).read()

        # On this machine the CLI finds the address and the certificate in the config.
        r = _cli("survey", "status", "--config", str(cfg), "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["spots"] == []
        # From elsewhere (no config naming the certificate) it is not trusted: the error says what to pass.
        token = tmp_path / "installer-token"
        remote = ["survey", "status", "--url", base, "--token-file", str(token), "--json"]
        r = _cli(*remote)
        assert r.returncode == 1, r.stderr
        assert "presents a certificate this machine does not trust" in r.stderr and "--cafile" in r.stderr, r.stderr
        r = _cli(*remote, "--cafile", str(cert))
        assert r.returncode == 0 and json.loads(r.stdout)["spots"] == [], r.stderr
        r = _cli(*remote, "--cafile", str(tmp_path / "missing.crt"))
        assert r.returncode == 2 and "--cafile" in r.stderr and "missing.crt" in r.stderr, r.stderr
        # The host name is checked for a remote caller: the certificate is not for "localhost".
        r = _cli(
            "survey", "status", "--url", f"https://localhost:{port}", "--token-file", str(token), "--cafile", str(cert)
        )
        assert r.returncode == 1 and "presents a certificate that is not for localhost" in r.stderr, r.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert f"dashboard  https://127.0.0.1:{port}/" in out, out
    assert f"the dashboard serves HTTPS with {cert}, for visita-gw.local, 127.0.0.1, until" in out, out


def _key(path: Path, password: bytes | None = None) -> ec.EllipticCurvePrivateKey:
    private = ec.generate_private_key(ec.SECP256R1())
    crypt = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    path.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, crypt))
    path.chmod(0o600)
    return private


def _expired_cert(where: Path) -> tuple[Path, Path]:
    private = _key(where / "old.key")
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "visita-gw")])
    now = dt.datetime.now(dt.UTC)
    built = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=400))
        .not_valid_after(now - dt.timedelta(days=35))
        .sign(private, hashes.SHA256())
    )
    (where / "old.crt").write_bytes(built.public_bytes(serialization.Encoding.PEM))
    return where / "old.crt", where / "old.key"


def test_certificates_and_keys_that_cannot_be_served_are_refused_naming_the_file(tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    other = tmp_path / "other.key"
    _key(other)
    locked = tmp_path / "locked.key"
    _key(locked, b"passphrase")
    garbage = tmp_path / "garbage.crt"
    garbage.write_text("this is not a certificate\n")
    garbage.chmod(0o600)  # also given as a key

    def refused(c: Path | None, k: Path | None) -> str:
        with pytest.raises(ValueError) as e:
            DashboardConfig(tls_cert_file=str(c or ""), tls_key_file=str(k or "")).tls()
        return str(e.value)

    assert load_tls((str(cert), "c"), (str(key), "k")).names == ["visita-gw.local", "127.0.0.1"]
    msg = refused(cert, other)
    assert f"dashboard.tls_key_file {other}: not the key of the certificate {cert}" in msg, msg
    msg = refused(cert, locked)
    assert f"dashboard.tls_key_file {locked}: the key is encrypted" in msg and "without a passphrase" in msg, msg
    msg = refused(garbage, key)
    assert f"dashboard.tls_cert_file {garbage}: not a PEM certificate" in msg, msg
    msg = refused(cert, garbage)
    assert f"dashboard.tls_key_file {garbage}: not a PEM private key" in msg, msg
    msg = refused(tmp_path / "nope.crt", key)
    assert f"dashboard.tls_cert_file {tmp_path / 'nope.crt'}: cannot be read" in msg, msg
    msg = refused(None, key)
    assert "dashboard.tls_key_file is set but dashboard.tls_cert_file is not" in msg, msg
    msg = refused(cert, None)
    assert f"{cert} has no key" in msg and "LoadCredential=visita-dashboard-key" in msg, msg

    # The gateway does not start with them, and says why.
    port = free_port()
    cfg = _config(tmp_path, port, cert, other)
    r = subprocess.run(
        [
            *VISITA,
            "run",
            "--sim",
            "--until",
            "1m",
            "--mqtt",
            "off",
            "--config",
            str(cfg),
            "--data-dir",
            str(tmp_path / "d"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Exit 2, a bad config: systemd's RestartPreventExitStatus=2 keeps it from restarting every 5 s for ever.
    assert r.returncode == 2 and "not the key of the certificate" in r.stderr, r.stderr
    # Nor does config check pass them.
    r = _cli("config", "check", str(cfg))
    assert r.returncode == 2 and f"dashboard.tls_key_file {other}: not the key" in r.stderr, r.stderr


def test_config_check_says_how_the_dashboard_is_served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    port = free_port()

    def notes(cfg: Path) -> str:
        r = _cli("config", "check", str(cfg))
        assert r.returncode == 0, r.stderr
        return r.stdout

    # Tokens over plain HTTP on the shop's network: said, with what to do.
    out = notes(_config(tmp_path, port, None, None, listen=f"0.0.0.0:{port}"))
    assert "over plain HTTP: the installer token(s) cross the network in clear" in out, out
    assert "dashboard.tls_cert_file" in out
    # On loopback only, nothing crosses the network.
    assert "plain HTTP" not in notes(_config(tmp_path, port, None, None))
    # A certificate near its end, and one past it.
    soon, soon_key = self_signed_cert(tmp_path, days=5, name="soon")
    out = notes(_config(tmp_path, port, soon, soon_key))
    assert "day(s) left; replace it" in out, out
    old, old_key = _expired_cert(tmp_path)
    out = notes(_config(tmp_path, port, old, old_key))
    assert f"the dashboard's certificate {old} expired on" in out, out
    # The key for the unit alone (LoadCredential=): the certificate is checked, the key at start.
    cert, _ = self_signed_cert(tmp_path)
    out = notes(_config(tmp_path, port, cert, None))
    assert "key is to come from the unit's credential visita-dashboard-key" in out, out
    assert f"serves HTTPS with {cert}, for visita-gw.local, 127.0.0.1" in out, out
    # Not served (listen = "off"): the gateway does not load the certificate, and config check does not ask for it.
    out = notes(_config(tmp_path, port, tmp_path / "gone.crt", tmp_path / "gone.key", listen="off"))
    assert "HTTPS" not in out and "plain HTTP" not in out, out


def test_the_unit_can_hand_over_the_key_as_a_credential(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = self_signed_cert(tmp_path)
    creds = tmp_path / "credentials"
    creds.mkdir()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert DashboardConfig().tls() is None  # neither: plain HTTP
    (creds / "visita-dashboard-key").write_bytes(key.read_bytes())
    (creds / "visita-dashboard-key").chmod(0o400)  # as systemd's LoadCredential= leaves it
    # A key without a certificate in the config would be served where the CLI expects plain HTTP: refused.
    with pytest.raises(
        ValueError, match=r"systemd credential visita-dashboard-key is set but dashboard\.tls_cert_file"
    ):
        DashboardConfig().tls()
    tls = DashboardConfig(tls_cert_file=str(cert)).tls()  # the certificate in the config, the key from systemd
    assert tls is not None and (tls.cert, tls.key) == (str(cert), str(creds / "visita-dashboard-key"))


class _Catcher(http.server.BaseHTTPRequestHandler):
    """A server that is not the gateway: it records the Authorization header of every request it gets."""

    heard: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.heard.append(self.headers.get("Authorization", ""))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"spots": []}')

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def _catcher(cert: Path | None, key: Path | None) -> Iterator[int]:
    """A catching server on a free loopback port, over HTTPS with `cert` and `key` or plain HTTP."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Catcher)
    if cert is not None and key is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def _issue(
    where: Path, name: str, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None, loopback: bool = True
) -> tuple[Path, Path]:
    """A certificate for `name` (and 127.0.0.1 with `loopback`) issued by `ca`, or a CA of its own when `ca` is
    None."""
    private = _key(where / f"{name}.key")
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca[0].subject if ca else subject)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=90))
        .add_extension(x509.BasicConstraints(ca=ca is None, path_length=None), critical=True)
    )
    if ca is not None:
        san: list[x509.GeneralName] = [x509.DNSName(name)]
        san += [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))] if loopback else []
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    built = builder.sign(ca[1] if ca else private, hashes.SHA256())
    (where / f"{name}.crt").write_bytes(built.public_bytes(serialization.Encoding.PEM))
    return where / f"{name}.crt", where / f"{name}.key"


def test_the_cli_sends_its_token_only_to_the_configured_certificate(tmp_path: Path) -> None:
    """`visita survey` on the gateway's machine trusts the configured certificate alone: not another self-signed one,
    not another certificate of the CA in its chain; and no token goes to another host over plain HTTP."""
    ca_crt, ca_key = _issue(tmp_path, "store-ca", None)
    ca = (
        x509.load_pem_x509_certificate(ca_crt.read_bytes()),
        serialization.load_pem_private_key(ca_key.read_bytes(), None),
    )
    assert isinstance(ca[1], ec.EllipticCurvePrivateKey)
    ours, _ = _issue(tmp_path, "visita-gw", (ca[0], ca[1]), loopback=False)  # not for 127.0.0.1: names not checked
    chain = tmp_path / "chain.crt"
    chain.write_bytes(ours.read_bytes() + ca_crt.read_bytes())  # the gateway's certificate, then its CA's
    printer, printer_key = _issue(tmp_path, "printer", (ca[0], ca[1]))
    stranger, stranger_key = self_signed_cert(tmp_path, name="stranger")
    _Catcher.heard.clear()

    def survey(port: int, cert: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        return _cli("survey", "status", "--config", str(_config(tmp_path, port, cert, None)), *extra)

    for fake, fake_key in ((printer, printer_key), (stranger, stranger_key)):
        with _catcher(fake, fake_key) as port:
            r = survey(port, chain)
        assert r.returncode == 1, r.stderr
        assert f"serves a certificate other than dashboard.tls_cert_file {chain}" in r.stderr, r.stderr
        assert "systemctl restart visita" in r.stderr
    assert _Catcher.heard == [], "the installer token went to a server with another certificate"

    # The configured certificate itself is accepted, chain and all (the catcher stands in for the gateway).
    with _catcher(chain, tmp_path / "visita-gw.key") as port:
        r = survey(port, chain, "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == {"spots": []}, r.stderr
    assert _Catcher.heard == [f"Bearer {TOKEN}"]

    # A gateway still on plain HTTP (the certificate set since it started) is named as such, token unsent.
    with _catcher(None, None) as port:
        r = survey(port, chain)
    assert r.returncode == 1 and "does not speak HTTPS" in r.stderr and "restart" in r.stderr, r.stderr
    assert len(_Catcher.heard) == 1

    # Plain HTTP to another host: refused before anything is sent. A configured certificate that cannot be read: named.
    token = tmp_path / "installer-token"
    r = _cli("survey", "status", "--url", "http://192.0.2.10:8080", "--token-file", str(token))
    assert r.returncode == 2 and "plain HTTP would send the installer token across the network" in r.stderr, r.stderr
    gone = tmp_path / "gone.crt"
    cfg = _config(tmp_path, free_port(), gone, None)
    r = _cli("survey", "status", "--config", str(cfg), "--url", "https://127.0.0.1:9", "--token-file", str(token))
    assert r.returncode == 2 and f"dashboard.tls_cert_file {gone}: cannot be used" in r.stderr, r.stderr
    r = _cli("survey", "status", "--config", str(cfg))
    assert r.returncode == 2 and f"dashboard.tls_cert_file {gone}: cannot be used" in r.stderr, r.stderr
    for bad, shown in (
        ("http://127.0.0.1:abc", "http://127.0.0.1:abc"),
        ("http://[::1", "http://[::1"),
        ("http://evil.example:80@127.0.0.1:8080", "http://***@127.0.0.1:8080"),  # user:password@ is never echoed
    ):
        r = _cli("survey", "status", "--url", bad, "--token-file", str(token))
        assert r.returncode == 2 and f"--url {shown}:" in r.stderr and "Traceback" not in r.stderr, r.stderr

    # With --url on this machine the configured chain's CA vouches for nothing either (names are checked there, and
    # the printer's certificate is for 127.0.0.1).
    with _catcher(printer, printer_key) as port:
        r = _cli(
            "survey",
            "status",
            "--config",
            str(_config(tmp_path, port, chain, None)),
            "--url",
            f"https://127.0.0.1:{port}",
        )
    assert r.returncode == 1 and "does not trust" in r.stderr, r.stderr
    assert len(_Catcher.heard) == 1


def test_an_expired_certificate_is_named_by_the_cli_and_by_the_daily_check(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old, old_key = _expired_cert(tmp_path)
    with _catcher(old, old_key) as port:
        r = _cli("survey", "status", "--config", str(_config(tmp_path, port, old, None)))
    assert r.returncode == 1 and f"serves dashboard.tls_cert_file {old}, which has expired" in r.stderr, r.stderr

    # The running gateway's daily look at its certificate: past its end; then a file replaced but not yet served.
    tls = load_tls((str(old), "dashboard.tls_cert_file"), (str(old_key), "dashboard.tls_key_file"))
    with caplog.at_level(logging.INFO, logger="visita.runtime"):
        recheck_certificate("0.0.0.0:8443", tls)
    assert [(r.levelno, r.getMessage().split(" expired on")[0]) for r in caplog.records] == [
        (logging.ERROR, f"the dashboard's certificate {old}")
    ]
    caplog.clear()
    new, _ = self_signed_cert(tmp_path)
    old.write_bytes(new.read_bytes())
    with caplog.at_level(logging.INFO, logger="visita.runtime"):
        recheck_certificate("0.0.0.0:8443", tls)
    (rec,) = caplog.records
    assert rec.levelno == logging.WARNING and "was replaced since the start" in rec.getMessage(), rec.getMessage()
    assert "systemctl restart visita" in rec.getMessage()
    caplog.clear()
    fresh = load_tls((str(new), "c"), None)
    with caplog.at_level(logging.INFO, logger="visita.runtime"):
        recheck_certificate("0.0.0.0:8443", fresh)
    assert caplog.records == [], "a certificate far from its end is not logged again every day"
