from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage

from ophglm.agent.local_model import _message_from_text, to_chat_dicts
from ophglm.agent.toolcalls import parse_reply, render_call, tools_prompt

ALLOWED = {"classify_fundus", "search_knowledge"}


def test_round_trip_of_a_rendered_call():
    text = "Let me look.\n" + render_call("classify_fundus", {"image_id": "img-1"})
    reply = parse_reply(text, ALLOWED)
    assert reply.content == "Let me look."
    assert [(c["name"], c["args"]) for c in reply.tool_calls] == [("classify_fundus", {"image_id": "img-1"})]
    assert not reply.errors


def test_echoed_tool_response_tags_are_not_answer_text():
    assert parse_reply('<tool_response name="search_knowledge">\nGlaucoma is treatable.</tool_response>', ALLOWED).content == "Glaucoma is treatable."


def test_several_calls_trailing_words_and_an_unclosed_tag():
    text = ('<tool_call>{"name": "classify_fundus", "arguments": {"image_id": "a"}} thanks</tool_call>\n'
            '<tool_call>{"name": "search_knowledge", "arguments": {"query": "glaucoma"}}')
    reply = parse_reply(text, ALLOWED)
    assert [c["name"] for c in reply.tool_calls] == ["classify_fundus", "search_knowledge"]


def test_unusable_calls_are_reported_not_dropped():
    text = ('<tool_call>{"name": "diagnose_everything", "arguments": {}}</tool_call>'
            '<tool_call>{name: classify_fundus}</tool_call>'
            '<tool_call>{"name": "classify_fundus", "arguments": "img-1"}</tool_call>')
    reply = parse_reply(text, ALLOWED)
    assert reply.tool_calls == []
    assert len(reply.errors) == 3
    assert "unknown tool 'diagnose_everything'" in reply.errors[0]
    message = _message_from_text(text, [{"function": {"name": n}} for n in ALLOWED])
    assert len(message.invalid_tool_calls) == 3 and not message.tool_calls


def test_chat_rendering_puts_tools_in_the_system_prompt_and_results_in_user_turns():
    tools = [{"name": "search_knowledge", "description": "Look things up.", "parameters": {"properties": {"query": {"type": "string"}}}}]
    call = {"name": "search_knowledge", "args": {"query": "cataract"}, "id": "c1", "type": "tool_call"}
    chat = to_chat_dicts([SystemMessage("Be brief."), HumanMessage("cataract?"), AIMessage("", tool_calls=[call]),
                          ToolMessage("[cataract#visual-diagnosis] ...", tool_call_id="c1", name="search_knowledge")], tools)
    assert [m["role"] for m in chat] == ["system", "user", "assistant", "user"]
    assert chat[0]["content"].startswith("Be brief.") and "search_knowledge(\"query\": string)" in chat[0]["content"]
    assert chat[2]["content"] == render_call("search_knowledge", {"query": "cataract"})
    assert chat[3]["content"].startswith('<tool_response name="search_knowledge">')
    assert "TOOL_NAME" in tools_prompt(tools)
