"""The HTTP API end to end: real agent loop and tools, a scripted model, FastAPI's TestClient."""

import dataclasses
import io
import tempfile
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from langchain_core.messages import HumanMessage
from PIL import Image

from ophglm import DISCLAIMER
from ophglm.cli import main
from ophglm.server import create_app, is_loopback, serve
from server_support import parse_events, real_tools, running_server, scripted_factory, server_settings


@pytest.fixture(scope="module")
def tools(settings, knowledge_index):
    return real_tools(settings, knowledge_index)


def _client(settings, tools, **changes) -> TestClient:
    settings = server_settings(settings, **changes)
    return TestClient(create_app(settings, assistant_factory=scripted_factory(settings, tools)))


@pytest.fixture(scope="module")
def client(settings, tools):
    return _client(settings, tools)


def _session(client) -> str:
    response = client.post("/v1/sessions")
    assert response.status_code == 201
    return response.json()["session_id"]


def _ask(client, session_id, text, image: tuple | None = None):
    files = {"image": image} if image else None
    response = client.post(f"/v1/sessions/{session_id}/messages", data={"text": text}, files=files)
    return response, (parse_events(response.text) if response.status_code == 200 else None)


def test_text_turn_streams_tokens_then_findings_triage_citations_done(client):
    session_id = _session(client)
    response, events = _ask(client, session_id, "What are the symptoms of glaucoma?")
    assert response.headers["content-type"].startswith("text/event-stream")
    names = [name for name, _ in events]
    assert names[:2] == ["tool_start", "tool_end"] and events[0][1]["name"] == "search_knowledge"
    assert events[1][1]["ok"] and "[glaucoma#" in events[1][1]["summary"]
    assert names[-4:] == ["findings", "triage", "citations", "done"]
    tokens = [data["text"] for name, data in events if name == "token"]
    assert len(tokens) > 3 and set(names[2:-4]) == {"token"}, "the answer streams between the tool calls and the reply"
    done = events[-1][1]
    assert "".join(tokens).strip() in done["answer"]
    assert events[-2][1] == done["citations"] and any(c["doc_id"] == "glaucoma" for c in done["citations"])
    assert f"[{done['citations'][0]['id']}]" in done["answer"]
    assert events[-3][1] is None and done["triage"] is None, "no photograph, no triage"
    assert done["disclaimer"] == DISCLAIMER


def test_photo_turn_streams_tool_calls_findings_triage_and_overlay(client, demo_fundus_path):
    session_id = _session(client)
    response, events = _ask(client, session_id, "Is something wrong with this eye?", ("eye.png", demo_fundus_path.read_bytes(), "image/png"))
    names = [name for name, _ in events]
    for tool in ("classify_fundus", "segment_lesions", "search_knowledge"):
        start = next(i for i, (n, d) in enumerate(events) if n == "tool_start" and d["name"] == tool)
        end = next(i for i, (n, d) in enumerate(events) if n == "tool_end" and d["name"] == tool)
        assert start < end and events[end][1]["ok"], events[end][1]
    assert all(d["by"] == "pipeline" for n, d in events if n in ("tool_start", "tool_end"))  # the examination and the router
    image_id = next(d for n, d in events if n == "tool_start" and d["name"] == "classify_fundus")["args"]["image_id"]
    assert image_id.startswith("img-")
    findings = dict(events)["findings"]
    assert findings["classify_fundus"]["probabilities"]["normal"]["unit"] == "probability"
    assert findings["segment_lesions"]["lesions"]["HE"]["count"]["unit"] == "lesions"
    triage = dict(events)["triage"]
    assert triage["level"] in ("urgent", "soon", "routine", "none") and triage["reason"]
    assert names[-1] == "done" and "probability of" in events[-1][1]["answer"]
    first = events[-1][1]["parts"][0]  # the answer says which sentences are the model's own
    assert first["source"] == "model" and events[-1][1]["answer"].startswith(first["text"]) and not events[-1][1]["fallback"]
    [overlay] = events[-1][1]["artifacts"]
    picture = client.get(f"/v1/sessions/{session_id}/artifacts/{overlay}")
    assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(picture.content)).size[0] >= 256

    _, follow_up = _ask(client, session_id, "How urgent is it?")
    assert [d["name"] for n, d in follow_up if n == "tool_start"] == ["search_knowledge"]
    assert dict(follow_up)["triage"] == triage, "the session remembers the examined photograph"


def _png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (120, 40, 20)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("upload, status, words", [
    (("notes.png", b"these are my notes, not a photo", "image/png"), 415, "not an image file"),
    (("empty.jpg", b"", "image/jpeg"), 400, "empty.jpg is empty"),
    (("tiny.png", _png((20, 20)), "image/png"), 400, "at least 64 px"),
    (("big.png", _png((400, 300)), "image/png"), 413, "400x300 pixels, above the limit of 100,000"),
    (("huge.png", b"\x89PNG" + bytes(300_000), "image/png"), 413, "above the upload limit of 200,000"),
])
def test_bad_upload_is_refused_with_its_reason_and_the_session_goes_on(settings, tools, upload, status, words):
    client = _client(settings, tools, max_upload_bytes=200_000, max_upload_pixels=100_000)
    session_id = _session(client)
    response, _ = _ask(client, session_id, "Is this eye healthy?", upload)
    assert response.status_code == status and words in response.json()["detail"]
    response, events = _ask(client, session_id, "What is glaucoma?")
    assert response.status_code == 200 and events[-1][0] == "done"


def test_malformed_messages_get_a_reason(client):
    session_id = _session(client)
    url = f"/v1/sessions/{session_id}/messages"
    response = client.post(url, json={"text": "hello"})
    assert response.status_code == 415 and "multipart/form-data" in response.json()["detail"]
    response = client.post(url, data={"text": "   "}, files={"unused": ("a.txt", b"x")})
    assert response.status_code == 400 and "'text' field" in response.json()["detail"]


def test_uploads_stay_in_memory(client, monkeypatch):
    def no_disk(*args, **kwargs):
        raise AssertionError("an upload was spooled to a temporary file")

    monkeypatch.setattr(tempfile, "TemporaryFile", no_disk)
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", no_disk)
    response, _ = _ask(client, _session(client), "Look at this", ("scan.png", bytes(3_000_000), "image/png"))
    assert response.status_code == 415  # 3 MB, read whole, refused by content: never written out


def test_unknown_session_and_artifact_are_404(client):
    for response in (client.post("/v1/sessions/nope/messages", data={"text": "hi"}), client.get("/v1/sessions/nope/artifacts/x")):
        assert response.status_code == 404 and "unknown session 'nope'" in response.json()["detail"]
    response = client.get(f"/v1/sessions/{_session(client)}/artifacts/overlay-x")
    assert response.status_code == 404 and "unknown artifact" in response.json()["detail"]


def test_health_page_and_openapi(client):
    assert client.get("/health").json()["status"] == "ok"
    page = client.get("/")
    assert page.status_code == 200 and "<title>OphGLM</title>" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/sessions/{session_id}/messages"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert set(body["schema"]["properties"]) == {"text", "image"}
    assert client.get("/docs").status_code == 200


def test_api_key_is_checked_when_set(settings, tools):
    client = _client(settings, tools, api_key="s3cret")
    assert client.post("/v1/sessions").status_code == 401
    assert client.post("/v1/sessions", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.post("/v1/sessions", headers={"Authorization": "Bearer s3cret"}).status_code == 201
    session_id = client.post("/v1/sessions", headers={"X-API-Key": "s3cret"}).json()["session_id"]
    assert client.get(f"/v1/sessions/{session_id}/artifacts/x").status_code == 401
    assert client.get("/").status_code == 200 and client.get("/health").status_code == 200


def test_serve_refuses_a_public_address_without_a_key(settings, monkeypatch, capsys):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.org")
    with pytest.raises(ValueError, match="without an API key"):
        serve(settings, host="0.0.0.0")
    monkeypatch.delenv("OPHGLM_API_KEY", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--port", "9"]) == 2
    assert "set OPHGLM_API_KEY" in capsys.readouterr().err


def test_two_messages_to_one_session_do_not_interleave(settings, tools):
    spans, lock = [], threading.Lock()

    def slow_answer(messages):
        start = time.monotonic()
        time.sleep(0.3)
        with lock:
            spans.append((start, time.monotonic()))
        return "Still thinking."

    settings = server_settings(settings)
    app = create_app(settings, assistant_factory=scripted_factory(settings, tools, step=slow_answer))
    with running_server(app) as url:
        session_id = httpx.post(f"{url}/v1/sessions").json()["session_id"]
        bodies = []
        threads = [threading.Thread(target=lambda q=q: bodies.append(httpx.post(f"{url}/v1/sessions/{session_id}/messages", data={"text": q}, timeout=30).text))
                   for q in ("What is glaucoma?", "What is cataract?")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert all(parse_events(body)[-1][0] == "done" for body in bodies)
    (first_start, first_end), (second_start, _) = sorted(spans)
    assert second_start >= first_end, "the second turn waited for the first"


def test_a_session_survives_a_restart_without_its_photograph_on_disk(settings, tools, tmp_path, demo_fundus_path):
    def answer(messages):
        asked = sum(isinstance(m, HumanMessage) for m in messages)
        return "This is a follow-up question." if asked > 1 else "This is the first question."

    database = tmp_path / "sessions.sqlite"
    settings = dataclasses.replace(settings, sessions_db=str(database))

    def start() -> TestClient:
        return TestClient(create_app(settings, assistant_factory=scripted_factory(settings, tools, step=answer)))

    before = start()
    session_id = _session(before)
    _, events = _ask(before, session_id, "Is something wrong with this eye?", ("eye.png", demo_fundus_path.read_bytes(), "image/png"))
    findings, [overlay] = dict(events)["findings"], events[-1][1]["artifacts"]

    after = start()  # a new app on the same database: the server restarted
    _, events = _ask(after, session_id, "How urgent is it?")
    assert "follow-up" in events[-1][1]["answer"], "the model saw the earlier turn"
    assert after.app.state.sessions.open[session_id].assistant.session.findings["classify_fundus"] == findings["classify_fundus"]
    response = after.get(f"/v1/sessions/{session_id}/artifacts/{overlay}")
    assert response.status_code == 404 and "gone after a server restart" in response.json()["detail"]
    written = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    assert set(written) <= {"sessions.sqlite", "sessions.sqlite-wal", "sessions.sqlite-shm"}
    assert not any(b"\x89PNG" in data or demo_fundus_path.read_bytes()[1000:1100] in data for data in written.values())
