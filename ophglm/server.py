"""`ophglm serve`: the HTTP API and the web page, so a clinic and other programs can use OphGLM.

One FastAPI app: create a session, post a message (text plus an optional photograph,
multipart), and read the reply as server-sent events while it is made: answer tokens, each
tool call as it starts and ends, then findings, triage, citations and the whole reply. The
chat model and the tools load once per app, on first use, and every session shares them.

Conversations are LangGraph checkpoints in SQLite, so a session survives a restart (its text
and findings; photographs and overlays live in memory only). Uploads stay in memory (never
spooled to a temporary file) and are bounded in bytes and pixels; an API key is required
before the server may listen beyond loopback.
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import ipaddress
import json
import logging
import sqlite3
import threading
import uuid
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import asdict
from importlib.resources import files
from pathlib import Path
from typing import Any, Callable

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import ToolMessage
from langchain_core.tracers.context import register_configure_hook
from langgraph.checkpoint.sqlite import SqliteSaver
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser

from ophglm import USER_ERRORS, __version__
from ophglm.session import ImageError, decode_image
from ophglm.settings import Settings

log = logging.getLogger(__name__)

MAX_SESSIONS = 64  # in memory at once, each with its photographs (up to ~100 MB); others reload from SQLite
MAX_TEXT_BYTES = 64_000  # the question field; the rest of a request's budget is the photograph
AssistantFactory = Callable[[str, Any], Any]  # (session id, checkpointer) -> an Assistant on that thread

# A LangChain callback handler set here is added to every run started in this context: that is
# how tool starts and ends reach the stream without the agent knowing about HTTP.
_TURN_EVENTS: contextvars.ContextVar[BaseCallbackHandler | None] = contextvars.ContextVar("ophglm_turn_events", default=None)
register_configure_hook(_TURN_EVENTS, inheritable=True)


class _ToolEvents(BaseCallbackHandler):
    """Forward tool starts and ends of one turn as `tool_start` / `tool_end` events."""

    def __init__(self, emit: Callable[[str, dict], None]):
        self.emit = emit
        self.running: dict[uuid.UUID, dict] = {}

    def on_tool_start(self, serialized, input_str, *, run_id, inputs=None, metadata=None, **kwargs):
        # "pipeline" (the examination, a router) or "model" (the LLM chose the call)
        call = {"name": kwargs.get("name") or (serialized or {}).get("name", "tool"), "args": inputs or {},
                "by": (metadata or {}).get("by", "model")}
        self.running[run_id] = call
        self.emit("tool_start", call)

    def on_tool_end(self, output, *, run_id, **kwargs):
        call = self.running.pop(run_id, {"name": kwargs.get("name", "tool"), "args": {}, "by": "model"})
        failed = "error" in (getattr(output, "artifact", None) or {}) or getattr(output, "status", "success") == "error"
        self.emit("tool_end", {**call, "ok": not failed, "summary": getattr(output, "text", str(output))})

    def on_tool_error(self, error, *, run_id, **kwargs):
        call = self.running.pop(run_id, {"name": kwargs.get("name", "tool"), "args": {}, "by": "model"})
        self.emit("tool_end", {**call, "ok": False, "summary": str(error)})


class _InMemoryParser(MultiPartParser):
    spool_max_size = 1 << 62  # never roll an upload over into a temporary file: no photograph touches the disk


class _Conversation:
    def __init__(self, assistant):
        self.assistant = assistant
        self.lock = threading.Lock()  # one turn at a time: two messages to a session never interleave


class _SharedParts:
    """The chat model and tools, loaded on first use and shared by every session of the app."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.loaded = False
        self._lock = threading.Lock()

    def assistant(self, session_id: str, checkpointer):
        from ophglm.agent.assistant import Assistant
        from ophglm.agent.chat_models import make_chat_model
        from ophglm.tools.registry import load_tools

        with self._lock:
            if not self.loaded:
                self.chat_model, self.tools = make_chat_model(self.settings), load_tools(self.settings)
                self.loaded = True
        return Assistant(self.settings, chat_model=self.chat_model, tools=self.tools, checkpointer=checkpointer, thread_id=session_id)


class _Sessions:
    """Open conversations, least recently used first; any other that has spoken waits in SQLite."""

    def __init__(self, factory: AssistantFactory, checkpointer: SqliteSaver):
        self.factory, self.checkpointer = factory, checkpointer
        self.open: OrderedDict[str, _Conversation] = OrderedDict()
        self.lock = threading.Lock()

    def create(self) -> str:
        session_id = uuid.uuid4().hex
        self._keep(session_id, _Conversation(self.factory(session_id, self.checkpointer)))
        return session_id

    def get(self, session_id: str) -> _Conversation:
        with self.lock:
            if session_id in self.open:
                self.open.move_to_end(session_id)
                return self.open[session_id]
        if self.checkpointer.get_tuple({"configurable": {"thread_id": session_id}}) is None:
            raise _fail(404, f"unknown session {session_id!r}: create one with POST /v1/sessions")
        return self._keep(session_id, _reopened(self.factory(session_id, self.checkpointer)))

    def _keep(self, session_id: str, state: _Conversation) -> _Conversation:
        with self.lock:
            if session_id in self.open:  # reopened by two requests at once: the first one stands
                return self.open[session_id]
            while len(self.open) >= MAX_SESSIONS:
                idle = next((key for key, open_ in self.open.items() if not open_.lock.locked()), None)
                if idle is None:
                    raise _fail(503, f"all {MAX_SESSIONS} open sessions are busy; try again shortly")
                del self.open[idle]
            self.open[session_id] = state
            return state


def _reopened(assistant) -> _Conversation:
    """A session back from SQLite: its findings come back from the tool messages, its photographs do not."""
    for message in assistant.graph.get_state(assistant.thread).values.get("messages", []):
        artifact = message.artifact if isinstance(message, ToolMessage) else None
        if artifact and artifact.get("findings") and "error" not in artifact:
            assistant.session.findings[message.name] = artifact["findings"]
    return _Conversation(assistant)


def _checkpointer(settings: Settings) -> SqliteSaver:
    path = settings.sessions_db or str(Path(settings.cache_dir) / "sessions.sqlite")
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    return SqliteSaver(sqlite3.connect(path, check_same_thread=False))  # the saver locks around each use


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, default=str)}\n\n".encode()


def _fail(status: int, message: str) -> HTTPException:
    return HTTPException(status_code=status, detail=message)


MESSAGE_BODY = {  # the multipart body, for the OpenAPI docs (parsed by hand to keep it in memory)
    "required": True,
    "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["text"],
        "properties": {"text": {"type": "string", "description": "the question"},
                       "image": {"type": "string", "format": "binary", "description": "optional fundus photograph (JPEG, PNG, TIFF, ...)"}},
    }}},
}
EVENTS_DOC = (
    "A `text/event-stream`. Events, each with JSON data: `token` {text} (answer text as the model writes it; "
    "the checked answer is in `done`), `tool_start` {name, args}, `tool_end` {name, args, ok, summary}, then "
    "`findings` {tool: findings}, `triage` {level, reason, rule} or null, `citations` [...], and `done` (the whole "
    "reply: answer, tool_calls, findings, citations, artifacts, triage, notes, disclaimer) or `error` {message}."
)


def create_app(settings: Settings, assistant_factory: AssistantFactory | None = None) -> FastAPI:
    """The app; `assistant_factory(session_id, checkpointer)` builds each session's Assistant (tests pass a scripted one)."""
    shared = _SharedParts(settings)
    checkpointer = _checkpointer(settings)
    sessions = _Sessions(assistant_factory or shared.assistant, checkpointer)
    page = files("ophglm").joinpath("web/index.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        checkpointer.conn.close()

    app = FastAPI(title="OphGLM", version=__version__, lifespan=lifespan, description=(
        "Ophthalmic language-and-vision assistant. Research software, not a medical device. "
        "Create a session, post messages (text and an optional fundus photograph), read the streamed reply."))
    app.state.sessions = sessions

    bearer, header = HTTPBearer(auto_error=False), APIKeyHeader(name="X-API-Key", auto_error=False)

    def require_key(credentials: HTTPAuthorizationCredentials | None = Depends(bearer), key: str | None = Depends(header)) -> None:
        if not settings.api_key:
            return
        given = key or (credentials.credentials if credentials else "")
        if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            raise HTTPException(401, "missing or wrong API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'", headers={"WWW-Authenticate": "Bearer"})

    api = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        # The page may fetch nothing from elsewhere: the policy makes a stray external URL fail loudly.
        policy = "default-src 'self'; img-src 'self' blob: data:; style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'"
        return HTMLResponse(page, headers={"Content-Security-Policy": policy})

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "version": __version__, "open_sessions": len(sessions.open), "models_loaded": shared.loaded}

    @api.post("/sessions", status_code=201)
    def create_session() -> dict:
        """A new conversation. The first call loads the chat model and tools (seconds to a minute)."""
        try:
            return {"session_id": sessions.create()}
        except USER_ERRORS as err:  # a setting that cannot work (the tool server down, a missing model): say which
            raise _fail(503, f"the assistant could not start: {err}") from None

    @api.post("/sessions/{session_id}/messages", response_class=StreamingResponse, openapi_extra={"requestBody": MESSAGE_BODY},
              responses={200: {"content": {"text/event-stream": {}}, "description": EVENTS_DOC}})
    async def post_message(session_id: str, request: Request) -> StreamingResponse:
        """Ask a question, optionally with a photograph; the reply streams as server-sent events."""
        state = await asyncio.to_thread(sessions.get, session_id)  # reopening one may load the models
        text, image = await _read_message(request, settings)
        photo = await asyncio.to_thread(_decode_upload, image, settings) if image is not None else None
        return StreamingResponse(_run_turn(state, text, photo), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @api.get("/sessions/{session_id}/artifacts/{artifact_id}", response_class=Response, responses={200: {"content": {"image/png": {}}}})
    def artifact(session_id: str, artifact_id: str) -> Response:
        """A picture a tool made (the lesion overlay), by the id listed in the reply's `artifacts`."""
        stored = sessions.get(session_id).assistant.session.artifacts
        if artifact_id not in stored:
            raise _fail(404, f"unknown artifact {artifact_id!r} in session {session_id} (known: {', '.join(stored) or 'none'}; "
                             "pictures live in memory only and are gone after a server restart)")
        return Response(bytes(stored[artifact_id]), media_type="image/png")

    app.include_router(api)
    return app


async def _read_message(request: Request, settings: Settings) -> tuple[str, bytes | None]:
    """The `text` field and optional `image` file, held in memory, refused past the size limit."""
    kind = request.headers.get("content-type", "")
    if not kind.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise _fail(415, f"send multipart/form-data with a 'text' field and an optional 'image' file, not {kind or 'no content type'}")
    limit = settings.max_upload_bytes + MAX_TEXT_BYTES
    too_big = f"the request is above the upload limit of {settings.max_upload_bytes:,} bytes for a photograph"
    if int(request.headers.get("content-length") or 0) > limit:
        raise _fail(413, too_big)

    async def bounded():
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise _fail(413, too_big)
            yield chunk

    if kind.startswith("multipart/form-data"):
        parser = _InMemoryParser(request.headers, bounded(), max_files=1, max_fields=2, max_part_size=MAX_TEXT_BYTES)
    else:  # a text-only message may come as a plain form
        parser = FormParser(request.headers, bounded())
    try:
        form = await parser.parse()
    except MultiPartException as err:
        raise _fail(400, f"malformed multipart body: {err.message}") from None
    text, image = form.get("text"), form.get("image")
    if not isinstance(text, str) or not text.strip():
        raise _fail(400, "the 'text' field (the question) is missing or empty")
    if image is None or image == "":
        return text, None
    if not isinstance(image, UploadFile):
        raise _fail(400, "'image' must be a file upload, not a text field")
    data = await image.read()
    name = image.filename or "uploaded image"
    if not data and not image.filename:  # a browser form with no file chosen
        return text, None
    if not data:
        raise _fail(400, f"{name} is empty (0 bytes)")
    if len(data) > settings.max_upload_bytes:
        raise _fail(413, f"{name} is {len(data):,} bytes, above the upload limit of {settings.max_upload_bytes:,}")
    return text, data


IMAGE_ERROR_STATUS = {"not_image": 415, "too_large": 413, "unusable": 400}


def _decode_upload(data: bytes, settings: Settings) -> Image.Image:
    """Decode the photograph once, before the stream starts, so the status code can say what is wrong."""
    try:
        return decode_image(data, "the photograph", max_pixels=settings.max_upload_pixels)
    except ImageError as err:
        raise _fail(IMAGE_ERROR_STATUS[err.kind], str(err)) from None


async def _run_turn(state: _Conversation, text: str, image: Image.Image | None):
    """Run the blocking turn in a worker thread and yield its events as they happen."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def emit(event: str | None, data: Any = None) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, (event, data))

    def turn() -> None:
        _TURN_EVENTS.set(_ToolEvents(emit))
        try:
            with state.lock:
                reply = state.assistant.ask(text, image=image, on_token=lambda token: emit("token", {"text": token}))
            emit("findings", reply.findings)
            emit("triage", asdict(reply.triage) if reply.triage else None)
            emit("citations", reply.citations)
            emit("done", reply.to_dict())
        except USER_ERRORS as err:
            emit("error", {"message": err.args[0] if isinstance(err, KeyError) and err.args else str(err)})
        except Exception:
            log.exception("turn failed")
            emit("error", {"message": "internal error while answering; the server log has the details"})
        finally:
            emit(None)

    # A copied context keeps the event handler to this turn; the turn finishes even if the client leaves.
    threading.Thread(target=contextvars.copy_context().run, args=(turn,), daemon=True, name="ophglm-turn").start()
    while True:
        event, data = await queue.get()
        if event is None:
            return
        yield _sse(event, data)


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the app under uvicorn; beyond loopback only with an API key."""
    import uvicorn

    if not is_loopback(host) and not settings.api_key:
        raise ValueError(f"refusing to listen on {host} without an API key: set OPHGLM_API_KEY (or api_key in the settings file), or bind to 127.0.0.1")
    uvicorn.run(create_app(settings), host=host, port=port)
