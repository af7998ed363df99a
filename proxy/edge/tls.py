"""HTTPS in the appliance: TLS 1.2 and newer, and a certificate renewed without a restart.

The listening context hands every new connection the context loaded last, from its SNI
callback (OpenSSL calls it for each handshake, with a server name or without). A reload builds
a fresh context, so nothing of the old certificate lingers (loading into the same context would
keep a certificate of another key type beside the new one), and a pair that does not load
changes nothing. Connections already open keep theirs.
"""

from __future__ import annotations

import ssl
from pathlib import Path


class CertificateError(Exception):
    """The certificate or its key does not load."""


class Certificates:
    def __init__(self, cert: Path, key: Path) -> None:
        self.cert, self.key = cert, key
        self.current = self._load()
        self.listening = self._load()
        self.listening.sni_callback = self._pick

    def _load(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            raise CertificateError(f"{self.cert} with its key {self.key} does not load "
                                   f"({exc})") from None
        return context

    def _pick(self, connection: ssl.SSLObject, server_name: str | None,
              context: ssl.SSLContext) -> None:
        connection.context = self.current

    def reload(self) -> None:
        """Take the pair now on disk for new connections, or raise CertificateError."""
        self.current = self._load()
