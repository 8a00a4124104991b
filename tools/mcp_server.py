"""`ophglm mcp`: OphGLM's tools as an MCP server, for any MCP client (desktop assistants, IDEs, other agents).

Every registered tool is offered with its own JSON schema. Our tools read photographs by
`image_id` from a session, never from paths or pixels in the arguments, so the server keeps
one session for its process and adds one tool of its own, `add_image`, that takes a
photograph's bytes (base64) and answers with the id to pass to the other tools. A failing
tool (rejected photograph, unknown id, bad arguments) answers with an MCP tool error
carrying the message; the server carries on.
"""

from __future__ import annotations

import base64
import binascii
import sys
from io import TextIOWrapper

import anyio
from mcp import types
from mcp.server.lowlevel import Server

from ophglm import __version__
from ophglm.session import ImageError, Session, decode_image
from ophglm.settings import Settings
from ophglm.tools.base import Tool, ToolError

ADD_IMAGE = "add_image"
MAX_IMAGES = 64  # photographs kept in the server's session; the oldest are forgotten first
INSTRUCTIONS = (
    "OphGLM's ophthalmic tools. First call add_image with a colour fundus photograph (base64 bytes of a JPEG, "
    "PNG or TIFF file); pass the image_id it returns to the other tools. Their output is not a diagnosis."
)
ADD_IMAGE_TOOL = types.Tool(
    name=ADD_IMAGE,
    description="Add one photograph (a JPEG, PNG or TIFF file's bytes, base64-encoded) to this server's session "
                "and return its image_id, which the other tools take.",
    inputSchema={
        "type": "object",
        "properties": {"image_base64": {"type": "string", "description": "the image file's bytes, base64-encoded"}},
        "required": ["image_base64"],
        "additionalProperties": False,
    },
)


def _error(message: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=message)], isError=True)


def _add_image(session: Session, settings: Settings, arguments: dict) -> types.CallToolResult:
    try:
        data = base64.b64decode(arguments["image_base64"], validate=True)
    except (binascii.Error, ValueError):
        return _error("image_base64 is not valid base64")
    if len(data) > settings.max_upload_bytes:
        return _error(f"the uploaded file is {len(data):,} bytes, above the limit of {settings.max_upload_bytes:,}")
    try:
        image = decode_image(data, "the uploaded file", settings.max_upload_pixels)
    except ImageError as err:
        return _error(str(err))
    image_id = session.add_image(image, data)
    while len(session.images) > MAX_IMAGES:  # a long-running server must not grow without bound
        session.images.pop(next(iter(session.images)))
    return types.CallToolResult(content=[types.TextContent(type="text", text=f"Added the photograph as image_id={image_id}.")],
                                structuredContent={"image_id": image_id})


def _run_tool(tool: Tool, session: Session, arguments: dict) -> types.CallToolResult:
    try:
        result = tool(session, **arguments)
    except (ToolError, ImageError, KeyError, ValueError) as err:
        return _error(err.args[0] if isinstance(err, KeyError) and err.args else str(err))
    session.artifacts.update(result.artifacts)
    content: list = [types.TextContent(type="text", text=result.summary)]
    # Overlays go back as images an MCP client can show; their id is what the findings refer to.
    content += [types.ImageContent(type="image", data=base64.b64encode(bytes(png)).decode(), mimeType="image/png", _meta={"artifact_id": key})
                for key, png in result.artifacts.items()]
    return types.CallToolResult(content=content, structuredContent={"findings": result.findings, "citations": result.citations})


def build_server(tools: dict[str, Tool], settings: Settings, session: Session | None = None) -> Server:
    """An MCP server over `tools` and `add_image`, sharing one session."""
    if ADD_IMAGE in tools:
        raise ValueError(f"a tool named {ADD_IMAGE!r} clashes with the MCP server's own {ADD_IMAGE} tool")
    session = session if session is not None else Session()
    server = Server("ophglm", version=__version__, instructions=INSTRUCTIONS)
    listed = [ADD_IMAGE_TOOL] + [types.Tool(name=t.name, description=t.description, inputSchema=t.inputs.model_json_schema()) for t in tools.values()]

    @server.list_tools()
    async def list_tools() -> list[types.Tool]:
        return listed

    @server.call_tool()
    async def call_tool(name: str, arguments: dict) -> types.CallToolResult:
        if name == ADD_IMAGE:
            return _add_image(session, settings, arguments)
        if name not in tools:
            return _error(f"unknown tool {name!r}; this server offers {', '.join(t.name for t in listed)}")
        # Models run for seconds on a CPU: in a worker thread, so the server keeps answering meanwhile.
        return await anyio.to_thread.run_sync(_run_tool, tools[name], session, arguments)

    return server


async def _serve_stdio(server: Server) -> None:
    from mcp.server.stdio import stdio_server

    # stdout is the protocol channel: keep the real one for MCP and send stray prints to stderr.
    channel = anyio.wrap_file(TextIOWrapper(sys.stdout.buffer, encoding="utf-8"))
    sys.stdout = sys.stderr
    async with stdio_server(stdout=channel) as (read, write):
        await server.run(read, write, server.create_initialization_options())


def _serve_http(server: Server, settings: Settings, port: int) -> None:
    import uvicorn
    from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
    from mcp.server.transport_security import TransportSecuritySettings
    from starlette.applications import Starlette
    from starlette.routing import Route

    # Loopback only, with the SDK's DNS-rebinding guard: there is no authentication on this endpoint.
    security = TransportSecuritySettings(allowed_hosts=["127.0.0.1:*", "localhost:*"], allowed_origins=["http://127.0.0.1:*", "http://localhost:*"])
    manager = StreamableHTTPSessionManager(app=server, security_settings=security, max_request_body_size=settings.max_upload_bytes * 4 // 3 + 65536)

    class Endpoint:  # a class, so Starlette hands it the raw ASGI call
        async def __call__(self, scope, receive, send):
            await manager.handle_request(scope, receive, send)

    app = Starlette(routes=[Route("/mcp", endpoint=Endpoint())], lifespan=lambda app: manager.run())
    print(f"OphGLM MCP server (streamable HTTP) at http://127.0.0.1:{port}/mcp", file=sys.stderr)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def serve(tools: dict[str, Tool], settings: Settings, http_port: int | None = None) -> None:
    """Serve over stdio (the default, for clients that start the server) or streamable HTTP on loopback."""
    server = build_server(tools, settings)
    if http_port is None:
        anyio.run(_serve_stdio, server)
    else:
        _serve_http(server, settings, http_port)
