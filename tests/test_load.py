"""Many sessions at once against a real server: every turn answers and every message is kept.

A real uvicorn on loopback serves the real tools with a scripted model per session; twenty
sessions talk to it concurrently, mostly text questions and a few photographs, and
afterwards each session's stored conversation (read from the SQLite file by a fresh
connection) holds exactly the questions that session sent, in order, each with an answer.
`benchmarks/reliability.py` runs the same against `ophglm serve` at a larger scale.
"""

import dataclasses
import io
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from langchain_core.messages import AIMessage, HumanMessage
from langgraph.checkpoint.sqlite import SqliteSaver

from ophglm.server import create_app
from ophglm.tools.synthetic_fundus import make_synthetic_fundus
from server_support import parse_events, real_tools, running_server, scripted_factory

SESSIONS = 20
TURNS = 4  # per session: 80 in all
PHOTO_SESSIONS = 4  # these send a photograph in their second turn


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    make_synthetic_fundus(384, seed=seed).image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_twenty_concurrent_sessions_lose_nothing(settings, knowledge_index, tmp_path):
    database = tmp_path / "sessions.sqlite"
    settings = dataclasses.replace(settings, sessions_db=str(database))
    app = create_app(settings, assistant_factory=scripted_factory(settings, real_tools(settings, knowledge_index)))
    photos = {i: _png(seed=i) for i in range(PHOTO_SESSIONS)}
    topics = ("glaucoma", "cataract", "diabetic retinopathy", "macular degeneration", "retinal detachment")

    def converse(url: str, number: int) -> tuple[str, list[str], list[dict]]:
        with httpx.Client(base_url=url, timeout=60) as http:
            session_id = http.post("/v1/sessions").json()["session_id"]
            sent, replies = [], []
            for turn in range(TURNS):
                text = f"Session {number}, question {turn}: what are the signs of {topics[(number + turn) % len(topics)]}?"
                photo = photos.get(number) if turn == 1 else None
                response = http.post(f"/v1/sessions/{session_id}/messages", data={"text": text},
                                     files={"image": ("eye.png", photo, "image/png")} if photo else None)
                assert response.status_code == 200, response.text
                events = parse_events(response.text)
                assert [e for e, _ in events if e == "error"] == [] and events[-1][0] == "done", events[-1]
                sent.append(text)
                replies.append(events[-1][1])
            return session_id, sent, replies

    start = time.monotonic()
    with running_server(app) as url, ThreadPoolExecutor(SESSIONS) as pool:
        results = list(pool.map(lambda n: converse(url, n), range(SESSIONS)))
    assert time.monotonic() - start < 120

    assert len({session_id for session_id, _, _ in results}) == SESSIONS
    for number, (_, _, replies) in enumerate(results):
        assert all(r["answer"] and not r["refused"] for r in replies)
        if number < PHOTO_SESSIONS:
            assert replies[1]["findings"]["classify_fundus"] and replies[1]["artifacts"], "the photograph was examined"

    stored = SqliteSaver(sqlite3.connect(database))  # a fresh connection: what is on disk, not in the app's memory
    for session_id, sent, _ in results:
        messages = stored.get_tuple({"configurable": {"thread_id": session_id}}).checkpoint["channel_values"]["messages"]
        assert [m.additional_kwargs.get("question") for m in messages if isinstance(m, HumanMessage)] == sent
        answers = [m for m in messages if isinstance(m, AIMessage) and not m.tool_calls]
        assert len(answers) == TURNS and all(m.text for m in answers)
