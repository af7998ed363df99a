"""Property tests for the parsers an attacker reaches first: credentials in headers, API keys,
JWTs. Whatever comes in, the answer is a principal or a refusal, never a crash."""

from __future__ import annotations

import asyncio
import string
import time
from pathlib import Path

import jwt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from auth.apikeys import KEY_PATTERN, parse_key
from auth.authenticator import presented_credential
from auth.errors import CredentialRejected
from auth.tokens import MAX_TOKEN_BYTES, TokenVerifier
from config import load_settings

SECRET = "property-test-secret-0123456789abcdefghijklmnop"
header_text = st.text(max_size=300) | st.sampled_from(["Bearer", "bearer ", "Bearer  x y",
                                                        "Basic abc", "Bearer \x00", "Bearer é"])


@given(st.dictionaries(st.sampled_from(["Authorization", "X-API-Key", "X-Other"]),
                       header_text, max_size=3))
def test_a_presented_credential_is_printable_ascii_or_refused(headers: dict[str, str]) -> None:
    try:
        credential = presented_credential(headers)
    except CredentialRejected:
        return
    if credential is None:
        assert not headers.get("Authorization") and not headers.get("X-API-Key", "").strip()
        return
    assert 0 < len(credential) <= MAX_TOKEN_BYTES
    assert credential.isascii() and credential.isprintable()
    assert not any(c in string.whitespace for c in credential)


@given(st.sampled_from(["Authorization", "X-API-Key"]),
       st.text(string.ascii_letters + string.digits + "-_.~+/=", min_size=1, max_size=200))
def test_a_plain_credential_is_presented_as_sent(header: str, credential: str) -> None:
    """The other side of the refusals above: a parser that refused everything would pass it."""
    value = f"Bearer {credential}" if header == "Authorization" else credential
    assert presented_credential({header: value}) == credential


valid_keys = st.builds(
    lambda prefix, secret: f"sk-{prefix}_{secret}",
    st.text("0123456789abcdefghijklmnopqrstuvwxyz", min_size=8, max_size=8),
    st.text(string.ascii_letters + string.digits + "_-", min_size=20, max_size=200))


@given(valid_keys)
def test_every_well_formed_key_gives_its_prefix(key: str) -> None:
    assert parse_key(key) == key[3:11]


@given(st.text(max_size=250))
def test_anything_else_is_not_a_key(text: str) -> None:
    assert (parse_key(text) is not None) == (KEY_PATTERN.fullmatch(text) is not None)


def verifier(tmp: Path) -> TokenVerifier:
    return TokenVerifier(load_settings({"data_dir": str(tmp), "jwt_secret": SECRET}, env={},
                                       serving=False))


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=string.ascii_letters + string.digits + "-_.=", max_size=400)
       | st.builds(lambda a, b, c: f"eyJ{a}.{b}.{c}", st.text(max_size=60),
                   st.text(max_size=60), st.text(max_size=60)))
def test_a_forged_or_garbled_jwt_is_refused_not_crashed(tmp_path: Path, token: str) -> None:
    try:
        asyncio.run(verifier(tmp_path).verify(token))
    except CredentialRejected:
        return
    raise AssertionError(f"accepted {token!r}")


@settings(max_examples=50, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(min_size=1, max_size=40), st.integers(120, 10**8))
def test_a_correctly_signed_jwt_with_good_claims_is_its_principal(tmp_path: Path, sub: str,
                                                                  ttl: int) -> None:
    """The other side of the refusals: a verifier that refused everything would pass them."""
    token = jwt.encode({"sub": sub, "exp": int(time.time()) + ttl}, SECRET, algorithm="HS256")
    assert asyncio.run(verifier(tmp_path).verify(token)).id == f"user:{sub}"


claims = st.fixed_dictionaries({}, optional={
    "sub": st.one_of(st.text(max_size=40), st.integers(), st.none(), st.lists(st.integers())),
    "exp": st.one_of(st.integers(-10**10, 10**10), st.floats(allow_nan=True), st.text(max_size=5)),
    "nbf": st.one_of(st.integers(-10**10, 10**10), st.text(max_size=5)),
    "scope": st.one_of(st.text(max_size=30), st.lists(st.text(max_size=10)), st.integers()),
    "models": st.one_of(st.text(max_size=30), st.lists(st.text(max_size=10)), st.integers()),
    "rpm": st.one_of(st.integers(), st.text(max_size=5), st.floats()),
    "tpm": st.one_of(st.integers(), st.text(max_size=5), st.floats()),
})


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(claims)
def test_a_correctly_signed_jwt_with_odd_claims_is_a_principal_or_refused(
    tmp_path: Path, payload: dict
) -> None:
    token = jwt.encode(payload, SECRET, algorithm="HS256")
    try:
        principal = asyncio.run(verifier(tmp_path).verify(token))
    except CredentialRejected:
        return
    assert isinstance(payload.get("exp"), int | float) and payload["exp"] > time.time() - 60
    assert "sub" in payload and principal.id == f"user:{payload['sub']}"
    assert principal.rpm is None or principal.rpm > 0
    assert principal.tpm is None or principal.tpm > 0
