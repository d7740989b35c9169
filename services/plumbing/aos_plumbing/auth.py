"""Who may do what: the JWT users put on the messages they publish, and its roles.

A goal or a cancel carries `Authorization: Bearer <jwt>` as a NATS header; the tracer's
HTTP API takes the same header. Two flags decide what is enforced:

- `JWT_VERIFY_SIGNATURE=true`: a token is required and verified: signature (HS256 with
  `AOS_JWT_SECRET`, RS256/ES256 with the keys of `AOS_JWT_JWKS_FILE`), expiry, audience
  (`AOS_JWT_AUDIENCE`) and issuer (`AOS_JWT_ISSUER`) when set. The tenant is the token's
  `tenant` claim, never the payload's: a message naming another tenant is refused.
- `RBAC_ENFORCE=true`: the token's `roles` claim must hold the role the action needs
  (`submit`, `cancel`, `read`, `admin`). Without signature verification the token is
  decoded but not verified: roles are then a convenience, not a security boundary.

Both off (the default) is stub mode: tokens are neither required nor looked at.

A message is judged at the time it entered the log (its JetStream timestamp), not at the
time a consumer reads it: every service that judges it (planner, ledger, executor, and
each of them again on redelivery or rebuild) reaches the same decision, and a consumer
that lags behind does not refuse goals whose tokens were valid when they were sent.

Tokens are secrets: nothing here logs one, and refusal reasons never quote it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt

from aos_contracts.failures import FailureCode
from aos_plumbing.settings import CommonSettings

AUTHORIZATION = "Authorization"
ROLE_SUBMIT = "submit"
ROLE_CANCEL = "cancel"
ROLE_READ = "read"
ROLE_ADMIN = "admin"  # reads what spans tenants (the tracer's parked messages)

_HMAC_ALGORITHMS = ("HS256",)
_PUBLIC_KEY_ALGORITHMS = ("RS256", "ES256")


class AuthError(Exception):
    """A refusal: `code` is UNAUTHORIZED (no valid token) or FORBIDDEN (a valid token
    that may not do this); the message says why, without quoting the token."""

    def __init__(self, code: FailureCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason

    @property
    def http_status(self) -> int:
        return 401 if self.code is FailureCode.UNAUTHORIZED else 403


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a token says its bearer is."""

    tenant: str
    roles: frozenset[str]
    subject: str | None = None
    verified: bool = True


def bearer_token(headers: Mapping[str, str] | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, if any (any case)."""
    if not headers:
        return None
    for name, value in headers.items():
        if name.lower() == AUTHORIZATION.lower():
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def bearer_header(token: str) -> dict[str, str]:
    return {AUTHORIZATION: f"Bearer {token}"}


class Authenticator:
    """Judges tokens; one per service, built from its settings."""

    def __init__(
        self,
        *,
        verify_signature: bool = False,
        rbac_enforce: bool = False,
        secret: str | None = None,
        public_keys: list[jwt.PyJWK] | None = None,
        audience: str | None = None,
        issuer: str | None = None,
        leeway_s: float = 30.0,
    ) -> None:
        self.verify_signature = verify_signature
        self.rbac_enforce = rbac_enforce
        self._secret = secret
        self._public_keys = public_keys or []
        self.audience = audience
        self.issuer = issuer
        self.leeway_s = leeway_s
        if verify_signature and not secret and not self._public_keys:
            raise ValueError(
                "JWT_VERIFY_SIGNATURE=true needs AOS_JWT_SECRET (HS256) or "
                "AOS_JWT_JWKS_FILE (RS256/ES256 public keys)"
            )

    @classmethod
    def from_settings(cls, settings: CommonSettings) -> Authenticator:
        keys = load_public_keys(settings.jwt_jwks_file) if settings.jwt_jwks_file else None
        return cls(
            verify_signature=settings.jwt_verify_signature,
            rbac_enforce=settings.rbac_enforce,
            secret=settings.jwt_secret.get_secret_value() if settings.jwt_secret else None,
            public_keys=keys,
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
            leeway_s=settings.jwt_leeway_s,
        )

    @property
    def enabled(self) -> bool:
        """Whether tokens are required at all."""
        return self.verify_signature or self.rbac_enforce

    @property
    def mode(self) -> str:
        """For /readyz backends and `aos stubs`: `stub` when tokens are not verified."""
        if not self.verify_signature:
            return "stub"
        algorithms = [*(["HS256"] if self._secret else [])]
        algorithms += [key.algorithm_name for key in self._public_keys]
        return "jwt:" + "+".join(dict.fromkeys(algorithms))

    @property
    def rbac_mode(self) -> str:
        return "enforced" if self.rbac_enforce else "off"

    def principal(self, token: str | None, *, at: datetime | None = None) -> Principal:
        """Who the token names, as of `at` (default now); AuthError when it does not."""
        if token is None:
            raise AuthError(FailureCode.UNAUTHORIZED, "no bearer token (Authorization header)")
        at = at or datetime.now(UTC)
        claims = self._claims(token)
        self._check_times(claims, at)
        tenant = claims.get("tenant")
        if not isinstance(tenant, str) or not tenant:
            raise AuthError(FailureCode.UNAUTHORIZED, "token has no tenant claim")
        roles = claims.get("roles", [])
        if isinstance(roles, str):
            roles = roles.split()
        if not isinstance(roles, list):
            raise AuthError(FailureCode.UNAUTHORIZED, "token's roles claim is not a list")
        subject = claims.get("sub")
        return Principal(
            tenant=tenant,
            roles=frozenset(str(role) for role in roles),
            subject=subject if isinstance(subject, str) else None,
            verified=self.verify_signature,
        )

    def authorize(
        self, token: str | None, *, tenant: str, role: str, at: datetime | None = None
    ) -> Principal | None:
        """Whether the bearer may act on `tenant`'s runs with `role`; None in stub mode
        (nothing is checked), AuthError with the reason when refused."""
        if not self.enabled:
            return None
        principal = self.principal(token, at=at)
        if principal.tenant != tenant:
            raise AuthError(
                FailureCode.FORBIDDEN,
                f"tenant mismatch: the token is for tenant {principal.tenant!r}, "
                f"the request names tenant {tenant!r}",
            )
        self.require_role(principal, role)
        return principal

    def authorize_message(self, msg: Any, *, tenant: str, role: str) -> Principal | None:
        """`authorize` for a message of the log: its bearer token, judged at the time the
        message entered the log, so every service (and every rebuild) agrees."""
        return self.authorize(
            bearer_token(getattr(msg, "headers", None)),
            tenant=tenant,
            role=role,
            at=message_time(msg),
        )

    def admits_goal(self, goal_tenant: str, msg: Any) -> bool:
        """Whether a goal message's token lets it open a run: the one judgement the planner
        (accepting) and the ledger (opening a budget) share, so a goal the planner refuses
        never gets a budget, and never owns its run id."""
        try:
            self.authorize_message(msg, tenant=goal_tenant, role=ROLE_SUBMIT)
        except AuthError:
            return False
        return True

    def caller_tenant(self, headers: Mapping[str, str] | None, role: str) -> str | None:
        """The tenant a request's bearer token confines it to, once it holds `role`;
        None when no tokens are required (stub mode). AuthError when refused."""
        if not self.enabled:
            return None
        principal = self.principal(bearer_token(headers))
        self.require_role(principal, role)
        return principal.tenant

    def require_role(self, principal: Principal, role: str) -> None:
        if self.rbac_enforce and role not in principal.roles:
            held = ", ".join(sorted(principal.roles)) or "none"
            raise AuthError(
                FailureCode.FORBIDDEN, f"the token lacks role {role!r} (it has: {held})"
            )

    # --- the token ----------------------------------------------------------------------

    def _claims(self, token: str) -> dict[str, Any]:
        # Expiry and not-before are checked by _check_times against the reference time.
        unverified: Any = {"verify_signature": False}
        options: Any = {
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
            "verify_aud": self.audience is not None,
            "require": ["exp"],
        }
        try:
            if not self.verify_signature:
                claims = jwt.decode(token, options=unverified)
            else:
                key, algorithms = self._key_for(token)
                claims = jwt.decode(
                    token,
                    key,
                    algorithms=algorithms,
                    audience=self.audience,
                    issuer=self.issuer,
                    options=options,
                )
        except jwt.InvalidSignatureError:
            raise AuthError(FailureCode.UNAUTHORIZED, "bad signature") from None
        except jwt.InvalidAudienceError:
            raise AuthError(
                FailureCode.UNAUTHORIZED, f"wrong audience (expected {self.audience!r})"
            ) from None
        except jwt.InvalidIssuerError:
            raise AuthError(
                FailureCode.UNAUTHORIZED, f"wrong issuer (expected {self.issuer!r})"
            ) from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(FailureCode.UNAUTHORIZED, f"token has no {exc.claim} claim") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError(FailureCode.UNAUTHORIZED, "token algorithm not accepted") from None
        except jwt.PyJWTError as exc:
            # pyjwt's messages describe the token's shape, never its content.
            raise AuthError(FailureCode.UNAUTHORIZED, f"invalid token: {exc}") from None
        return dict(claims)

    def _key_for(self, token: str) -> tuple[Any, list[str]]:
        """The key for the token's algorithm: HMAC tokens only ever meet the secret and
        public-key tokens only the public keys (no algorithm confusion)."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise AuthError(FailureCode.UNAUTHORIZED, f"invalid token: {exc}") from None
        algorithm = header.get("alg")
        if algorithm in _HMAC_ALGORITHMS and self._secret:
            return self._secret, [algorithm]
        if algorithm in _PUBLIC_KEY_ALGORITHMS and self._public_keys:
            kid = header.get("kid")
            candidates = [k for k in self._public_keys if k.algorithm_name == algorithm]
            if kid is not None:
                candidates = [k for k in candidates if k.key_id == kid]
            if len(candidates) == 1:
                return candidates[0].key, [algorithm]
            raise AuthError(
                FailureCode.UNAUTHORIZED,
                f"no single {algorithm} key matches the token's kid {kid!r}",
            )
        raise AuthError(FailureCode.UNAUTHORIZED, f"token algorithm {algorithm!r} not accepted")

    def _check_times(self, claims: Mapping[str, Any], at: datetime) -> None:
        now = at.timestamp()
        exp = claims.get("exp")
        if exp is not None:
            if not isinstance(exp, int | float):
                raise AuthError(FailureCode.UNAUTHORIZED, "token's exp is not a number")
            if exp + self.leeway_s < now:
                when = datetime.fromtimestamp(exp, UTC).isoformat(timespec="seconds")
                raise AuthError(FailureCode.UNAUTHORIZED, f"token expired at {when}")
        nbf = claims.get("nbf")
        if isinstance(nbf, int | float) and nbf - self.leeway_s > now:
            raise AuthError(FailureCode.UNAUTHORIZED, "token not valid yet (nbf)")


def load_public_keys(path: Path) -> list[jwt.PyJWK]:
    """A JWKS file (`{"keys": [...]}`), one JWK, or one PEM public key (taken as RS256)."""
    text = path.read_text()
    if text.lstrip().startswith("-----BEGIN"):
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        key = load_pem_public_key(text.encode())
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key))  # type: ignore[arg-type]
        jwk.setdefault("alg", "RS256")
        return [jwt.PyJWK(jwk)]
    data = json.loads(text)
    if isinstance(data, dict) and "keys" in data:
        keys = [k for k in data["keys"] if isinstance(k, dict) and k.get("use", "sig") == "sig"]
        return [jwt.PyJWK(k, algorithm=k.get("alg")) for k in keys]
    return [jwt.PyJWK(data, algorithm=data.get("alg"))]


def message_time(msg: Any) -> datetime | None:
    """When a JetStream message entered the log: the reference time for its token."""
    metadata = getattr(msg, "metadata", None)
    timestamp = getattr(metadata, "timestamp", None)
    if isinstance(timestamp, datetime):
        return timestamp if timestamp.tzinfo else timestamp.replace(tzinfo=UTC)
    stored = getattr(msg, "time", None)  # RawStreamMsg from get_msg
    if isinstance(stored, datetime):
        return stored if stored.tzinfo else stored.replace(tzinfo=UTC)
    return None
