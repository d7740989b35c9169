"""A small server on 127.0.0.1 that speaks Anthropic's Messages API, for real-SDK tests.

`POST /v1/messages` answers JSON, or Server-Sent Events when the request says
`"stream": true`, with the event sequence the API documents (message_start,
content_block_start/delta/stop, message_delta with usage, message_stop). Each request
takes the next entry of `script` (then `ok` forever):

- "ok": the answer `text` (or a tool_use block when the request has tools)
- "429": rate_limit_error with `retry-after: <retry_after>`
- "529": overloaded_error (with `retry-after` too)
- "400": invalid_request_error
- "500": api_error

Every request body and its headers are kept in `requests` for assertions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.support.http import serve_on_loopback

ERRORS = {
    "429": (429, "rate_limit_error", "Number of request tokens has exceeded your rate limit."),
    "529": (529, "overloaded_error", "Overloaded"),
    "400": (400, "invalid_request_error", "max_tokens: Field required"),
    "500": (500, "api_error", "Internal server error"),
}


@dataclass
class MessagesApi:
    text: str = "The notes say AOS plans, budgets, runs and traces goals."
    usage: dict[str, int] = field(
        default_factory=lambda: {
            "input_tokens": 1200,
            "output_tokens": 80,
            "cache_creation_input_tokens": 400,
            "cache_read_input_tokens": 2000,
        }
    )
    script: list[str] = field(default_factory=list)
    retry_after: str = "0"
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    _runner: web.AppRunner | None = None
    port: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> MessagesApi:
        app = web.Application()
        app.router.add_post("/v1/messages", self._messages)
        self._runner, self.port = await serve_on_loopback(app)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.headers.append({key.lower(): value for key, value in request.headers.items()})
        reply = self.script.pop(0) if self.script else "ok"
        if reply in ERRORS:
            status, kind, message = ERRORS[reply]
            return web.json_response(
                {"type": "error", "error": {"type": kind, "message": message}},
                status=status,
                headers={"retry-after": self.retry_after, "request-id": "req_test"},
            )
        if body.get("stream"):
            return await self._stream(request, body)
        return web.json_response(self._message(body, self._content(body), done=True))

    def _content(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        tools = body.get("tools") or []
        if tools:
            return [
                {
                    "type": "tool_use",
                    "id": "toolu_01",
                    "name": tools[0]["name"],
                    "input": {"city": "Paris"},
                }
            ]
        return [{"type": "text", "text": self.text}]

    def _message(
        self, body: dict[str, Any], content: list[dict[str, Any]], *, done: bool
    ) -> dict[str, Any]:
        usage = dict(self.usage) if done else {**self.usage, "output_tokens": 1}
        stop = "tool_use" if content and content[0]["type"] == "tool_use" else "end_turn"
        return {
            "id": "msg_test",
            "type": "message",
            "role": "assistant",
            "model": body.get("model", "claude-sonnet-4-5"),
            "content": content if done else [],
            "stop_reason": stop if done else None,
            "stop_sequence": None,
            "usage": usage,
        }

    async def _stream(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = web.StreamResponse(
            status=200, headers={"content-type": "text/event-stream", "request-id": "req_test"}
        )
        await response.prepare(request)

        async def send(event: str, data: dict[str, Any]) -> None:
            await response.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())

        content = self._content(body)
        await send(
            "message_start",
            {"type": "message_start", "message": self._message(body, content, done=False)},
        )
        block = content[0]
        if block["type"] == "text":
            await send(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            )
            await send("ping", {"type": "ping"})
            words = block["text"].split(" ")
            for index, word in enumerate(words):
                delta = word if index == 0 else " " + word
                await send(
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": {"type": "text_delta", "text": delta},
                    },
                )
        else:
            await send(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {**block, "input": {}},
                },
            )
            await send(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {
                        "type": "input_json_delta",
                        "partial_json": json.dumps(block["input"]),
                    },
                },
            )
        await send("content_block_stop", {"type": "content_block_stop", "index": 0})
        await send(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {
                    "stop_reason": self._message(body, content, done=True)["stop_reason"],
                    "stop_sequence": None,
                },
                "usage": {"output_tokens": self.usage["output_tokens"]},
            },
        )
        await send("message_stop", {"type": "message_stop"})
        await response.write_eof()
        return response
