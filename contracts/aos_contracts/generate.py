"""Generate the checked-in JSON Schemas and AsyncAPI document from the models.

python -m aos_contracts.generate          # write contracts/aos_contracts/schemas/
python -m aos_contracts.generate --check  # exit 1 if what is checked in is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from aos_contracts.events import EVENT_ADAPTER, EVENT_TYPES
from aos_contracts.subjects import CONTEXT_OF_TYPE, CONTEXTS, stream_name

SCHEMA_DIR = Path(__file__).parent / "schemas"

# Who writes each context: the AsyncAPI document says so, and so do NATS permissions.
WRITERS = {"goals": "users", "plans": "planner", "runs": "executor", "budget": "ledger"}
# Who consumes each stream (the services' declared consumers and run watches).
READERS = {
    "goals": ["planner", "ledger", "executor", "tracer"],
    "plans": ["executor", "ledger", "tracer", "users (their own runs' answers)"],
    "runs": ["ledger", "tracer", "users (their own runs)"],
    "budget": ["executor", "planner", "tracer"],
}


def _dump(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def _type_required(schema: dict[str, Any]) -> dict[str, Any]:
    """`type` is required in every event schema (and every event in `$defs`): the models
    give it a default, so that code can build events without naming it, but on the wire
    it is the discriminator, and a payload without it cannot be decoded."""
    for model in [schema, *schema.get("$defs", {}).values()]:
        if "type" in model.get("properties", {}) and model["properties"]["type"].get("const"):
            model["required"] = sorted({*model.get("required", []), "type"})
    return schema


def render() -> dict[str, str]:
    """Every generated file: name -> content."""
    files: dict[str, str] = {}
    for event_type, model in sorted(EVENT_TYPES.items()):
        schema = _type_required(model.model_json_schema())
        schema["$id"] = f"https://aos.dev/schemas/{event_type}.json"
        schema["x-aos-context"] = CONTEXT_OF_TYPE[event_type]
        files[f"{event_type}.json"] = _dump(schema)
    union = _type_required(EVENT_ADAPTER.json_schema())
    union["$id"] = "https://aos.dev/schemas/event.json"
    union["title"] = "AnyEvent"
    files["event.json"] = _dump(union)
    files["asyncapi.json"] = _dump(asyncapi())
    return files


def asyncapi() -> dict[str, Any]:
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for event_type in sorted(EVENT_TYPES):
        messages[event_type.replace(".", "_")] = {
            "name": event_type,
            "contentType": "application/json",
            "headers": {
                "type": "object",
                "properties": {
                    "Nats-Msg-Id": {"type": "string", "description": "the event_id; dedup key"},
                    "Aos-Event-Type": {"type": "string", "const": event_type},
                },
            },
            "payload": {"$ref": f"./{event_type}.json"},
        }
    for context in CONTEXTS:
        types = sorted(t for t, c in CONTEXT_OF_TYPE.items() if c == context)
        refs = {
            t.replace(".", "_"): {"$ref": f"#/components/messages/{t.replace('.', '_')}"}
            for t in types
        }
        channels[context] = {
            "address": f"aos.{context}.{{tenant}}.{{run_id}}",
            "description": (
                f"JetStream stream {stream_name(context)}; written by {WRITERS[context]}"
            ),
            "parameters": {"tenant": {}, "run_id": {}},
            "messages": refs,
        }
        operations[f"publish_{context}"] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{context}"},
            "summary": f"{WRITERS[context]} publish",
        }
        operations[f"consume_{context}"] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{context}"},
            "summary": "read by " + ", ".join(READERS[context]),
        }
    channels["parked"] = {
        "address": "aos.parked.{service}",
        "description": "events a consumer could not decode or handle, with the reason",
        "parameters": {"service": {}},
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "AOS event bus",
            "version": "1",
            "description": "Every event of the AOS runtime on NATS JetStream.",
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
    }


def stale_files(directory: Path = SCHEMA_DIR) -> list[str]:
    expected = render()
    stale = [
        name
        for name, content in expected.items()
        if not (directory / name).exists() or (directory / name).read_text() != content
    ]
    extra = [p.name for p in directory.glob("*.json") if p.name not in expected]
    return sorted(stale + extra)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if checked-in files are stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print("stale generated contracts: " + ", ".join(stale), file=sys.stderr)
            print("run: python -m aos_contracts.generate", file=sys.stderr)
            return 1
        return 0
    SCHEMA_DIR.mkdir(exist_ok=True)
    for path in SCHEMA_DIR.glob("*.json"):
        path.unlink()
    for name, content in render().items():
        (SCHEMA_DIR / name).write_text(content)
    print(f"wrote {len(render())} files to {SCHEMA_DIR}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
