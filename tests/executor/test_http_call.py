"""http_call on real httpx against HTTP servers on 127.0.0.1, and its host policy."""

from __future__ import annotations

import asyncio
import ipaddress
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
from aiohttp import web

from aos_contracts.failures import FailureCode
from aos_contracts.progress import StepProgress
from aos_contracts.skills import HttpCallParams
from aos_executor.skills import (
    CircuitBreakers,
    HostPolicy,
    HttpCallSkill,
    RetryPolicy,
    SkillContext,
    SkillError,
    StubHttpSkill,
)
from aos_executor.skills.circuit import CircuitBreaker, CircuitState
from aos_executor.skills.guard import is_forbidden_address
from aos_executor.skills.retry import parse_retry_after
from tests.support.http import serving_every_path


@dataclass
class Reply:
    status: int = 200
    json: Any = None
    text: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    chunks: list[bytes] | None = None  # a chunked, streamed body
    hang: bool = False


@dataclass
class Origin:
    """A scripted HTTP server: each request to a path takes the next reply for it."""

    script: dict[str, list[Reply]] = field(default_factory=dict)
    seen: list[dict[str, Any]] = field(default_factory=list)
    port: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def hits(self, path: str) -> int:
        return sum(1 for request in self.seen if request["path"] == path)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(
            {
                "path": request.path,
                "method": request.method,
                "query": dict(request.query),
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "body": await request.read(),
            }
        )
        replies = self.script.get(request.path) or [Reply(json={"ok": True})]
        reply = replies.pop(0) if len(replies) > 1 else replies[0]
        if reply.hang:
            await self.release.wait()
        if reply.chunks is not None:
            response = web.StreamResponse(status=reply.status, headers=reply.headers)
            response.enable_chunked_encoding()
            await response.prepare(request)
            for chunk in reply.chunks:
                await response.write(chunk)
            await response.write_eof()
            return response
        if reply.json is not None:
            return web.json_response(reply.json, status=reply.status, headers=reply.headers)
        return web.Response(text=reply.text or "", status=reply.status, headers=reply.headers)


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    server = Origin()
    async with serving_every_path(server.handle) as server.port:
        try:
            yield server
        finally:
            server.release.set()  # a held request ends before the server stops


class RecordedSleep:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


@dataclass
class Harness:
    skill: HttpCallSkill
    sleep: RecordedSleep
    progress: list[StepProgress]
    now: list[float]

    def context(self) -> SkillContext:
        async def sink(message: StepProgress) -> None:
            self.progress.append(message)

        ctx = SkillContext.detached("http_call")
        ctx.sink = sink
        return ctx

    async def call(self, **params: Any) -> Any:
        return await self.skill.run(HttpCallParams(**params), self.context())

    async def fails(self, **params: Any) -> SkillError:
        with pytest.raises(SkillError) as caught:
            await self.call(**params)
        return caught.value


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    sleep = RecordedSleep()
    now = [0.0]
    skill = HttpCallSkill(
        policy=HostPolicy.from_list(False, "127.0.0.1"),
        breakers=CircuitBreakers(failure_threshold=3, cooldown_s=30.0, clock=lambda: now[0]),
        retry=RetryPolicy(max_retries=2, base_s=0.5, sleep=sleep, rng=random.Random(7)),
        max_bytes=1024,
    )
    try:
        yield Harness(skill, sleep, [], now)
    finally:
        await skill.aclose()


async def test_get_returns_status_headers_and_decoded_json(
    origin: Origin, harness: Harness
) -> None:
    origin.script["/notes"] = [Reply(json={"notes": ["a", "b"]})]
    result = await harness.call(
        url=origin.url("/notes"), query={"limit": "2"}, headers={"x-trace": "1"}
    )
    assert result.output["status"] == 200
    assert result.output["body"] == {"notes": ["a", "b"]}
    assert result.output["headers"]["content-type"].startswith("application/json")
    assert origin.seen[0]["query"] == {"limit": "2"}
    assert origin.seen[0]["headers"]["x-trace"] == "1"
    telemetry = result.telemetry
    assert telemetry is not None
    assert (telemetry.backend, telemetry.calls, telemetry.retries) == ("httpx", 1, 0)
    assert telemetry.circuit == f"http:127.0.0.1:{origin.port}"
    assert telemetry.circuit_state == "closed" and telemetry.status_code == 200
    assert result.cost_cents == 0


async def test_json_and_raw_bodies_are_sent(origin: Origin, harness: Harness) -> None:
    await harness.call(url=origin.url("/a"), method="POST", json_body={"x": 1})
    await harness.call(url=origin.url("/b"), method="PUT", body="plain words")
    assert origin.seen[0]["body"] == b'{"x":1}' or origin.seen[0]["body"] == b'{"x": 1}'
    assert origin.seen[1]["body"] == b"plain words"
    both = await harness.fails(url=origin.url("/c"), method="POST", json_body={}, body="x")
    assert both.failure.code is FailureCode.INPUT_INVALID


async def test_5xx_is_retried_honouring_retry_after_seconds_and_dates(
    origin: Origin, harness: Harness
) -> None:
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=20), usegmt=True)
    origin.script["/flaky"] = [
        Reply(503, text="busy", headers={"Retry-After": "2"}),
        Reply(503, text="busy", headers={"Retry-After": later}),
        Reply(json={"ok": True}),
    ]
    result = await harness.call(url=origin.url("/flaky"))
    assert result.output["body"] == {"ok": True}
    assert origin.hits("/flaky") == 3
    assert harness.sleep.delays[0] == 2.0
    assert 15 < harness.sleep.delays[1] <= 20
    assert result.telemetry is not None
    assert (result.telemetry.calls, result.telemetry.retries) == (3, 2)


async def test_backoff_without_retry_after_is_jittered_and_bounded(
    origin: Origin, harness: Harness
) -> None:
    origin.script["/down"] = [Reply(500, text="boom")]
    error = await harness.fails(url=origin.url("/down"))
    assert error.failure.code is FailureCode.HTTP_5XX and error.failure.retryable
    assert origin.hits("/down") == 3  # the first call and two retries
    first, second = harness.sleep.delays
    assert 0 <= first <= 0.5 and 0 <= second <= 1.0
    assert error.telemetry is not None and error.telemetry.status_code == 500


async def test_4xx_fails_at_once_but_429_is_retried(origin: Origin, harness: Harness) -> None:
    origin.script["/missing"] = [Reply(404, text="no such notes")]
    error = await harness.fails(url=origin.url("/missing"))
    assert error.failure.code is FailureCode.HTTP_4XX and not error.failure.retryable
    assert "404" in error.failure.message and "no such notes" in error.failure.message
    assert origin.hits("/missing") == 1

    origin.script["/limited"] = [Reply(429, headers={"Retry-After": "1"}), Reply(json={})]
    result = await harness.call(url=origin.url("/limited"), method="POST", json_body={})
    assert result.output["status"] == 200 and harness.sleep.delays == [1.0]


async def test_unsafe_methods_are_not_retried_on_5xx(origin: Origin, harness: Harness) -> None:
    origin.script["/order"] = [Reply(500, text="maybe processed")]
    error = await harness.fails(url=origin.url("/order"), method="POST", json_body={"n": 1})
    assert error.failure.code is FailureCode.HTTP_5XX
    assert origin.hits("/order") == 1  # a POST that may have been processed is not repeated
    # Nor by the step's next attempt: the failure says it must not be retried, and why.
    assert not error.failure.retryable and "not sent again" in error.failure.message
    assert not error.failure.outcome_unknown  # the server answered


async def test_an_unsafe_call_cut_off_is_not_retried_by_the_step_either(
    origin: Origin, harness: Harness
) -> None:
    origin.script["/pay"] = [Reply(hang=True)]
    error = await harness.fails(url=origin.url("/pay"), method="POST", timeout_s=0.2)
    assert error.failure.code is FailureCode.SKILL_TIMEOUT and not error.failure.retryable
    assert error.failure.outcome_unknown  # no answer: the server may have acted on it
    assert origin.hits("/pay") == 1
    # Declared idempotent (the server deduplicates by Idempotency-Key): retried, same key.
    origin.release.set()
    origin.script["/pay-once"] = [Reply(500, text="hiccup"), Reply(json={"paid": True})]
    result = await harness.call(url=origin.url("/pay-once"), method="POST", idempotent=True)
    assert result.output["body"] == {"paid": True}
    keys = {r["headers"]["idempotency-key"] for r in origin.seen if r["path"] == "/pay-once"}
    assert len(keys) == 1


async def test_refused_connection_is_retried_and_reported(harness: Harness) -> None:
    harness.skill.policy = HostPolicy.from_list(False, "127.0.0.1")
    with_no_server = "http://127.0.0.1:9/"  # discard port: nothing listens
    error = await harness.fails(url=with_no_server)
    assert error.failure.code is FailureCode.HTTP_5XX and error.failure.retryable
    assert error.telemetry is not None and error.telemetry.calls == 3


async def test_timeout_fails_with_skill_timeout(origin: Origin, harness: Harness) -> None:
    harness.skill.retry = RetryPolicy(max_retries=0, sleep=harness.sleep)
    origin.script["/slow"] = [Reply(hang=True)]
    error = await harness.fails(url=origin.url("/slow"), timeout_s=0.2)
    assert error.failure.code is FailureCode.SKILL_TIMEOUT


def state_now(breaker: CircuitBreaker) -> CircuitState:
    """The breaker's state, read again (mypy keeps `breaker.state` narrowed across awaits)."""
    return breaker.state


async def test_circuit_opens_half_opens_and_closes(origin: Origin, harness: Harness) -> None:
    url = origin.url("/sick")
    origin.script["/sick"] = [Reply(500, text="x")]
    # Three consecutive failures (one call and two retries) open the circuit.
    error = await harness.fails(url=url)
    assert error.failure.code is FailureCode.HTTP_5XX
    assert error.telemetry is not None and error.telemetry.circuit_state == "open"
    # Open: the next call does not reach the host at all.
    error = await harness.fails(url=url)
    assert error.failure.code is FailureCode.CIRCUIT_OPEN and error.failure.retryable
    assert origin.hits("/sick") == 3
    # Another host (another port) has its own breaker.
    assert harness.skill.breakers.get("http:127.0.0.1:9").state == "closed"

    # After the cool-down one probe goes out; it fails, so the circuit opens again
    # without retrying.
    harness.now[0] = 31.0
    breaker = harness.skill.breakers.get(f"http:127.0.0.1:{origin.port}")
    assert breaker.state == "half_open"
    error = await harness.fails(url=url)
    assert origin.hits("/sick") == 4
    assert error.failure.code is FailureCode.CIRCUIT_OPEN and state_now(breaker) == "open"

    # The next probe succeeds and closes it.
    harness.now[0] = 62.0
    origin.script["/sick"] = [Reply(json={"healthy": True})]
    result = await harness.call(url=url)
    assert result.telemetry is not None and result.telemetry.circuit_state == "closed"


async def test_circuit_state_is_a_metric(origin: Origin, harness: Harness) -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    origin.script["/gauge"] = [Reply(502, text="x")]
    await harness.fails(url=origin.url("/gauge"))
    value = prometheus_client.REGISTRY.get_sample_value(
        "aos_circuit_breaker_state", {"breaker": f"http:127.0.0.1:{origin.port}"}
    )
    assert value == 2.0  # open


async def test_streamed_body_is_published_as_progress(origin: Origin, harness: Harness) -> None:
    chunks = [b"line one\n", b"line two\n", b"line three\n"]
    origin.script["/stream"] = [Reply(chunks=chunks, headers={"content-type": "text/plain"})]
    result = await harness.call(url=origin.url("/stream"))
    assert result.output["body"] == "line one\nline two\nline three\n"
    assert "".join(p.text for p in harness.progress) == result.output["body"]
    assert {p.kind for p in harness.progress} == {"http.chunk"}
    assert harness.progress[-1].total_bytes == sum(len(chunk) for chunk in chunks)


async def test_body_over_the_cap_is_refused_without_reading_it_all(
    origin: Origin, harness: Harness
) -> None:
    origin.script["/huge"] = [Reply(chunks=[b"x" * 600] * 50)]
    error = await harness.fails(url=origin.url("/huge"))
    assert error.failure.code is FailureCode.INPUT_INVALID
    assert "max_bytes=1024" in error.failure.message
    assert origin.hits("/huge") == 1
    # A bigger per-call cap lets it through.
    origin.script["/huge"] = [Reply(chunks=[b"x" * 600] * 3)]
    result = await harness.call(url=origin.url("/huge"), max_bytes=10_000)
    assert len(result.output["body"]) == 1800


async def test_loopback_is_refused_unless_allowed(origin: Origin, harness: Harness) -> None:
    harness.skill.policy = HostPolicy.from_list(False, "")
    for url in (origin.url("/notes"), f"http://localhost:{origin.port}/notes"):
        error = await harness.fails(url=url)
        assert error.failure.code is FailureCode.EXTERNAL_CALLS_DISABLED
        assert "SSRF" in error.failure.message and not error.failure.retryable
    assert origin.seen == []


async def test_disable_external_calls_refuses_hosts_off_the_allow_list(
    origin: Origin, harness: Harness
) -> None:
    harness.skill.policy = HostPolicy.from_list(True, "")
    error = await harness.fails(url=origin.url("/notes"))
    assert error.failure.code is FailureCode.EXTERNAL_CALLS_DISABLED
    assert "DISABLE_EXTERNAL_CALLS" in error.failure.message
    harness.skill.policy = HostPolicy.from_list(True, "127.0.0.0/8")
    result = await harness.call(url=origin.url("/notes"))
    assert result.output["status"] == 200


def fake_dns(table: dict[str, list[str]]) -> Any:
    looked_up: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        looked_up.append(host)
        return table[host]

    resolve.looked_up = looked_up  # type: ignore[attr-defined]
    return resolve


@pytest.mark.parametrize(
    ("host", "addresses"),
    [
        ("metadata.internal", ["169.254.169.254"]),  # cloud metadata (link-local)
        ("intranet.corp", ["10.1.2.3"]),
        ("mixed.example", ["93.184.216.34", "192.168.0.10"]),  # one bad address is enough
        ("v6.example", ["fd00:ec2::254"]),  # AWS metadata over IPv6
        ("mapped.example", ["::ffff:127.0.0.1"]),
        ("alibaba.example", ["100.100.100.200"]),
    ],
)
async def test_ssrf_guard_checks_every_resolved_address(host: str, addresses: list[str]) -> None:
    policy = HostPolicy(False, (), resolver=fake_dns({host: addresses}))
    with pytest.raises(SkillError) as caught:
        await policy.check(host, 80)
    assert caught.value.failure.code is FailureCode.EXTERNAL_CALLS_DISABLED


async def test_public_addresses_pass_and_allow_list_forms_work() -> None:
    dns = fake_dns({"example.com": ["93.184.216.34"], "db.corp.example": ["10.0.0.5"]})
    assert await HostPolicy(False, (), resolver=dns).check("example.com", 443) == ["93.184.216.34"]
    for allow in ("db.corp.example", "*.corp.example", "10.0.0.0/8", "10.0.0.5"):
        policy = HostPolicy.from_list(False, allow)
        policy.resolver = dns
        assert await policy.check("db.corp.example", 443) == ["10.0.0.5"]


async def test_disabled_external_calls_refuse_before_any_dns_lookup() -> None:
    dns = fake_dns({})
    policy = HostPolicy(True, ("api.allowed.example",), resolver=dns)
    with pytest.raises(SkillError):
        await policy.check("example.com", 443)
    assert dns.looked_up == []


def test_forbidden_addresses() -> None:
    for text in ("127.0.0.1", "10.0.0.1", "172.16.0.1", "169.254.169.254", "::1", "0.0.0.0"):
        assert is_forbidden_address(ipaddress.ip_address(text)), text
    for text in ("93.184.216.34", "2606:4700::1111"):
        assert not is_forbidden_address(ipaddress.ip_address(text)), text


async def test_bad_urls_are_input_errors(harness: Harness) -> None:
    for url in ("ftp://127.0.0.1/x", "/relative", "http://"):
        error = await harness.fails(url=url)
        assert error.failure.code is FailureCode.INPUT_INVALID, url


def test_retry_after_parsing() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_retry_after("7", now) == 7.0
    assert parse_retry_after(format_datetime(now + timedelta(seconds=9), usegmt=True), now) == 9.0
    assert parse_retry_after(format_datetime(now - timedelta(seconds=9), usegmt=True), now) == 0.0
    assert parse_retry_after("soon", now) is None and parse_retry_after(None) is None


async def test_stub_answers_deterministically_by_url_prefix() -> None:
    stub = StubHttpSkill(responses={"https://api.example.com/notes": {"status": 200, "body": [1]}})
    context = SkillContext.detached()
    hit = await stub.run(HttpCallParams(url="https://api.example.com/notes?x=1"), context)
    miss = await stub.run(HttpCallParams(url="https://other.example/"), context)
    assert hit.output == {"status": 200, "body": [1]}
    assert miss.output["body"] == {"stub": True, "method": "GET", "url": "https://other.example/"}
    assert stub.is_stub and stub.backend == "stub"
