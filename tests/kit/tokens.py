"""JWT material for the tests that attack tokens: claims, and RSA key pairs."""

from __future__ import annotations

import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


def claims(**extra: object) -> dict:
    now = int(time.time())
    return {"sub": "mallory", "iat": now, "exp": now + 3600, **extra}



def rsa_pair(tmp: Path, name: str) -> tuple[rsa.RSAPrivateKey, Path]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    path = tmp / f"{name}.pub.pem"
    path.write_bytes(public_pem)
    return private, path
