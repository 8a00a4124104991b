"""The vision tools on a tool server (`ophglm tools serve`), as proxies the agent calls like local tools.

With `tools_url` set, the agent keeps its session and the knowledge search, and each vision
tool becomes a proxy with the server's own name, description and input schema (GET /tools).
A call sends the session's photograph (PNG, lossless, so the server sees the same pixels)
with the arguments, and turns the answer back into a ToolResult. Whatever goes wrong on the
way — the server is down, refuses the photograph, does not know the tool — is a ToolError
saying so.
"""

from __future__ import annotations

import base64
import io
import threading
from collections import OrderedDict
from typing import Any

import httpx
from pydantic import BaseModel

from ophglm.session import Session
from ophglm.settings import Settings
from ophglm.tools.base import Tool, ToolError, ToolResult, inputs_from_schema

CALL_TIMEOUT_S = 300  # a whole batch of segmentations may be ahead in the server's queue
PNG_CACHE_SIZE = 8  # one turn sends the same photograph to several tools: encode it once

_png_cache: OrderedDict[str, str] = OrderedDict()
_png_lock = threading.Lock()


def photo_png_base64(session: Session, image_id: str) -> str:
    """A session photograph as base64 PNG; ids are content hashes, so the cache can be shared by sessions."""
    with _png_lock:
        if image_id in _png_cache:
            _png_cache.move_to_end(image_id)
            return _png_cache[image_id]
    buffer = io.BytesIO()
    session.image(image_id).save(buffer, format="PNG", compress_level=1)  # lossless, and fast to write
    encoded = base64.b64encode(buffer.getvalue()).decode()
    with _png_lock:
        _png_cache[image_id] = encoded
        while len(_png_cache) > PNG_CACHE_SIZE:
            _png_cache.popitem(last=False)
    return encoded


class ToolServer:
    """One tool server: its URL, the key it wants, and a pooled HTTP client shared by the proxies."""

    def __init__(self, url: str, api_key: str = "", hint: str = "start it with `ophglm tools serve`, or unset OPHGLM_TOOLS_URL to run the tools here"):
        self.url, self.hint = url.rstrip("/"), hint
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=CALL_TIMEOUT_S)

    def request(self, method: str, path: str, what: str, **kwargs) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as err:
            raise ToolError(f"{what}: the tool server at {self.url} cannot be reached ({type(err).__name__}: {err}); {self.hint}") from None
        if response.status_code >= 400:
            detail = _detail(response)
            if response.status_code >= 500:
                raise ToolError(f"{what}: the tool server at {self.url} failed (HTTP {response.status_code}: {detail})")
            raise ToolError(detail if detail.startswith(what) else f"{what}: {detail}")
        return response.json()


def _detail(response: httpx.Response) -> str:
    """The server's reason: our own `detail` text, FastAPI's list of validation problems, or the body."""
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        return response.text[:300]
    if isinstance(detail, list):
        return "invalid request (" + "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in detail) + ")"
    return str(detail)


class RemoteTool(Tool):
    """Base of the classes `remote_tools` builds, one per served tool (the name, description and inputs come from the server)."""

    name = "remote_tool"
    description = "A tool run by OphGLM's tool server; subclasses carry the served tool's name and description."
    inputs = BaseModel
    server: ToolServer

    @property
    def origin(self) -> str:
        return f"the tool server at {self.server.url}"

    def run(self, inputs: BaseModel, session: Session) -> ToolResult:
        arguments = inputs.model_dump(exclude_unset=True)
        images = {arguments["image_id"]: photo_png_base64(session, arguments["image_id"])} if "image_id" in arguments else {}
        answer = self.server.request("POST", "/tools/call", self.name, json={"tool": self.name, "arguments": arguments, "images": images})
        return ToolResult(summary=answer["summary"], findings=answer["findings"], citations=answer["citations"],
                          artifacts={key: base64.b64decode(data) for key, data in answer["artifacts"].items()})


def remote_tools(settings: Settings) -> list[Tool]:
    """One proxy per tool the server at `settings.tools_url` offers."""
    return served_tools(ToolServer(settings.tools_url, settings.api_key))


def http_plugin_tools(settings: Settings) -> list[Tool]:
    """The tools of every third-party server in `settings.http_tools` (same protocol: GET /tools, POST /tools/call)."""
    urls = [u.strip() for u in settings.http_tools.split(",") if u.strip()]
    return [tool for url in urls for tool in served_tools(ToolServer(url, hint="check OPHGLM_HTTP_TOOLS"))]


def served_tools(server: ToolServer) -> list[Tool]:
    listed = server.request("GET", "/tools", "listing the served tools")["tools"]
    return [type(f"Remote_{t['name']}", (RemoteTool,), {"name": t["name"], "description": t["description"],
                                                        "inputs": inputs_from_schema(t["name"], t["parameters"]), "server": server})()
            for t in listed]
