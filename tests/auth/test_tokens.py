"""JWT verification details that no request-level test can see: when a local JWKS is re-read."""

from __future__ import annotations

import json
from pathlib import Path

import jwt
import pytest

from auth.tokens import LocalJwks
from tests.kit.tokens import claims, rsa_pair


def jwks_with(*pairs: tuple[object, str]) -> str:
    return json.dumps({"keys": [
        {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key())), "kid": kid,
         "use": "sig", "alg": "RS256"} for key, kid in pairs]})


def same_key(public: object, private: object) -> bool:
    return public.public_numbers() == private.public_key().public_numbers()


def test_a_local_jwks_is_checked_for_changes_at_most_once_a_second(tmp_path: Path) -> None:
    old, _ = rsa_pair(tmp_path, "old")
    new, _ = rsa_pair(tmp_path, "new")
    path = tmp_path / "jwks.json"
    path.write_text(jwks_with((old, "2025")))
    now = [100.0]
    jwks = LocalJwks(path, clock=lambda: now[0])
    old_token = jwt.encode(claims(), old, algorithm="RS256", headers={"kid": "2025"})
    new_token = jwt.encode(claims(), new, algorithm="RS256", headers={"kid": "2026"})
    assert same_key(jwks.key_for(old_token), old)
    path.write_text(jwks_with((old, "2025"), (new, "2026")))  # rotated on disk
    now[0] += 0.5
    with pytest.raises(jwt.PyJWKClientError):  # not looked at again within the second
        jwks.key_for(new_token)
    path.unlink()  # a stat() now would raise: none may happen before the second is up
    for _ in range(100):
        assert same_key(jwks.key_for(old_token), old)
    path.write_text(jwks_with((old, "2025"), (new, "2026")))
    now[0] += 0.5
    assert same_key(jwks.key_for(new_token), new)  # picked up once the second has passed
