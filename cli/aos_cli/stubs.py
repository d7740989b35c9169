"""`aos stubs`: which backends are stubs right now.

Two sources, both shown: the environment flags this shell would start services with,
and, for every service that answers, the backends its /readyz says it runs on (the
truth for a stack started elsewhere or with other flags).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from aos_cli.client import service_readiness
from aos_cli.config import load_config

# Backend values that mean "not the real thing".
STUB_VALUES = frozenset({"stub", "memory", "in-memory", "fake"})
SERVICES = ("planner", "executor", "ledger", "tracer")


@dataclass(frozen=True)
class Flag:
    name: str
    value: str
    meaning: str
    stub: bool


def _truthy(value: str | None, default: bool) -> bool:
    if value is None or value == "":
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def env_flags(env: Mapping[str, str]) -> list[Flag]:
    planner = env.get("PLANNER_BACKEND") or "stub"
    has_key = bool((env.get("ANTHROPIC_API_KEY") or "").strip())
    base_url = env.get("ANTHROPIC_BASE_URL") or ""
    http_backend = env.get("AOS_HTTP_BACKEND") or "httpx"
    postgres_traces = _truthy(env.get("USE_POSTGRES_TRACES"), True)
    external_off = _truthy(env.get("DISABLE_EXTERNAL_CALLS"), False)
    rbac = _truthy(env.get("RBAC_ENFORCE"), False)
    jwt = _truthy(env.get("JWT_VERIFY_SIGNATURE"), False)
    return [
        Flag(
            "PLANNER_BACKEND",
            planner,
            "planner: rule-based stub" if planner == "stub" else f"planner: {planner}",
            planner == "stub",
        ),
        Flag(
            "ANTHROPIC_API_KEY",
            "set" if has_key else "unset",
            (f"llm_invoke: Claude at {base_url}" if base_url else "llm_invoke: Claude")
            if has_key
            else "no Claude key: llm_invoke is a stub",
            not has_key,
        ),
        Flag(
            "AOS_HTTP_BACKEND",
            http_backend,
            "http_call: httpx" if http_backend != "stub" else "http_call: canned responses",
            http_backend == "stub",
        ),
        Flag(
            "USE_POSTGRES_TRACES",
            str(postgres_traces).lower(),
            "tracer: PostgreSQL" if postgres_traces else "tracer: in memory, lost on restart",
            not postgres_traces,
        ),
        Flag(
            "DISABLE_EXTERNAL_CALLS",
            str(external_off).lower(),
            "http_call refuses hosts off the allow-list"
            if external_off
            else "http_call may call out",
            False,
        ),
        Flag(
            "RBAC_ENFORCE",
            str(rbac).lower(),
            "roles enforced" if rbac else "roles not enforced",
            False,
        ),
        Flag(
            "JWT_VERIFY_SIGNATURE",
            str(jwt).lower(),
            "JWT on goals, cancels and trace reads: signature, expiry, audience verified"
            if jwt
            else "auth stub: tokens neither required nor verified",
            not jwt,
        ),
    ]


def service_backends(urls: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Per service: its URL, whether it answered, and its backends."""
    found: dict[str, dict[str, Any]] = {}
    for name in SERVICES:
        url = urls.get(name)
        if not url:
            continue
        body = service_readiness(url)
        backends = body.get("backends") if body else None
        found[name] = {
            "url": url,
            "reachable": body is not None,
            "ready": bool(body.get("ready")) if body else False,
            "backends": backends if isinstance(backends, dict) else {},
        }
    return found


def run_stubs(args: argparse.Namespace) -> int:
    config = load_config(args.data_dir)
    flags = env_flags(os.environ)
    services = service_backends(config.service_urls)
    if args.json:
        print(json.dumps({"flags": [asdict(flag) for flag in flags], "services": services}))
        return 0
    print("environment flags:")
    width = max(len(flag.name) for flag in flags)
    for flag in flags:
        marker = "STUB" if flag.stub else "    "
        print(f"  {marker}  {flag.name:<{width}}  {flag.value:<6}  {flag.meaning}")
    print()
    if not services:
        print("services: none known (start them with `aos up`, or set AOS_<SERVICE>_URL)")
        return 0
    print("running services (from /readyz):")
    for name, info in services.items():
        if not info["reachable"]:
            print(f"  {name:<9} {info['url']}: not reachable")
            continue
        backends = info["backends"]
        if not backends:
            print(f"  {name:<9} no backends reported")
        for key, value in sorted(backends.items()):
            marker = "STUB" if str(value).lower() in STUB_VALUES else "    "
            print(f"  {marker}  {name:<9} {key} = {value}")
    return 0
