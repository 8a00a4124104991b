"""MCP both ways: `ophglm mcp` serves our tools to an MCP client, and an MCP server's tools join the agent."""

import asyncio
import base64
import dataclasses
import io
import json
import os
import sys

import pytest
from langchain_core.messages import AIMessage
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

from ophglm.agent.assistant import Assistant
from ophglm.agent.scripted_model import ScriptedChatModel
from ophglm.tools.registry import load_tools
from ophglm.tools.synthetic_fundus import make_synthetic_fundus

# A third-party tool: it keeps the photographs it is sent (add_image) and measures one by id.
IR_SERVER = '''
import base64, io
from mcp.server.fastmcp import FastMCP
from PIL import Image

mcp = FastMCP("ir-reflectance")
images = {}


@mcp.tool()
def add_image(image_base64: str) -> str:
    """Keep one photograph; returns its id."""
    images[f"ir-{len(images)}"] = Image.open(io.BytesIO(base64.b64decode(image_base64)))
    return f"ir-{len(images) - 1}"


@mcp.tool()
def measure_ir_reflectance(image_id: str) -> str:
    """Near-infrared reflectance of one fundus photograph of this session, in percent."""
    image = images[image_id]
    return f"IR reflectance of {image_id}: 42.5 % ({image.width}x{image.height} px analysed)"


mcp.run()
'''


def _png_base64(size=512, seed=1) -> str:
    buffer = io.BytesIO()
    make_synthetic_fundus(size, seed=seed).image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _stdio(script: str) -> dict:
    return {"command": sys.executable, "args": [script], "transport": "stdio"}


def test_ophglm_mcp_serves_the_tools_to_an_mcp_client(settings):
    params = StdioServerParameters(command=sys.executable, args=["-m", "ophglm.cli", "mcp"],
                                   env={**os.environ, "HF_HUB_OFFLINE": "1", "OPHGLM_CHROMA_PATH": str(settings.chroma_folder)})

    async def conversation():
        async with stdio_client(params) as (read, write), ClientSession(read, write) as client:
            await client.initialize()
            listed = {t.name: t for t in (await client.list_tools()).tools}
            added = await client.call_tool("add_image", {"image_base64": _png_base64()})
            image_id = added.structuredContent["image_id"]
            quality = await client.call_tool("assess_quality", {"image_id": image_id})
            unknown = await client.call_tool("classify_fundus", {"image_id": "img-000000000000"})
            not_an_image = await client.call_tool("add_image", {"image_base64": base64.b64encode(b"just text").decode()})
            still_alive = await client.call_tool("assess_quality", {"image_id": image_id})
            return listed, added, quality, unknown, not_an_image, still_alive

    listed, added, quality, unknown, not_an_image, still_alive = asyncio.run(conversation())
    assert {"add_image", "assess_quality", "classify_fundus", "segment_lesions", "search_knowledge"} <= set(listed)
    assert listed["classify_fundus"].inputSchema["properties"] == {"image_id": {"title": "Image Id", "type": "string"}}
    assert not added.isError and added.structuredContent["image_id"].startswith("img-")
    assert not quality.isError
    findings = quality.structuredContent["findings"]
    assert findings["image_id"] == added.structuredContent["image_id"] and findings["is_fundus"] and findings["gradable"]
    assert quality.content[0].text.startswith(f"Image {findings['image_id']} is a gradable")
    assert unknown.isError and "unknown image_id 'img-000000000000'" in unknown.content[0].text
    assert not_an_image.isError and "not an image file" in not_an_image.content[0].text
    assert not still_alive.isError


def test_the_agent_discovers_and_calls_a_tool_of_an_mcp_server(settings, tmp_path):
    (tmp_path / "ir_server.py").write_text(IR_SERVER)
    connections = tmp_path / "mcp.json"
    connections.write_text(json.dumps({"ir": _stdio(str(tmp_path / "ir_server.py"))}))
    # The setting as a file path; search_knowledge is left out so no knowledge index is built.
    tools = load_tools(dataclasses.replace(settings, mcp_servers=str(connections)))
    tools.pop("search_knowledge")
    assert "measure_ir_reflectance" in tools and "add_image" not in tools

    def call_it(messages):
        image_id = next(m.additional_kwargs["image_id"] for m in messages if "image_id" in m.additional_kwargs)
        return AIMessage("", tool_calls=[{"name": "measure_ir_reflectance", "args": {"image_id": image_id}, "id": "ir1", "type": "tool_call"}])

    model = ScriptedChatModel(steps=[call_it, "The infrared reflectance was measured."])
    fundus = make_synthetic_fundus(512, seed=1).image
    reply = Assistant(settings, chat_model=model, tools=tools).ask("What is the IR reflectance?", image=fundus)
    assert "measure_ir_reflectance" in model.bound_tools
    call = next(c for c in reply.tool_calls if c.name == "measure_ir_reflectance")
    image_id = call.args["image_id"]
    # the photograph reached the server, and the summary speaks of the session's own image id
    assert call.ok and call.summary == f"IR reflectance of {image_id}: 42.5 % (512x512 px analysed)"


def test_mcp_tool_errors_name_the_problem(settings, tmp_path):
    clash = tmp_path / "clash.py"
    clash.write_text('from mcp.server.fastmcp import FastMCP\nmcp = FastMCP("clash")\n\n'
                     '@mcp.tool()\ndef classify_fundus(image_id: str) -> str:\n    """Another classifier of fundus photographs."""\n    return "?"\n\nmcp.run()\n')
    with pytest.raises(ValueError, match="two tools are named 'classify_fundus': .*ClassifyFundus and MCP server 'other'"):
        load_tools(dataclasses.replace(settings, mcp_servers={"other": _stdio(str(clash))}))
    with pytest.raises(RuntimeError, match="MCP server 'gone' .* could not be started or reached"):
        load_tools(dataclasses.replace(settings, mcp_servers=json.dumps({"gone": _stdio(str(tmp_path / "missing.py"))})))
    with pytest.raises(ValueError, match="mcp_servers is not valid JSON"):
        load_tools(dataclasses.replace(settings, mcp_servers="{not json"))
