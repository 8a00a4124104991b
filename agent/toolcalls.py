"""OphGLM's tool-call text format: how tools are shown to a local LLM and how its calls are read.

Small chat models (SmolLM2) have no tool support in their chat template, so the tool list
and the call format go into the system prompt, and calls come back as text:

    <tool_call>{"name": "classify_fundus", "arguments": {"image_id": "img-..."}}</tool_call>

the Hermes / Qwen convention, so the same parser reads Qwen models. It also reads GLM's
two formats: GLM-4.5's `<tool_call>NAME<arg_key>k</arg_key><arg_value>v</arg_value></tool_call>`
and GLM-4-chat's bare `NAME\n{json arguments}` reply. Small slips are repaired (a tool name
one typo away from a declared one, single quotes, trailing commas) and the repair is noted;
a call that cannot be repaired is reported, never dropped.
"""

from __future__ import annotations

import difflib
import json
import re
import uuid
from dataclasses import dataclass, field

TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
# Small models echo the wrapper of the tool results they were shown; it is never answer text.
ECHOED_TAG = re.compile(r"</?tool_response[^>]*>")
GLM_ARGUMENT = re.compile(r"<arg_key>\s*(.*?)\s*</arg_key>\s*<arg_value>\s*(.*?)\s*</arg_value>", re.S)
GLM4_CALL = re.compile(r"^\s*([a-z][a-z0-9_]{2,63})\s*\n\s*(\{.*\})\s*$", re.S)


@dataclass
class ParsedReply:
    content: str
    tool_calls: list[dict] = field(default_factory=list)  # LangChain ToolCall dicts
    errors: list[str] = field(default_factory=list)
    repairs: list[str] = field(default_factory=list)  # what was mended to make a call usable


def tools_prompt(schemas: list[dict]) -> str:
    """The tool block appended to the system prompt."""
    lines = ["You can call these tools. To call one, reply with exactly one line per call:",
             '<tool_call>{"name": "TOOL_NAME", "arguments": {...}}</tool_call>',
             "Tools:"]
    for schema in schemas:
        params = schema.get("parameters", {}).get("properties", {})
        args = ", ".join(f'"{name}": {spec.get("type", "string")}' for name, spec in params.items())
        lines.append(f"- {schema['name']}({args}): {_first_sentence(schema['description'])}")
    return "\n".join(lines)


def _first_sentence(description: str, limit: int = 160) -> str:
    # Every prompt token costs on a CPU (~250 tokens/s prefill for SmolLM2): the first sentence says what a tool is for.
    first = re.split(r"(?<=[.!?])\s", description.strip(), maxsplit=1)[0]
    return first if len(first) <= limit else first[:limit].rsplit(" ", 1)[0] + " ..."


def render_call(name: str, arguments: dict) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


def _first_json_object(text: str) -> dict | None:
    # Models often add trailing words after the JSON: decode the first object only.
    start = text.find("{")
    if start < 0:
        return None
    for candidate in (text[start:], _loosened(text[start:])):
        try:
            value, _ = json.JSONDecoder().raw_decode(candidate)
        except json.JSONDecodeError:
            continue
        return value if isinstance(value, dict) else None
    return None


def _loosened(text: str) -> str:
    """Python-ish JSON made strict: single quotes, trailing commas."""
    return re.sub(r",\s*([}\]])", r"\1", text.replace("'", '"'))


def _glm_call(raw: str) -> dict | None:
    """GLM-4.5: the name on the first line, then <arg_key>/<arg_value> pairs (values JSON if they parse)."""
    name = raw.split("<arg_key>")[0].strip()
    if not re.fullmatch(r"[a-z][a-z0-9_]{2,63}", name):
        return None
    arguments = {}
    for key, value in GLM_ARGUMENT.findall(raw):
        try:
            arguments[key] = json.loads(value)
        except json.JSONDecodeError:
            arguments[key] = value
    return {"name": name, "arguments": arguments}


def _known_name(name: str, allowed: set[str] | None, reply: ParsedReply) -> str | None:
    if allowed is None or name in allowed:
        return name
    close = difflib.get_close_matches(name, sorted(allowed), n=1, cutoff=0.85)
    if close:
        reply.repairs.append(f"tool name {name!r} read as {close[0]!r}")
        return close[0]
    reply.errors.append(f"call to unknown tool {name!r} (known: {', '.join(sorted(allowed))})")
    return None


def parse_reply(text: str, allowed: set[str] | None = None) -> ParsedReply:
    """Split model text into prose and tool calls; collect what could not be used and why."""
    reply = ParsedReply(content=ECHOED_TAG.sub("", TOOL_CALL.sub("", text)).strip())
    raws = TOOL_CALL.findall(text)
    if not raws and allowed and (bare := GLM4_CALL.match(text)) and bare.group(1) in allowed:
        raws, reply.content = [json.dumps({"name": bare.group(1), "arguments": _first_json_object(bare.group(2))})], ""
    for raw in raws:
        call = _first_json_object(raw) if raw.lstrip().startswith("{") else _glm_call(raw)
        if call is None or "name" not in call:
            reply.errors.append(f"unreadable tool call: {raw[:120]!r}")
            continue
        name, arguments = _known_name(str(call["name"]), allowed, reply), call.get("arguments", call.get("parameters", {}))
        if name is None:
            continue
        if not isinstance(arguments, dict):
            reply.errors.append(f"arguments of {name} are not a JSON object")
            continue
        reply.tool_calls.append({"name": name, "args": arguments, "id": f"call_{uuid.uuid4().hex[:12]}", "type": "tool_call"})
    return reply
