"""What the server and web-page tests share: a streaming scripted model, the session factory, a live server.

The scripted model streams its answer word by word, as a real LLM does, so the tests see
`token` events; the factory gives each HTTP session its own script over the real tools.
"""

from __future__ import annotations

import dataclasses
import json
import re
import socket
import threading
import time
from contextlib import contextmanager

import uvicorn
from langchain_core.messages import AIMessageChunk, ToolMessage
from langchain_core.outputs import ChatGenerationChunk

from ophglm.agent.assistant import Assistant
from ophglm.agent.scripted_model import ScriptedChatModel
from ophglm.tools.registry import load_tools
from ophglm.tools.search_knowledge import SearchKnowledge

TURNS = 8  # scripted answers per session


class StreamingScriptedModel(ScriptedChatModel):
    token_delay: float = 0.0  # seconds between words, so a browser can be seen mid-stream

    def _stream(self, messages, stop=None, run_manager=None, **kwargs):
        message = self._generate(messages, stop, **kwargs).generations[0].message
        for word in re.findall(r"\S+\s*", message.text) or [""]:
            time.sleep(self.token_delay)
            yield ChatGenerationChunk(message=AIMessageChunk(content=word))


def answer_from_tools(messages) -> str:
    """What a well-behaved model writes: the classifier's top figure if it ran, and a retrieved citation."""
    results = {m.name: m.text for m in messages if isinstance(m, ToolMessage)}
    parts = []
    if "classify_fundus" in results:
        label, prob = re.search(r": ([a-z ()]+?) (\d\.\d\d)", results["classify_fundus"]).groups()
        parts.append(f"The classifier gives {label} a probability of {prob}.")
    cited = re.search(r"\[([a-z_]+#[a-z-]+)\]", results.get("search_knowledge", ""))
    parts.append(f"This is described in the knowledge base [{cited[1]}]." if cited else "I do not know.")
    return " ".join(parts)


def server_settings(settings, **changes):
    """The session's settings with conversations kept in memory, so no test writes to the user's cache."""
    return dataclasses.replace(settings, sessions_db=":memory:", **changes)


def real_tools(settings, knowledge_index) -> dict:
    tools = load_tools(settings)
    tools["search_knowledge"] = SearchKnowledge(settings, knowledge_index)
    return tools


def scripted_factory(settings, tools, step=answer_from_tools, token_delay=0.0):
    """`assistant_factory` for create_app: the real loop and tools, a scripted model per session."""
    def factory(session_id, checkpointer):
        model = StreamingScriptedModel(steps=[step] * TURNS, token_delay=token_delay)
        return Assistant(settings, chat_model=model, tools=tools, checkpointer=checkpointer, thread_id=session_id)

    return factory


def parse_events(body: str) -> list[tuple[str, object]]:
    events = []
    for block in body.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


@contextmanager
def running_server(app):
    """A real uvicorn on a free loopback port, in a thread; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
