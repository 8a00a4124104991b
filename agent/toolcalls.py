"""OphGLM's tool-call text format: how tools are shown to a local LLM and how its calls are read.

Small chat models (SmolLM2) have no tool support in their chat template, so the tool list
and the call format go into the system prompt, and calls come back as text:

    <tool_call>{"name": "classify_fundus", "arguments": {"image_id": "img-..."}}</tool_call>

the Hermes / Qwen convention, so the same parser reads Qwen models. A call naming a tool
that was not declared, or with arguments that are not JSON, is reported, never dropped.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
# Small models echo the wrapper of the tool results they were shown; it is never answer text.
ECHOED_TAG = re.compile(r"</?tool_response[^>]*>")


@dataclass
class ParsedReply:
    content: str
    tool_calls: list[dict] = field(default_factory=list)  # LangChain ToolCall dicts
    errors: list[str] = field(default_factory=list)


def tools_prompt(schemas: list[dict]) -> str:
    """The tool block appended to the system prompt."""
    lines = ["You can call these tools. To call one, reply with exactly one line per call:",
             '<tool_call>{"name": "TOOL_NAME", "arguments": {...}}</tool_call>',
             "Tools:"]
    for schema in schemas:
        params = schema.get("parameters", {}).get("properties", {})
        args = ", ".join(f'"{name}": {spec.get("type", "string")}' for name, spec in params.items())
        lines.append(f"- {schema['name']}({args}): {schema['description']}")
    return "\n".join(lines)


def render_call(name: str, arguments: dict) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


def _first_json_object(text: str) -> dict | None:
    # Models often add trailing words after the JSON: decode the first object only.
    start = text.find("{")
    if start < 0:
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def parse_reply(text: str, allowed: set[str] | None = None) -> ParsedReply:
    """Split model text into prose and tool calls; collect what could not be used and why."""
    reply = ParsedReply(content=ECHOED_TAG.sub("", TOOL_CALL.sub("", text)).strip())
    for raw in TOOL_CALL.findall(text):
        call = _first_json_object(raw)
        if call is None or "name" not in call:
            reply.errors.append(f"unreadable tool call: {raw[:120]!r}")
            continue
        name, arguments = str(call["name"]), call.get("arguments", call.get("parameters", {}))
        if allowed is not None and name not in allowed:
            reply.errors.append(f"call to unknown tool {name!r} (known: {', '.join(sorted(allowed))})")
            continue
        if not isinstance(arguments, dict):
            reply.errors.append(f"arguments of {name} are not a JSON object")
            continue
        reply.tool_calls.append({"name": name, "args": arguments, "id": f"call_{uuid.uuid4().hex[:12]}", "type": "tool_call"})
    return reply
