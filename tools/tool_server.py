"""`ophglm tools serve`: the vision tools behind HTTP, with dynamic batching (LitServe), for agents elsewhere.

A GPU box runs the models once for many agents: concurrent calls wait up to `batch_timeout`
seconds to be run together (one forward pass for a tool that has a batched path, such as
`classify_fundus`). The protocol is two routes: GET /tools lists each tool's name,
description and input schema; POST /tools/call takes {"tool", "arguments", "images":
{image_id: base64 file bytes}} and answers the ToolResult, or an HTTP error whose `detail`
says what went wrong (404 unknown tool, 415/413/400 unusable photograph, 422 refused by
the tool). Each call brings its photograph, so the server keeps no sessions, only the
quality gate's verdicts by photograph content (a turn sends the same one to several tools).
"""

# No `from __future__ import annotations`: LitServe reads decode_request's annotation (ToolCall) at run time.
import base64
import binascii
import dataclasses
import hashlib
import hmac
from collections import OrderedDict, defaultdict
from typing import Any

import litserve
import litserve.server
from fastapi import Depends, Header, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from ophglm.session import ImageError, Session, decode_image
from ophglm.settings import Settings
from ophglm.tools.assess_quality import session_quality
from ophglm.tools.base import Tool, ToolError, ToolResult
from ophglm.tools.registry import vision_tools

# LitServe 0.2.19 opens its own MCP endpoint whenever the `mcp` package is installed, and then
# fails to start unless `fastmcp` is installed too; OphGLM serves MCP itself (`ophglm mcp`).
litserve.server._MCP_AVAILABLE = False

CALL_TIMEOUT_S = 300  # how long a call may wait in the queue behind others
IMAGE_STATUS = {"not_image": 415, "too_large": 413, "unusable": 400}
QUALITY_CACHE_SIZE = 256  # photographs whose quality verdict is kept


class UnknownTool(LookupError):
    """A call for a tool this server does not run."""


class ToolCall(BaseModel):
    tool: str = Field(description="the tool's name, as GET /tools lists it")
    arguments: dict[str, Any] = Field(default_factory=dict, description="the tool's arguments")
    images: dict[str, str] = Field(default_factory=dict, description="image_id -> the photograph's file bytes, base64")


def _failure(status: int, message: str) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status)


def _encode(result: ToolResult) -> dict:
    return {"summary": result.summary, "findings": result.findings, "citations": result.citations,
            "artifacts": {key: base64.b64encode(bytes(data)).decode() for key, data in result.artifacts.items()}}


class ToolsAPI(litserve.LitAPI):
    """Every vision tool behind one batched endpoint; a batch is split by tool before it runs."""

    def __init__(self, settings: Settings, max_batch_size: int, batch_timeout: float):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path="/tools/call")
        self.settings = settings

    def setup(self, device: str) -> None:
        import torch

        if self.settings.threads:
            torch.set_num_threads(self.settings.threads)
        self.tools = {t.name: t for t in vision_tools(self.settings, device)}
        # The quality gate's verdict by photograph content: every vision tool checks it, and it costs more than a classification.
        self.quality: OrderedDict[str, object] = OrderedDict()
        for tool in self.tools.values():  # load every model now, so /health says ready only when it is
            tool.ensure_setup()

    def authorize(self, authorization: str | None = Header(None), x_api_key: str | None = Header(None)) -> None:
        if not self.settings.api_key:
            return
        given = x_api_key or (authorization or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), self.settings.api_key.encode()):
            raise HTTPException(401, "missing or wrong API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'")

    def decode_request(self, request: ToolCall) -> ToolCall:
        return request

    def predict(self, calls: ToolCall | list[ToolCall]) -> Any:
        # LitServe hands one call when batching is off (max_batch_size 1), a list otherwise.
        if not isinstance(calls, list):
            return self._run([calls])[0]
        return self._run(calls)

    def unbatch(self, outputs: list) -> list:
        return outputs

    def _prepare(self, call: ToolCall) -> tuple[Tool, BaseModel, Session]:
        if call.tool not in self.tools:
            raise UnknownTool(f"unknown tool {call.tool!r}; this server runs {', '.join(self.tools)}")
        tool = self.tools[call.tool]
        session = Session()
        for image_id, data in call.images.items():
            try:
                raw = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise ImageError(f"image {image_id} is not valid base64") from None
            # Kept under the caller's id, so findings and overlay ids match the caller's session.
            session.images[image_id] = decode_image(raw, f"image {image_id}", self.settings.max_upload_pixels)
            digest = hashlib.sha256(raw).hexdigest()
            if digest not in self.quality:
                self.quality[digest] = session_quality(session, image_id)
                if len(self.quality) > QUALITY_CACHE_SIZE:
                    self.quality.popitem(last=False)
            session.derived[("quality", image_id)] = self.quality[digest]
        return tool, tool.validate(call.arguments), session

    def _run(self, calls: list[ToolCall]) -> list[dict | JSONResponse]:
        outputs: list[dict | JSONResponse | None] = [None] * len(calls)
        groups: dict[str, list[tuple[int, BaseModel, Session]]] = defaultdict(list)
        for i, call in enumerate(calls):
            try:
                tool, inputs, session = self._prepare(call)
                groups[tool.name].append((i, inputs, session))
            except Exception as err:
                outputs[i] = self._error(call.tool, err)
        for name, group in groups.items():
            tool = self.tools[name]
            try:
                results = tool.run_batch([(inputs, session) for _, inputs, session in group])
            except Exception:  # one refused photograph must not fail the others: run them one by one
                results = []
                for _, inputs, session in group:
                    try:
                        results.append(tool.run_batch([(inputs, session)])[0])
                    except Exception as err:
                        results.append(err)
            for (i, _, _), result in zip(group, results):
                outputs[i] = self._error(name, result) if isinstance(result, Exception) else _encode(result)
        return outputs

    @staticmethod
    def _error(tool: str, err: Exception) -> JSONResponse:
        if isinstance(err, UnknownTool):
            return _failure(404, str(err))
        if isinstance(err, ImageError):
            return _failure(IMAGE_STATUS.get(err.kind, 400), str(err))
        if isinstance(err, KeyError):  # an image_id whose photograph the call did not bring
            return _failure(400, err.args[0] if err.args else str(err))
        if isinstance(err, (ToolError, ValueError)):
            return _failure(422, str(err))
        return _failure(500, f"{tool} failed on the server ({type(err).__name__}: {err})")


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8100, max_batch_size: int = 8, batch_timeout: float = 0.01) -> None:
    """Run the tool server; beyond loopback only with an API key (as `ophglm serve`)."""
    from ophglm.server import is_loopback

    if not is_loopback(host) and not settings.api_key:
        raise ValueError(f"refusing to listen on {host} without an API key: set OPHGLM_API_KEY (or api_key in the settings file), or bind to 127.0.0.1")
    settings = dataclasses.replace(settings, tools_url="")  # the server runs the tools itself
    api = ToolsAPI(settings, max_batch_size, batch_timeout)
    listed = [t.schema() for t in vision_tools(settings, "cpu")]  # names and schemas only: no model is loaded here
    largest_call = settings.max_upload_bytes * 4 // 3 + 65536  # one photograph, base64, and the arguments
    # settings.device (auto, cpu, cuda) means the same to LitServe: with auto, one worker per GPU when there are GPUs.
    server = litserve.LitServer(api, accelerator=settings.device, timeout=CALL_TIMEOUT_S, max_payload_size=largest_call)
    server.app.add_api_route("/tools", lambda: {"tools": listed}, methods=["GET"], dependencies=[Depends(api.authorize)])
    print(f"OphGLM tool server: {', '.join(t['name'] for t in listed)} at http://{host}:{port}/tools", flush=True)
    server.run(host=host, port=port, generate_client_file=False, log_level="warning", api_server_worker_type="thread")
