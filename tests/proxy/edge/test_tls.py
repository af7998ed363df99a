"""TLS in the appliance: a certificate made at test time, TLS 1.2 or newer, HSTS, a new
certificate taken on SIGHUP without dropping a stream under way; and no listening beyond
loopback with authentication off."""

from __future__ import annotations

import asyncio
import datetime
import signal
import ssl
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from config import ConfigError, load_settings
from proxy.edge.tls import CertificateError, Certificates
from tests.conftest import Fake
from tests.kit.helpers import Appliance, eventually


def make_certificate(cert: Path, key: Path, name: str, rsa_key: bool = False) -> None:
    """A self-signed certificate for 127.0.0.1 whose subject says `name`."""
    import ipaddress

    private = (rsa.generate_private_key(65537, 2048) if rsa_key
               else ec.generate_private_key(ec.SECP256R1()))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(private.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(private, hashes.SHA256()))
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


def trusting(cert: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cert))
    return context


async def handshake(port: int, context: ssl.SSLContext) -> tuple[str, bytes]:
    """The TLS version and the server's certificate, from a fresh connection."""
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    tls = writer.get_extra_info("ssl_object")
    version, der = tls.version(), tls.getpeercert(True)
    writer.close()
    return version, der


def unverified() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return context


def subject_of(der: bytes) -> str:
    name = x509.load_der_x509_certificate(der).subject
    return name.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


async def test_https_with_hsts_and_a_certificate_renewed_on_sighup(tmp_path: Path,
                                                                   fake: Fake) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    make_certificate(cert, key, "first")
    old = tmp_path / "first.pem"
    old.write_bytes(cert.read_bytes())
    app = Appliance(tmp_path / "a", "--upstream", fake.url, "--auth", "disabled",
                    "--tls-cert", str(cert), "--tls-key", str(key))
    base = f"https://127.0.0.1:{app.port}"
    try:
        await eventually(lambda: "listening on https://" in app.log, 30, "the appliance")
        async with aiohttp.ClientSession() as http:
            async with http.get(base + "/health", ssl=trusting(cert)) as resp:
                assert resp.status == 200
                assert resp.headers["Strict-Transport-Security"].startswith("max-age=")
            version, _ = await handshake(app.port, trusting(cert))
            assert version in ("TLSv1.2", "TLSv1.3")
            # A stream under way while the certificate changes.
            stream = await http.post(base + "/v1/chat/completions", ssl=trusting(cert), json={
                "model": "fake-model", "messages": [], "stream": True,
                "fake": {"chunks": 20, "gap": 0.1}})
            assert (await stream.content.readline()).startswith(b"data:")
            make_certificate(cert, key, "second")
            app.proc.send_signal(signal.SIGHUP)
            await eventually(lambda: "reloaded the TLS certificate" in app.log, 10, "reload")
            rest = await stream.read()
            assert rest.rstrip().endswith(b"data: [DONE]")  # the stream was not dropped
        _, der = await handshake(app.port, trusting(cert))  # a new connection: the new one
        assert subject_of(der) == "second"
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await http.get(base + "/health", ssl=trusting(old))
        # A broken certificate file on SIGHUP: reported, the last good one kept.
        cert.write_text("not a certificate")
        app.proc.send_signal(signal.SIGHUP)
        await eventually(lambda: "kept the old certificate" in app.log, 10, "the refusal")
        _, der = await handshake(app.port, unverified())
        assert subject_of(der) == "second"
    finally:
        assert await asyncio.to_thread(app.stop) == 0
    assert "Traceback" not in app.log


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10"])
def test_auth_off_is_refused_beyond_loopback(host: str) -> None:
    with pytest.raises(ConfigError, match="loopback only"):
        load_settings({"host": host, "auth": "disabled"}, env={}, serving=False)
    settings = load_settings({"host": "127.0.0.1", "auth": "disabled"}, env={}, serving=False)
    assert settings.auth == "disabled"


@pytest.mark.parametrize(("values", "name"), [
    ({"trusted_proxies": ["10.0.0.0/33"]}, "trusted_proxies"),
    ({"cors_origins": ["app.example"]}, "cors_origins"),
    ({"cors_origins": ["https://app.example/path"]}, "cors_origins"),
    ({"tls_cert": "/nonexistent.pem", "tls_key": "/nonexistent.pem"}, "tls_cert"),
    ({"tls_key": "/etc/hostname"}, "tls_cert"),
    ({"tunnel": "ngrok", "auth": "disabled"}, "tunnel"),
])
def test_edge_settings_are_checked_before_start(values: dict, name: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(values, env={}, serving=False)
    assert err.value.args[0].startswith(name) or name in str(err.value)


async def test_a_reload_leaves_nothing_of_the_old_certificate(tmp_path: Path) -> None:
    """RSA, then EC, then RSA again: every client sees the last one (loading into the same
    context kept the EC certificate for clients that prefer it)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    make_certificate(cert, key, "rsa-1", rsa_key=True)
    certs = Certificates(cert, key)
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0,
                                        ssl=certs.listening)
    port = server.sockets[0].getsockname()[1]
    try:
        for name, is_rsa in (("ec-2", False), ("rsa-3", True)):
            make_certificate(cert, key, name, rsa_key=is_rsa)
            certs.reload()
            _, der = await handshake(port, unverified())
            assert subject_of(der) == name
        # A certificate with another pair's key does not load, and changes nothing.
        make_certificate(tmp_path / "other.pem", tmp_path / "other-key.pem", "x")
        key.write_bytes((tmp_path / "other-key.pem").read_bytes())
        with pytest.raises(CertificateError):
            certs.reload()
        _, der = await handshake(port, unverified())
        assert subject_of(der) == "rsa-3"
    finally:
        server.close()
