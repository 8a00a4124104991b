"""The two real chat-model backends: the packaged local LLM, and an OpenAI-compatible server."""

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from langchain_core.messages import HumanMessage, SystemMessage

from ophglm.agent.assistant import Assistant
from ophglm.agent.chat_models import make_chat_model
from ophglm.settings import load_settings
from ophglm.tools.search_knowledge import SearchKnowledge


class OpenAIStub(BaseHTTPRequestHandler):
    """Answers /v1/chat/completions like vLLM would (streamed or not): first a tool call, then text."""

    requests: list[dict] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        OpenAIStub.requests.append(body)
        if len(OpenAIStub.requests) == 1:
            message = {"role": "assistant", "content": None, "tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                       "function": {"name": "search_knowledge", "arguments": json.dumps({"query": "cataract surgery"})}}]}
            finish = "tool_calls"
        else:
            message, finish = {"role": "assistant", "content": "Cataract is treated by surgery."}, "stop"
        head = {"id": "x", "created": 0, "model": body["model"]}
        if body.get("stream"):
            events = [{**head, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": message, "finish_reason": None}]},
                      {**head, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}]
            data = "".join(f"data: {json.dumps(e)}\n\n" for e in events).encode() + b"data: [DONE]\n\n"
            kind = "text/event-stream"
        else:
            data = json.dumps({**head, "object": "chat.completion", "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                               "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
            kind = "application/json"
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def openai_stub():
    OpenAIStub.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), OpenAIStub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_openai_backend_is_chosen_by_settings_and_calls_tools(openai_stub, settings, knowledge_index, monkeypatch):
    monkeypatch.setenv("OPHGLM_LLM_BACKEND", "openai")
    monkeypatch.setenv("OPHGLM_LLM_BASE_URL", openai_stub)
    remote = load_settings(chroma_path=str(settings.chroma_folder))
    tools = {"search_knowledge": SearchKnowledge(remote, knowledge_index)}
    assistant = Assistant(remote, tools=tools)
    reply = assistant.ask("How is cataract treated?")
    # the gate's retrieval, then the server's own tool call, then its answer
    assert [c.name for c in reply.tool_calls] == ["search_knowledge", "search_knowledge"]
    assert reply.tool_calls[1].args == {"query": "cataract surgery"}
    # the grounding check traced the sentence's disease to a retrieved passage and cited it
    assert re.match(r"Cataract is treated by surgery \[cataract#[a-z-]+\]\.", reply.answer)
    first = OpenAIStub.requests[0]
    assert first["model"] == "ophglm" and [t["function"]["name"] for t in first["tools"]] == ["search_knowledge"]


@pytest.mark.llm
def test_packaged_local_llm_streams_what_it_generates():
    model = make_chat_model(load_settings(llm_max_new_tokens=24))
    messages = [SystemMessage("You are a helpful assistant."), HumanMessage("Name one part of the eye.")]
    whole = model.invoke(messages).content
    streamed = "".join(chunk.content for chunk in model.stream(messages))
    assert whole.strip() and streamed.strip() == whole.strip()
