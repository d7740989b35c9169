"""Tokens judged by aos_plumbing.auth: signatures, expiry, audience, tenant, roles."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from aos_contracts.failures import RETRYABLE, FailureCode
from aos_plumbing.auth import (
    Authenticator,
    AuthError,
    bearer_header,
    bearer_token,
    load_public_keys,
)

SECRET = "test-secret-0123456789-0123456789-abcdef"
NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


def hs256(secret: str = SECRET, **claims: Any) -> str:
    body = {"tenant": "acme", "roles": ["submit"], "aud": "aos", "exp": NOW + timedelta(hours=1)}
    body.update(claims)
    return jwt.encode({k: v for k, v in body.items() if v is not None}, secret, algorithm="HS256")


def verifier(**kwargs: Any) -> Authenticator:
    return Authenticator(verify_signature=True, secret=SECRET, audience="aos", **kwargs)


def refusal(auth: Authenticator, token: str | None, **kwargs: Any) -> AuthError:
    with pytest.raises(AuthError) as caught:
        auth.authorize(token, tenant="acme", role="submit", at=kwargs.get("at", NOW))
    return caught.value


def test_stub_mode_checks_nothing() -> None:
    auth = Authenticator()
    assert not auth.enabled and auth.mode == "stub" and auth.rbac_mode == "off"
    assert auth.authorize(None, tenant="acme", role="submit") is None
    assert auth.authorize("not a jwt", tenant="acme", role="submit") is None


def test_a_valid_hs256_token_names_its_tenant_and_roles() -> None:
    principal = verifier().authorize(hs256(sub="alice"), tenant="acme", role="submit", at=NOW)
    assert principal is not None
    assert (principal.tenant, principal.roles, principal.subject) == (
        "acme",
        frozenset({"submit"}),
        "alice",
    )
    assert verifier().mode == "jwt:HS256"


@pytest.mark.parametrize(
    ("token", "code", "words"),
    [
        (None, FailureCode.UNAUTHORIZED, "no bearer token"),
        (
            hs256(secret="another-secret-0123456789-0123456789"),
            FailureCode.UNAUTHORIZED,
            "bad signature",
        ),
        (hs256(exp=NOW - timedelta(minutes=5)), FailureCode.UNAUTHORIZED, "expired"),
        (hs256(aud="someone-else"), FailureCode.UNAUTHORIZED, "wrong audience"),
        (hs256(exp=None), FailureCode.UNAUTHORIZED, "no exp claim"),
        (hs256(tenant=None), FailureCode.UNAUTHORIZED, "no tenant claim"),
        (hs256(tenant="globex"), FailureCode.FORBIDDEN, "tenant mismatch"),
        ("garbage", FailureCode.UNAUTHORIZED, "invalid token"),
    ],
)
def test_refusals_say_why(token: str | None, code: FailureCode, words: str) -> None:
    error = refusal(verifier(), token)
    assert error.code is code
    assert words in error.reason
    if token:
        assert token not in error.reason  # a reason never quotes the token


def test_expiry_is_judged_at_the_time_given_not_now() -> None:
    token = hs256(exp=NOW + timedelta(seconds=10))
    assert verifier().authorize(token, tenant="acme", role="submit", at=NOW) is not None
    assert refusal(verifier(), token, at=None).code is FailureCode.UNAUTHORIZED  # now: expired


def test_unsigned_and_hmac_with_a_public_key_are_refused(tmp_path: Path) -> None:
    # PyJWT annotates the key without the None that alg "none" requires.
    claims = {"tenant": "acme", "exp": NOW + timedelta(hours=1)}
    unsigned = jwt.encode(claims, None, "none")  # type: ignore[arg-type]
    assert "not accepted" in refusal(verifier(), unsigned).reason
    rsa_only = Authenticator(verify_signature=True, public_keys=rsa_keys(tmp_path)[1])
    assert "not accepted" in refusal(rsa_only, hs256(aud=None)).reason


def rsa_keys(tmp_path: Path, kid: str = "k1") -> tuple[Any, list[jwt.PyJWK]]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{**jwk, "kid": kid, "alg": "RS256", "use": "sig"}]}))
    return private, load_public_keys(jwks)


def test_rs256_with_a_jwks_file_and_with_a_pem_key(tmp_path: Path) -> None:
    private, keys = rsa_keys(tmp_path)
    claims = {"tenant": "acme", "roles": ["read"], "exp": NOW + timedelta(hours=1)}
    token = jwt.encode(claims, private, algorithm="RS256", headers={"kid": "k1"})
    auth = Authenticator(verify_signature=True, public_keys=keys)
    assert auth.mode == "jwt:RS256"
    assert auth.authorize(token, tenant="acme", role="read", at=NOW) is not None
    wrong_kid = jwt.encode(claims, private, algorithm="RS256", headers={"kid": "k2"})
    assert "kid" in refusal(auth, wrong_kid).reason

    pem = tmp_path / "key.pem"
    pem.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    from_pem = Authenticator(verify_signature=True, public_keys=load_public_keys(pem))
    no_kid = jwt.encode(claims, private, algorithm="RS256")
    assert from_pem.authorize(no_kid, tenant="acme", role="read", at=NOW) is not None
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(claims, other, algorithm="RS256")
    assert refusal(from_pem, forged).reason == "bad signature"


def test_rbac_requires_the_role() -> None:
    auth = verifier(rbac_enforce=True)
    error = refusal(auth, hs256(roles=["read"]))
    assert error.code is FailureCode.FORBIDDEN and "lacks role 'submit'" in error.reason
    assert auth.authorize(hs256(roles=["submit"]), tenant="acme", role="submit", at=NOW)
    # Without RBAC the roles are not looked at.
    assert verifier().authorize(hs256(roles=[]), tenant="acme", role="submit", at=NOW)


def test_rbac_without_signature_checks_decode_but_do_not_verify() -> None:
    auth = Authenticator(rbac_enforce=True)
    assert auth.enabled and auth.mode == "stub"
    token = hs256(secret="anything-at-all-0123456789-0123456789", roles=["submit"])
    assert auth.authorize(token, tenant="acme", role="submit", at=NOW) is not None
    assert refusal(auth, None).code is FailureCode.UNAUTHORIZED


def test_verification_needs_a_key() -> None:
    with pytest.raises(ValueError, match="AOS_JWT_SECRET"):
        Authenticator(verify_signature=True)


def test_bearer_header_round_trip_and_codes_are_final() -> None:
    assert bearer_token(bearer_header("abc")) == "abc"
    assert bearer_token({"authorization": "bearer xyz"}) == "xyz"
    assert bearer_token({"Authorization": "Basic xyz"}) is None
    assert bearer_token(None) is None
    assert not RETRYABLE[FailureCode.UNAUTHORIZED] and not RETRYABLE[FailureCode.FORBIDDEN]
