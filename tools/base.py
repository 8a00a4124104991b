"""The one contract every diagnostic tool follows.

A tool has a name, a description written for the LLM, a pydantic input model (its JSON
schema is exactly what the LLM sees) and `run(inputs, session) -> ToolResult`. Heavy models
load lazily in `setup()` the first time the tool runs, and are shared per process, so
listing tools or answering a text-only question never loads a vision model. Tools that live
elsewhere (an MCP server, the tool server) get their input model from the JSON schema they
publish (`inputs_from_schema`), so the LLM sees them exactly like local ones.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from ophglm.session import Artifact, Session

TOOL_NAME = re.compile(r"^[a-z][a-z0-9_]{2,63}$")


class ToolError(RuntimeError):
    """A tool could not produce a result; the message is shown to the LLM and the person."""


@dataclass
class ToolResult:
    # Short text for the LLM: every number in it has a unit.
    summary: str
    # Structured findings (JSON-able, numbers with units) that answers are checked against.
    findings: dict[str, Any] = field(default_factory=dict)
    # Files for the person (overlay PNGs), stored in the session, never put in the prompt; read them with bytes().
    artifacts: dict[str, bytes | Artifact] = field(default_factory=dict)
    # Knowledge passages this result rests on: {"id", "doc_id", "section", "title", "text"}.
    citations: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Findings are stored with the conversation, which serialises plain JSON only: a numpy
        # number (np.float64 passes for a float almost everywhere else) failed the whole turn.
        self.findings = plain_json(self.findings, "findings")


def plain_json(value: Any, where: str) -> Any:
    """`value` with numpy scalars made Python numbers and tuples lists; any other non-JSON value is a TypeError naming `where` it is."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {str(key): plain_json(item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if hasattr(value, "dtype") and callable(getattr(value, "item", None)) and getattr(value, "ndim", 1) == 0:  # a numpy scalar
        return plain_json(value.item(), where)
    raise TypeError(f"{where} is a {type(value).__name__}, not a JSON value (str, number, bool, None, list or dict)")


class Tool:
    """Subclass, set `name`, `description`, `inputs`, implement `run` (and `setup` if heavy, `run_batch` if batched)."""

    name: ClassVar[str]
    description: ClassVar[str]
    inputs: ClassVar[type[BaseModel]]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # Validate at definition time, so a malformed plug-in fails on import, not mid-conversation.
        for attr in ("name", "description", "inputs"):
            if not hasattr(cls, attr):
                raise TypeError(f"tool {cls.__name__} must define class attribute {attr!r}")
        if not TOOL_NAME.match(cls.name):
            raise TypeError(f"tool name {cls.name!r} must be snake_case, 3-64 characters")
        if not (isinstance(cls.inputs, type) and issubclass(cls.inputs, BaseModel)):
            raise TypeError(f"tool {cls.name}: inputs must be a pydantic BaseModel subclass")
        if len(cls.description.strip()) < 20:
            raise TypeError(f"tool {cls.name}: the description is what the LLM reads; write one")

    def __init__(self) -> None:
        self._ready = False
        self._lock = threading.Lock()

    def setup(self) -> None:
        """Load models; called once, on first use."""

    def run(self, inputs: BaseModel, session: Session) -> ToolResult:
        raise NotImplementedError

    def run_batch(self, calls: list[tuple[BaseModel, Session]]) -> list[ToolResult]:
        """Several calls at once (the tool server's dynamic batches); a tool with a batched model overrides this."""
        return [self.run(inputs, session) for inputs, session in calls]

    def validate(self, arguments: dict[str, Any]) -> BaseModel:
        """Raw arguments (from an LLM or a caller) as the inputs model, or a ToolError naming each problem."""
        try:
            return self.inputs.model_validate(arguments)
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'input'}: {e['msg']}" for e in err.errors())
            raise ToolError(f"{self.name}: invalid arguments ({problems})") from None

    def ensure_setup(self) -> None:
        with self._lock:
            if not self._ready:
                self.setup()
                self._ready = True

    def __call__(self, session: Session, **arguments: Any) -> ToolResult:
        """Validate raw arguments, set up once, run."""
        inputs = self.validate(arguments)
        self.ensure_setup()
        return self.run(inputs, session)

    def schema(self) -> dict[str, Any]:
        """The OpenAI-style function schema the LLM sees."""
        return {"name": self.name, "description": self.description, "parameters": self.inputs.model_json_schema()}


class ImageInput(BaseModel):
    """Inputs of tools that look at one photograph of the session."""

    image_id: str

    model_config = {"extra": "forbid"}


JSON_TYPES = {"string": str, "integer": int, "number": float, "boolean": bool, "object": dict[str, Any], "null": type(None)}


def _annotation(schema: dict) -> Any:
    if "enum" in schema:
        return Literal[tuple(schema["enum"])]
    if "anyOf" in schema:
        return Union[tuple(_annotation(s) for s in schema["anyOf"])]
    if schema.get("type") == "array":
        return list[_annotation(schema.get("items", {}))]
    return JSON_TYPES.get(schema.get("type"), Any)


def inputs_from_schema(tool_name: str, schema: dict) -> type[BaseModel]:
    """An inputs model for a tool that lives elsewhere (an MCP server, the tool server), from its JSON schema.

    Fields keep their names, types, defaults and descriptions, so the LLM sees what the
    remote tool takes; constraints beyond the types are left to the remote side to enforce.
    """
    required = set(schema.get("required", []))
    fields = {key: (_annotation(prop), Field(... if key in required else prop.get("default"), description=prop.get("description")))
              for key, prop in schema.get("properties", {}).items()}
    title = schema.get("title") or "".join(part.title() for part in tool_name.split("_")) + "Inputs"
    return create_model(title, __config__=ConfigDict(extra="forbid"), __doc__=schema.get("description"), **fields)
