"""Faults inside a turn: a tool that raises or hangs, the LLM endpoint down. The turn answers with what it has."""

import dataclasses
import io
import json
import logging
import time

import pytest
from PIL import Image

from ophglm.agent.assistant import Assistant
from ophglm.agent.scripted_model import ScriptedChatModel
from ophglm.session import Session, decode_image
from ophglm.tools.base import ImageInput, Tool, ToolResult
from ophglm.tools.registry import load_tools
from ophglm.tools.search_knowledge import SearchKnowledge
from ophglm.tools.synthetic_fundus import make_synthetic_fundus


class BrokenTool(Tool):
    name = "broken_tool"
    description = "A plug-in that fails with an unexpected exception, as buggy third-party code does."
    inputs = ImageInput

    def run(self, inputs, session):
        raise ZeroDivisionError("division by zero inside the plug-in")


class HangingTool(Tool):
    name = "hanging_tool"
    description = "A plug-in that never answers in time, as a stuck remote model would."
    inputs = ImageInput

    def run(self, inputs, session):
        time.sleep(5)
        return ToolResult(summary="too late")


def _call(name, image_id):
    return {"name": name, "args": {"image_id": image_id}, "id": f"c-{name}", "type": "tool_call"}


@pytest.fixture
def tools(settings, knowledge_index):
    tools = load_tools(settings, extra=[BrokenTool(), HangingTool()])
    tools["search_knowledge"] = SearchKnowledge(settings, knowledge_index)
    return tools


def test_a_raising_and_a_hanging_tool_are_reported_and_the_turn_goes_on(settings, tools, demo_fundus_path, caplog):
    from langchain_core.messages import AIMessage

    def call_both(messages):
        image_id = next(m.artifact["findings"]["image_id"] for m in messages if getattr(m, "name", "") == "classify_fundus")
        return AIMessage("", tool_calls=[_call("broken_tool", image_id), _call("hanging_tool", image_id)])

    for tool in tools.values():  # models load before the clock starts: the timeout is for the hanging tool
        tool.ensure_setup()
    settings = dataclasses.replace(settings, tool_timeout_s=1.0)
    assistant = Assistant(settings, chat_model=ScriptedChatModel(steps=[call_both, "The examination is done."]), tools=tools)
    caplog.set_level(logging.INFO, logger="ophglm.audit")
    start = time.perf_counter()
    reply = assistant.ask("My left eye has been blurry since my fall on Monday. Is it serious?", image=demo_fundus_path)
    assert time.perf_counter() - start < 60
    failed = {c.name: c.summary for c in reply.tool_calls if not c.ok}
    assert "failed unexpectedly (ZeroDivisionError" in failed["broken_tool"]
    assert "timed out" in failed["hanging_tool"]
    assert reply.findings["classify_fundus"] and reply.answer.startswith("The examination is done")
    assert any("broken_tool failed" in n for n in reply.notes) and any("hanging_tool failed" in n for n in reply.notes)
    # the audit log names every call and its outcome, without the person's words or pixels
    audit = [json.loads(r.message) for r in caplog.records if r.name == "ophglm.audit"]
    assert {a["tool"] for a in audit} >= {"assess_quality", "classify_fundus", "search_knowledge", "broken_tool", "hanging_tool"}
    assert not any(a["ok"] for a in audit if a["tool"] in ("broken_tool", "hanging_tool"))
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "blurry" not in logged and "Monday" not in logged
    # the session goes on
    assert assistant.ask("What is glaucoma?").citations


def test_llm_endpoint_down_answers_with_the_tool_results(settings, tools, demo_fundus_path):
    from ophglm.agent.chat_models import make_chat_model

    down = dataclasses.replace(settings, llm_backend="openai", llm_base_url="http://127.0.0.1:9/v1")
    assistant = Assistant(down, chat_model=make_chat_model(down), tools=tools)
    reply = assistant.ask("Is something wrong with this eye?", image=demo_fundus_path)
    assert reply.answer.startswith("The language model failed") and "Disease probabilities" in reply.answer
    assert any("the language model failed" in n for n in reply.notes)
    assert reply.triage is not None, "the rule-table triage does not need the LLM"
    second = assistant.ask("How urgent is it?")
    assert second.answer.startswith("The language model failed") and len(assistant.session.images) == 1


def test_exif_is_stripped_when_a_photograph_enters_a_session():
    image = make_synthetic_fundus(256, seed=2).image
    exif = Image.Exif()
    exif[0x010F] = "CameraMaker"
    exif[0x9286] = "patient: Jane Doe"
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    decoded = decode_image(buffer.getvalue())
    assert "exif" in decoded.info, "the upload carried EXIF"
    session = Session()
    image_id = session.add_image(decoded, buffer.getvalue())
    assert "exif" not in session.images[image_id].info


def test_chroma_unreachable_is_reported_and_the_turn_answers(settings):
    from ophglm.tools.search_knowledge import SearchKnowledge

    unreachable = dataclasses.replace(settings, chroma_url="http://127.0.0.1:9")
    assistant = Assistant(unreachable, chat_model=ScriptedChatModel(steps=["I do not know."]), tools={"search_knowledge": SearchKnowledge(unreachable)})
    reply = assistant.ask("What is glaucoma?")
    assert reply.answer.startswith("I do not know") and not reply.citations
    assert any("search_knowledge failed" in n and "Chroma" in n for n in reply.notes)
