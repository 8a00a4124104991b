"""The HTTP way to add a tool: a third-party server speaking the tool-server protocol, named in OPHGLM_HTTP_TOOLS."""

import base64
import dataclasses
import io

import numpy as np
import pytest
from fastapi import FastAPI, HTTPException
from langchain_core.messages import AIMessage
from PIL import Image

from ophglm.agent.assistant import Assistant
from ophglm.agent.scripted_model import ScriptedChatModel
from ophglm.tools.base import ToolError
from ophglm.tools.registry import load_tools
from server_support import running_server


def reflectance_server() -> FastAPI:
    """What a tool author writes (the README's worked example): list the tool, answer calls."""
    app = FastAPI()

    @app.get("/tools")
    def tools():
        return {"tools": [{"name": "measure_ir_reflectance", "description": "Mean infrared reflectance of one fundus photograph of this session.",
                           "parameters": {"type": "object", "properties": {"image_id": {"type": "string"}}, "required": ["image_id"]}}]}

    @app.post("/tools/call")
    def call(body: dict):
        if body["tool"] != "measure_ir_reflectance":
            raise HTTPException(404, f"unknown tool {body['tool']!r}")
        image_id = body["arguments"]["image_id"]
        image = Image.open(io.BytesIO(base64.b64decode(body["images"][image_id])))
        red = float(np.asarray(image.convert("RGB"))[..., 0].mean())
        return {"summary": f"Mean red reflectance of {image_id} ({image.width}x{image.height} px): {red:.1f} of 255.",
                "findings": {"image_id": image_id, "red_reflectance": {"value": round(red, 1), "unit": "0-255"}},
                "artifacts": {}, "citations": []}

    return app


def test_the_agent_discovers_and_calls_an_http_tool(settings, knowledge_index, demo_fundus_path):
    from ophglm.tools.search_knowledge import SearchKnowledge

    with running_server(reflectance_server()) as url:
        with_plugin = dataclasses.replace(settings, http_tools=url)
        tools = load_tools(with_plugin)
        tools["search_knowledge"] = SearchKnowledge(with_plugin, knowledge_index)
        assert "measure_ir_reflectance" in tools and tools["measure_ir_reflectance"].origin.endswith(url)

        def call_it(messages):
            image_id = next(m.artifact["findings"]["image_id"] for m in messages if getattr(m, "name", "") == "classify_fundus")
            return AIMessage("", tool_calls=[{"name": "measure_ir_reflectance", "args": {"image_id": image_id}, "id": "c1", "type": "tool_call"}])

        assistant = Assistant(with_plugin, chat_model=ScriptedChatModel(steps=[call_it, "Measured."]), tools=tools)
        reply = assistant.ask("How reflective is this retina?", image=demo_fundus_path)
        call = next(c for c in reply.tool_calls if c.name == "measure_ir_reflectance")
        assert call.ok and "768x768 px" in call.summary
        assert reply.findings["measure_ir_reflectance"]["red_reflectance"]["unit"] == "0-255"


def test_an_unreachable_http_tool_server_is_named():
    from ophglm.settings import load_settings

    with pytest.raises(ToolError, match="127.0.0.1:9.*OPHGLM_HTTP_TOOLS"):
        load_tools(load_settings(http_tools="http://127.0.0.1:9"))
