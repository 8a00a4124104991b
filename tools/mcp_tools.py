"""Tools from MCP servers: every tool a configured MCP server lists becomes an ophglm `Tool`.

A tool author who already has an MCP server (in any language) plugs it in with one setting,
`mcp_servers` (OPHGLM_MCP_SERVERS): the connections dict langchain-mcp-adapters'
MultiServerMCPClient takes, as JSON or a JSON file. The agent is synchronous and MCP clients
are asyncio, so each server gets one long-lived session on a private event loop in a daemon
thread, and a tool call waits on it. A server is started (or reached) once, when the tools
load, not once per call.

MCP servers cannot see our session's photographs. A server that offers
`add_image(image_base64)` (as `ophglm mcp` does), answering with the id as its text or as
structured content {"image_id": ...}, gets the photograph (PNG) before each call that names
an `image_id`, and the call uses the id that server gave; the result speaks of the
session's own id again.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import concurrent.futures
import json
import threading
from datetime import timedelta
from pathlib import Path

from langchain_mcp_adapters.sessions import create_session
from mcp import types
from pydantic import BaseModel

from ophglm.session import Session
from ophglm.tools.base import Tool, ToolError, ToolResult, inputs_from_schema
from ophglm.tools.remote_tools import photo_png_base64

ADD_IMAGE = "add_image"
START_TIMEOUT_S = 30
CALL_TIMEOUT_S = 300  # a vision model on a CPU, behind a server that may itself be busy


def parse_connections(value: str | dict) -> dict[str, dict]:
    """The `mcp_servers` setting: a dict (from TOML), a JSON string, or the path of a JSON file."""
    if isinstance(value, dict):
        connections = value
    else:
        text = value.strip()
        if not text.startswith("{"):
            path = Path(text).expanduser()
            if not path.is_file():
                raise ValueError(f"mcp_servers: {text!r} is neither JSON nor an existing JSON file")
            text = path.read_text()
        try:
            connections = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"mcp_servers is not valid JSON: {err}") from None
    if not isinstance(connections, dict) or not all(isinstance(c, dict) for c in connections.values()):
        raise ValueError('mcp_servers must map server names to connections, e.g. {"mytool": {"command": "python", "args": ["server.py"], "transport": "stdio"}}')
    return connections


def _describe(err: BaseException) -> str:
    """The first real error inside anyio's exception groups, whose own message says nothing."""
    while isinstance(err, BaseExceptionGroup) and err.exceptions:
        err = err.exceptions[0]
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def _where(connection: dict) -> str:
    if "url" in connection:
        return connection["url"]
    return " ".join([str(connection.get("command", "?")), *map(str, connection.get("args", []))])


class McpServer:
    """One MCP server's session, held open on a private event loop; calls are synchronous."""

    def __init__(self, name: str, connection: dict):
        self.name, self.where = name, _where(connection)
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name=f"mcp-{name}", daemon=True).start()
        self._ready: concurrent.futures.Future = concurrent.futures.Future()
        self._held = asyncio.run_coroutine_threadsafe(self._hold(connection), self._loop)
        try:
            self.session, self.tools = self._ready.result(START_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            self.close()
            raise RuntimeError(f"MCP server {name!r} ({self.where}) did not answer within {START_TIMEOUT_S} s") from None
        except Exception as err:
            self.close()
            raise RuntimeError(f"MCP server {name!r} ({self.where}) could not be started or reached ({_describe(err)})") from None
        atexit.register(self.close)

    async def _hold(self, connection: dict) -> None:
        # The transport's context must be entered and left by one task: this one, for the session's life.
        self._stop = asyncio.Event()
        try:
            async with create_session(connection) as session:
                await session.initialize()
                listed = (await session.list_tools()).tools
                self._ready.set_result((session, listed))
                await self._stop.wait()
        except BaseException as err:
            if not self._ready.done():
                self._ready.set_exception(err)

    def call(self, tool: str, arguments: dict) -> types.CallToolResult:
        coroutine = self.session.call_tool(tool, arguments, read_timeout_seconds=timedelta(seconds=CALL_TIMEOUT_S))
        try:
            return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(CALL_TIMEOUT_S + 5)
        except Exception as err:
            raise ToolError(f"{tool}: the MCP server {self.name!r} failed ({_describe(err)})") from None

    def close(self) -> None:
        """Leave the session (a stdio server is stopped); a server that hangs is cancelled after 5 s."""
        if not self._loop.is_running():
            return
        if hasattr(self, "_stop"):
            self._loop.call_soon_threadsafe(self._stop.set)
        try:
            self._held.result(5)
        except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
            self._held.cancel()
        self._loop.call_soon_threadsafe(self._loop.stop)


def _text(result: types.CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if isinstance(block, types.TextContent)).strip()


class McpTool(Tool):
    """Base of the classes `mcp_tools` builds, one per remote tool (the name, description and inputs come from the server)."""

    name = "mcp_tool"
    description = "A tool offered by an MCP server; subclasses carry the server's own name and description."
    inputs = BaseModel
    server: McpServer

    @property
    def origin(self) -> str:
        return f"MCP server {self.server.name!r}"

    def run(self, inputs: BaseModel, session: Session) -> ToolResult:
        arguments = inputs.model_dump(exclude_unset=True)
        local_id = arguments.get("image_id")
        remote_id = local_id
        if local_id and any(t.name == ADD_IMAGE for t in self.server.tools):
            added = self.server.call(ADD_IMAGE, {"image_base64": photo_png_base64(session, local_id)})
            if added.isError:
                raise ToolError(f"{self.name}: the MCP server {self.server.name!r} refused the photograph: {_text(added)}")
            remote_id = (added.structuredContent or {}).get("image_id") or _text(added)
            if not remote_id:
                raise ToolError(f"{self.name}: the MCP server {self.server.name!r} gave no image_id for the photograph")
            arguments["image_id"] = remote_id
        result = self.server.call(self.name, arguments)
        local = (lambda text: text.replace(remote_id, local_id)) if remote_id != local_id else (lambda text: text)
        if result.isError:
            raise ToolError(f"{self.name} (MCP server {self.server.name!r}): {local(_text(result)) or 'failed without a message'}")
        structured = json.loads(local(json.dumps(result.structuredContent or {})))
        # `ophglm mcp` answers {"findings", "citations"}; any other structured content is the findings as it is.
        ours = set(structured) == {"findings", "citations"}
        artifacts = {local((block.meta or {}).get("artifact_id", f"{self.name}-{i}")): base64.b64decode(block.data)
                     for i, block in enumerate(result.content) if isinstance(block, types.ImageContent)}
        return ToolResult(summary=local(_text(result)) or f"{self.name} returned no text.",
                          findings=structured["findings"] if ours else structured,
                          citations=structured["citations"] if ours else [], artifacts=artifacts)


def mcp_tools(setting: str | dict) -> list[Tool]:
    """One ophglm Tool per tool of every configured MCP server."""
    tools: list[Tool] = []
    for server_name, connection in parse_connections(setting).items():
        server = McpServer(server_name, connection)
        for listed in server.tools:
            if listed.name == ADD_IMAGE:
                continue  # the adapter's own way in for photographs, not a tool for the LLM
            try:
                cls = type(f"Mcp_{listed.name}", (McpTool,), {"name": listed.name, "description": listed.description or "",
                                                              "inputs": inputs_from_schema(listed.name, listed.inputSchema), "server": server})
            except (TypeError, ValueError, NameError) as err:
                raise ValueError(f"MCP server {server_name!r}: its tool {listed.name!r} cannot be offered to the LLM: {err}") from None
            tools.append(cls())
    return tools
