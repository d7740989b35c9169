"""Whether a dependency answers, for /readyz: the Anthropic endpoint when Claude is set.

One cheap request (`GET {base_url}/v1/models` with the key): any HTTP answer below 500 —
even 401 or 404 — means the endpoint is there; a connection failure, a timeout or a 5xx
(a 501 from a server that has no models endpoint, too) means it is not, or cannot be
told. The answer is kept for `ttl_s`, so probes every few seconds from Kubernetes cost
one request per 30 s. The key travels in a header only and is never logged.

Services report it as an advisory (http.py): Claude unreachable is `degraded`, never
not ready, because work that does not call Claude goes on, and work that does is
retried by the skill and the planner.
"""

from __future__ import annotations

import logging
import time

import httpx

log = logging.getLogger(__name__)

DEFAULT_ANTHROPIC_URL = "https://api.anthropic.com"
CACHE_TTL_S = 30.0


class AnthropicProbe:
    def __init__(
        self,
        api_key: str,
        base_url: str | None = None,
        *,
        ttl_s: float = CACHE_TTL_S,
        timeout_s: float = 1.5,
    ) -> None:
        self._api_key = api_key
        self.base_url = (base_url or DEFAULT_ANTHROPIC_URL).rstrip("/")
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.requests = 0  # how many probes went out (the cache is tested by it)
        self._cached: tuple[float, str | None] | None = None

    async def check(self) -> bool:
        return await self.problem() is None

    async def problem(self) -> str | None:
        """None when the endpoint answers, else why not (an advisory check, http.py)."""
        now = time.monotonic()
        if self._cached is not None and now - self._cached[0] < self.ttl_s:
            return self._cached[1]
        problem = await self._probe()
        self._cached = (time.monotonic(), problem)
        return problem

    async def _probe(self) -> str | None:
        self.requests += 1
        headers = {"x-api-key": self._api_key, "anthropic-version": "2023-06-01"}
        try:
            async with httpx.AsyncClient(timeout=self.timeout_s) as client:
                response = await client.get(f"{self.base_url}/v1/models", headers=headers)
        except httpx.HTTPError as exc:
            log.warning("anthropic endpoint %s unreachable: %s", self.base_url, type(exc).__name__)
            return f"{self.base_url} unreachable ({type(exc).__name__})"
        if response.status_code >= 500:
            log.warning("anthropic endpoint %s answers %d", self.base_url, response.status_code)
            return f"GET {self.base_url}/v1/models answered {response.status_code}"
        return None
