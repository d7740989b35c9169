"""A Messages API on 127.0.0.1 that answers each request with the next scripted reply.

Enough of the API for the real `anthropic` SDK: POST /v1/messages, JSON replies with
content blocks, stop_reason and usage, and error bodies in the API's shape.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.support.http import serve_on_loopback

# A valid plan for "summarize the notes": extract the text, then ask the model.
SUMMARY_PLAN: dict[str, Any] = {
    "steps": [
        {
            "id": "text",
            "skill": "json_transform",
            "params": {"op": "extract", "input": "${goal.inputs}", "path": "text"},
        },
        {
            "id": "summary",
            "skill": "llm_invoke",
            "depends_on": ["text"],
            "params": {"prompt": "Summarise: ${steps.text.output}", "max_tokens": 200},
        },
    ],
    "rationale": "extract, then summarise",
}


async def first_request(api: ScriptedMessagesApi, within_s: float = 10.0) -> None:
    """Until the server has received a request (the planner's call is under way)."""
    for _ in range(int(within_s / 0.05)):
        if api.requests:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the planner never called the model")


def plan_call(
    plan: dict[str, Any], *, stop_reason: str = "tool_use", hold_s: float = 0.0
) -> dict[str, Any]:
    """A reply calling submit_plan with `plan`, sent `hold_s` after the request came."""
    return {
        "content": [{"type": "tool_use", "name": "submit_plan", "input": plan}],
        "stop": stop_reason,
        "hold_s": hold_s,
    }


def error(status: int, kind: str, message: str) -> dict[str, Any]:
    return {"error": (status, kind, message)}


@dataclass
class ScriptedMessagesApi:
    replies: list[dict[str, Any]]
    requests: list[dict[str, Any]] = field(default_factory=list)
    port: int = 0
    _runner: web.AppRunner | None = None
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> ScriptedMessagesApi:
        app = web.Application()
        app.router.add_post("/v1/messages", self._messages)
        self._runner, self.port = await serve_on_loopback(app)
        return self

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()

    async def _messages(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        reply: dict[str, Any] = (
            self.replies.pop(0) if self.replies else {"error": (500, "api_error", "no more")}
        )
        if reply.get("hold_s"):
            await asyncio.sleep(reply["hold_s"])
        if "error" in reply:
            status, kind, message = reply["error"]
            return web.json_response(
                {"type": "error", "error": {"type": kind, "message": message}}, status=status
            )
        n = next(self._ids)
        content = [
            {**block, "id": f"toolu_{n}_{i}"} if block["type"] == "tool_use" else block
            for i, block in enumerate(reply["content"])
        ]
        return web.json_response(
            {
                "id": f"msg_{n}",
                "type": "message",
                "role": "assistant",
                "model": body["model"],
                "content": content,
                "stop_reason": reply["stop"],
                "stop_sequence": None,
                "usage": {"input_tokens": 900, "output_tokens": 120},
            }
        )
