"""http_call: the real one on httpx, and the deterministic stub.

The real skill shares one httpx.AsyncClient (one connection pool) per process. Per call:
host policy (allow-list, SSRF guard) -> circuit breaker per host -> request, streamed,
body capped at `max_bytes`, chunks published as progress -> retries with backoff and
jitter (honouring Retry-After) on 5xx, 429, timeouts and failed connections.

Which calls are retried inside the skill: retry-safe ones (idempotent methods GET, HEAD,
PUT, DELETE, OPTIONS, or a step that declares `idempotent: true`) on every retryable
outcome; other POST and PATCH calls only when the request cannot have been processed
(the connection failed, or 429). Redirects are not followed (a redirect could lead past
the SSRF guard); a 3xx is returned as the result.

Every request carries an `Idempotency-Key` header (IETF httpapi draft), derived from
run, step and attempt: a call made again for the same attempt (its retries here, or
after the executor died mid-call) carries the same key, so a server can deduplicate it.
A key the step sets in `headers` itself is kept.

Failures: HTTP_5XX (retryable; also for refused connections), HTTP_4XX (not retryable,
except 408 and 429), SKILL_TIMEOUT, CIRCUIT_OPEN, EXTERNAL_CALLS_DISABLED, INPUT_INVALID
(a bad URL, a body over `max_bytes`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import httpcore
import httpx
from pydantic import BaseModel

from aos_contracts.events import StepTelemetry
from aos_contracts.failures import Failure, FailureCode
from aos_contracts.skills import SKILL_CONTRACTS, HttpCallParams, SkillContract
from aos_executor.skills.base import SkillContext, SkillError, SkillResult
from aos_executor.skills.circuit import CircuitBreaker, CircuitBreakers, attempt_telemetry
from aos_executor.skills.guard import HostPolicy
from aos_executor.skills.retry import RetryPolicy, parse_retry_after

DEFAULT_MAX_BYTES = 256 * 1024  # the body travels in step.succeeded: stay well under NATS' 1 MB
IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"
USER_AGENT = "aos-executor/1 (http_call)"


UNSAFE_TO_REPEAT = (
    "not sent again: the server may have processed it and the request is not safe to "
    "repeat (a GET, PUT or DELETE is; a POST or PATCH with idempotent: true, when the "
    "server deduplicates by Idempotency-Key)"
)


class _Outcome(Exception):
    """One call's failure, with whether retrying may help and what the server asked."""

    def __init__(
        self,
        failure: Failure,
        *,
        host_unhealthy: bool,
        safe_to_retry: bool,
        retry_after: float | None = None,
        status_code: int | None = None,
    ) -> None:
        super().__init__(failure.message)
        self.failure = failure
        self.host_unhealthy = host_unhealthy
        self.safe_to_retry = safe_to_retry
        self.retry_after = retry_after
        self.status_code = status_code


class PinnedBackend(httpcore.AsyncNetworkBackend):
    """Opens a host's connections to the address the SSRF guard last checked for it.

    httpx would otherwise resolve the name again to connect, and a DNS server that
    answers differently the second time (rebinding) could send the call to an address
    the guard never saw. The URL keeps its name, so `Host`, TLS SNI, the certificate
    check and connection pooling all stay per name; only the address is pinned."""

    def __init__(self) -> None:
        self._inner = httpcore.AnyIOBackend()
        self.pins: dict[str, str] = {}

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        address = self.pins.get(host)
        if address is None:
            # Every call is checked before it is sent: an unchecked host is a bug.
            raise httpcore.ConnectError(f"{host} was not checked by the SSRF guard")
        return await self._inner.connect_tcp(
            address,
            port,
            timeout=timeout,
            local_address=local_address,
            socket_options=socket_options,
        )

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("http_call does not connect to unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def pinned_transport(backend: PinnedBackend, limits: httpx.Limits) -> httpx.AsyncHTTPTransport:
    """httpx's transport (TLS settings, request and response mapping) over a connection
    pool that connects through `backend`."""
    transport = httpx.AsyncHTTPTransport(trust_env=False, limits=limits)
    # httpx 0.28 builds its pool in the constructor with no way to pass a network
    # backend; the pool is rebuilt with the same settings and the pinning backend.
    # tests/executor/test_http_pinning.py fails if a new httpx changes this.
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=transport._pool._ssl_context,
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=backend,
    )
    return transport


def _decode_body(raw: bytes, content_type: str) -> Any:
    text = raw.decode("utf-8", errors="replace")
    if "json" in content_type.lower():
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


@dataclass
class HttpCallSkill:
    policy: HostPolicy = field(default_factory=HostPolicy)
    breakers: CircuitBreakers = field(default_factory=CircuitBreakers)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    max_bytes: int = DEFAULT_MAX_BYTES
    client: httpx.AsyncClient | None = None
    contract: SkillContract = SKILL_CONTRACTS["http_call"]
    is_stub: bool = False
    backend: str = "httpx"

    def __post_init__(self) -> None:
        self.backend_pins = PinnedBackend()
        if self.client is None:
            self.client = httpx.AsyncClient(
                # trust_env=False: a proxy from the environment would sit between the
                # SSRF guard's view of the address and the real connection.
                trust_env=False,
                follow_redirects=False,
                transport=pinned_transport(
                    self.backend_pins,
                    httpx.Limits(max_connections=100, max_keepalive_connections=20),
                ),
                headers={"user-agent": USER_AGENT},
            )

    async def aclose(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    async def run(self, params: BaseModel, context: SkillContext) -> SkillResult:
        assert isinstance(params, HttpCallParams)
        try:
            url = httpx.URL(params.url)
        except httpx.InvalidURL as exc:
            raise SkillError.of(FailureCode.INPUT_INVALID, f"http_call url: {exc}") from exc
        if url.scheme not in ("http", "https") or not url.host:
            raise SkillError.of(
                FailureCode.INPUT_INVALID,
                f"http_call url {params.url!r}: only absolute http(s) URLs are allowed",
            )
        if params.json_body is not None and params.body is not None:
            raise SkillError.of(
                FailureCode.INPUT_INVALID, "http_call: give json_body or body, not both"
            )
        port = url.port or (443 if url.scheme == "https" else 80)
        addresses = await self.policy.check(url.host, port)
        # Keyed as httpcore names the host when it connects (IDNA-encoded).
        self.backend_pins.pins[url.raw_host.decode("ascii")] = addresses[0]
        breaker = self.breakers.get(f"http:{url.host}:{port}")
        delays: list[float] = []
        calls = 0
        while True:
            if not breaker.allow():
                raise SkillError(
                    Failure.of(
                        FailureCode.CIRCUIT_OPEN,
                        f"http_call: circuit for {url.host}:{port} is open after repeated "
                        "failures; not calling until it half-opens",
                    ),
                    self._telemetry(breaker, calls, delays),
                )
            calls += 1
            try:
                status, headers, body, size = await self._call_once(url, params, context)
            except _Outcome as outcome:
                if outcome.host_unhealthy:
                    breaker.record_failure()
                else:
                    breaker.record_success()
                may_call_again = outcome.safe_to_retry or self.contract.retry_safe(
                    params.model_dump()
                )
                retryable = outcome.failure.retryable and may_call_again
                delay = self.retry.delay(len(delays), outcome.retry_after) if retryable else None
                if delay is None:
                    failure = outcome.failure
                    if not outcome.safe_to_retry and outcome.status_code is None:
                        failure = failure.unknown_outcome()  # no response: it may have run
                    if failure.retryable and not may_call_again:
                        # Nor as the step's next attempt: the server may have acted on it.
                        failure = failure.final(UNSAFE_TO_REPEAT)
                    raise SkillError(
                        failure, self._telemetry(breaker, calls, delays, outcome.status_code)
                    ) from None
                delays.append(round(delay, 3))
                await self.retry.sleep(delay)
                continue
            except BaseException:
                breaker.release()
                raise
            breaker.record_success()
            return SkillResult(
                output={
                    "status": status,
                    "headers": headers,
                    "body": body,
                    "url": str(url),
                },
                telemetry=self._telemetry(breaker, calls, delays, status, size),
            )

    def _telemetry(
        self,
        breaker: CircuitBreaker,
        calls: int,
        delays: list[float],
        status_code: int | None = None,
        size: int | None = None,
    ) -> StepTelemetry:
        return attempt_telemetry(
            self.backend, breaker, calls, delays, status_code=status_code, response_bytes=size
        )

    async def _call_once(
        self, url: httpx.URL, params: HttpCallParams, context: SkillContext
    ) -> tuple[int, dict[str, str], Any, int]:
        assert self.client is not None
        limit = params.max_bytes or self.max_bytes
        headers = dict(params.headers)
        if not any(name.lower() == IDEMPOTENCY_KEY_HEADER.lower() for name in headers):
            # A Structured Field string, as the draft defines the header.
            headers[IDEMPOTENCY_KEY_HEADER] = f'"{context.idempotency_key}"'
        request = self.client.build_request(
            params.method,
            url,
            headers=headers,
            params=params.query or None,
            json=params.json_body,
            content=params.body,
            timeout=params.timeout_s,
        )
        try:
            response = await self.client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            # A connect timeout means nothing was sent; a read timeout may have been
            # processed, so only idempotent methods retry it.
            raise _Outcome(
                Failure.of(
                    FailureCode.SKILL_TIMEOUT, f"http_call {url.host}: {type(exc).__name__}"
                ),
                host_unhealthy=True,
                safe_to_retry=isinstance(exc, httpx.ConnectTimeout),
            ) from exc
        except httpx.TransportError as exc:
            raise _Outcome(
                Failure.of(
                    FailureCode.HTTP_5XX,
                    f"http_call {url.host}: no response ({type(exc).__name__}: {exc})",
                ),
                host_unhealthy=True,
                safe_to_retry=isinstance(exc, httpx.ConnectError),
            ) from exc
        try:
            status = response.status_code
            if status >= 400:
                snippet = (await _read_capped(response, 2048, None))[0]
                raise self._status_outcome(url, response, snippet)
            chunks: list[bytes] = []
            raw, size = await _read_capped(response, limit, context, chunks)
            if raw is None:
                raise _Outcome(
                    Failure.of(
                        FailureCode.INPUT_INVALID,
                        f"http_call {url}: response body exceeds max_bytes={limit}",
                    ),
                    host_unhealthy=False,
                    safe_to_retry=False,
                    status_code=status,
                )
            headers = {key.lower(): value for key, value in response.headers.items()}
            body = _decode_body(raw, response.headers.get("content-type", ""))
            return status, headers, body, size
        except httpx.TimeoutException as exc:
            raise _Outcome(
                Failure.of(FailureCode.SKILL_TIMEOUT, f"http_call {url.host}: body read timed out"),
                host_unhealthy=True,
                safe_to_retry=False,
            ) from exc
        except httpx.TransportError as exc:
            raise _Outcome(
                Failure.of(
                    FailureCode.HTTP_5XX,
                    f"http_call {url.host}: body broken ({type(exc).__name__}: {exc})",
                ),
                host_unhealthy=True,
                safe_to_retry=False,
            ) from exc
        finally:
            await response.aclose()

    def _status_outcome(
        self, url: httpx.URL, response: httpx.Response, snippet: bytes | None
    ) -> _Outcome:
        status = response.status_code
        text = (snippet or b"").decode("utf-8", errors="replace")[:300]
        message = f"http_call {response.request.method} {url}: HTTP {status}" + (
            f": {text}" if text else ""
        )
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        if status >= 500:
            return _Outcome(
                Failure.of(FailureCode.HTTP_5XX, message),
                host_unhealthy=True,
                safe_to_retry=status == 503 and retry_after is not None,
                retry_after=retry_after,
                status_code=status,
            )
        # 408 and 429: the server did not process the request and says try again later.
        transient = status in (408, 429)
        return _Outcome(
            Failure(code=FailureCode.HTTP_4XX, message=message, retryable=transient),
            host_unhealthy=False,
            safe_to_retry=status == 429,
            retry_after=retry_after,
            status_code=status,
        )


async def _read_capped(
    response: httpx.Response,
    limit: int,
    context: SkillContext | None,
    chunks: list[bytes] | None = None,
) -> tuple[bytes | None, int]:
    """The body, or None if it is longer than `limit` (reading stops there)."""
    parts = chunks if chunks is not None else []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            if context is None:  # an error body: keep what fits
                parts.append(chunk[: max(0, limit - (size - len(chunk)))])
                return b"".join(parts), limit
            return None, size
        parts.append(chunk)
        if context is not None:
            await context.progress("http.chunk", chunk.decode("utf-8", errors="replace"), size)
    return b"".join(parts), size


@dataclass
class StubHttpSkill:
    """Pre-configured deterministic responses: the first URL prefix that matches wins;
    any other URL gets a 200 whose body echoes the request."""

    responses: dict[str, dict[str, Any]] = field(default_factory=dict)
    contract: SkillContract = SKILL_CONTRACTS["http_call"]
    is_stub: bool = True
    backend: str = "stub"

    async def run(self, params: BaseModel, context: SkillContext) -> SkillResult:
        assert isinstance(params, HttpCallParams)
        telemetry = StepTelemetry(backend=self.backend, calls=1, status_code=200)
        for prefix, response in self.responses.items():
            if params.url.startswith(prefix):
                return SkillResult(json.loads(json.dumps(response)), telemetry=telemetry)
        return SkillResult(
            {
                "status": 200,
                "headers": {"content-type": "application/json"},
                "body": {"stub": True, "method": params.method, "url": params.url},
            },
            telemetry=telemetry,
        )

    async def aclose(self) -> None:
        pass
