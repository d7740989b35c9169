"""Where the CLI finds AOS: the environment first, then the state file of `aos up`.

`aos up` writes `<data_dir>/state.json` once every service is ready and removes it when
it stops, so commands run in the same folder find the stack without any flags. Each
setting is resolved on its own: an environment variable wins over the state file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aos_contracts.subjects import DEFAULT_NAMESPACE

DEFAULT_DATA_DIR = Path(".aos")
STATE_FILE = "state.json"


class UserError(Exception):
    """A mistake the user can fix (a flag, a missing server, an unknown run): the CLI
    prints the message as one line and exits non-zero, without a traceback."""


@dataclass(frozen=True)
class ClientConfig:
    nats_url: str | None
    namespace: str
    tracer_url: str | None
    service_urls: dict[str, str] = field(default_factory=dict)
    state_path: Path | None = None

    def require_nats(self) -> str:
        if not self.nats_url:
            raise UserError(
                "no AOS to talk to: start one with `aos up` (or `make run`), or set AOS_NATS_URL"
            )
        return self.nats_url

    def require_tracer(self) -> str:
        if not self.tracer_url:
            raise UserError(
                "no tracer to ask: start AOS with `aos up` (or `make run`), or set AOS_TRACER_URL"
            )
        return self.tracer_url.rstrip("/")


def state_path(data_dir: Path) -> Path:
    return data_dir / STATE_FILE


def read_state(data_dir: Path) -> dict[str, Any] | None:
    path = state_path(data_dir)
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from exc
    return state if isinstance(state, dict) else None


def write_state(data_dir: Path, state: Mapping[str, Any]) -> Path:
    path = state_path(data_dir)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    # Atomic: a command reading it never sees half a file.
    tmp.replace(path)
    return path


def remove_state(data_dir: Path) -> None:
    state_path(data_dir).unlink(missing_ok=True)


def load_config(data_dir: Path, env: Mapping[str, str] | None = None) -> ClientConfig:
    env = os.environ if env is None else env
    state = read_state(data_dir) or {}
    services = state.get("services") if isinstance(state.get("services"), dict) else {}
    service_urls = {str(k): str(v) for k, v in (services or {}).items()}
    for name in ("planner", "executor", "ledger", "tracer"):
        override = env.get(f"AOS_{name.upper()}_URL")
        if override:
            service_urls[name] = override
    return ClientConfig(
        nats_url=env.get("AOS_NATS_URL") or _str(state.get("nats_url")),
        namespace=env.get("AOS_NAMESPACE") or _str(state.get("namespace")) or DEFAULT_NAMESPACE,
        tracer_url=service_urls.get("tracer"),
        service_urls=service_urls,
        state_path=state_path(data_dir) if state else None,
    )


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None
