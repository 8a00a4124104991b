"""One OphGLM conversation: the examination pipeline, then LangChain's `create_agent` loop, then the check.

A turn that brings a photograph first runs the examination (examination.py: quality gate,
classifier, lesions, disc, triage rule table), once, as pipeline steps; a rejected image ends
the turn with a refusal and its reason, without the LLM. The routers the settings switch on
(routers.py) may then run a tool in the model's stead, also as pipeline steps. The LLM reads
all of it as tool results in its prompt (the format it was fine-tuned on) and may call
further tools itself: those, and only those, are its own calls. Its answer is checked
against the conversation's tool results (grounding.py) and the reply is composed (reply.py),
marking who did and wrote what.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import asdict
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as ToolTimeout
from pathlib import Path
from typing import Callable

from langchain.agents import create_agent
from langchain.agents.middleware import AgentMiddleware
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_core.tools import StructuredTool
from langgraph.checkpoint.memory import InMemorySaver
from PIL import Image

from ophglm.agent.examination import (EXAMINE, MODEL, PIPELINE, QUALITY_GATE, TRIAGE, Examination, Step, examine,
                                      from_findings)
from ophglm.agent.reply import Reply, ToolCallRecord, Turn, compose
from ophglm.agent.routers import OUT_OF_SCOPE, asks_about_vessels, knowledge_query
from ophglm.agent.triage import TriageFindings
from ophglm.session import ImageError, Session, decode_image
from ophglm.settings import Settings
from ophglm.tools.base import Tool, ToolError
from ophglm.tools.classify_fundus import probabilities_of

__all__ = ["Assistant", "Reply", "ToolCallRecord", "SYSTEM_PROMPT"]

SYSTEM_PROMPT = (
    "You are OphGLM, an assistant for eye-care questions and colour fundus photographs. "
    "Answer in at most five short sentences, only from the tool results in this conversation. "
    "Quote numbers exactly as the tools gave them. Cite knowledge passages by their id in square brackets, "
    "for example [glaucoma#causes-and-symptoms]. If the tools found nothing relevant, say that you do not know. "
    "You do not diagnose: you describe what the tools found."
)
AUDIT = logging.getLogger("ophglm.audit")
log = logging.getLogger(__name__)
MAX_MODEL_CALLS = 3  # the LLM's own steps per turn: then it must answer without tools
PIPELINE_CALL = "pipeline_"  # id prefix of the pipeline's calls in the conversation (they are not the LLM's steps)


def _call(name: str, args: dict) -> dict:
    return {"name": name, "args": args, "id": f"{PIPELINE_CALL}{uuid.uuid4().hex[:12]}", "type": "tool_call"}


def is_pipeline_step(message) -> bool:
    return isinstance(message, AIMessage) and bool(message.tool_calls) and all(c["id"].startswith(PIPELINE_CALL) for c in message.tool_calls)


class ModelSteps(AgentMiddleware):
    """The LLM's own steps: timed, capped at MAX_MODEL_CALLS per turn, skipped when the pipeline refused."""

    def __init__(self):
        super().__init__()
        self.model_seconds: list[float] = []  # the LLM's calls this turn (the Assistant resets it)
        self.refusal = ""  # set by the Assistant when the pipeline ends the turn

    def wrap_model_call(self, request, handler):
        if self.refusal:
            return AIMessage(content=self.refusal, additional_kwargs={"by": PIPELINE})
        turn = request.messages[max((i for i, m in enumerate(request.messages) if isinstance(m, HumanMessage)), default=-1) + 1:]
        if sum(isinstance(m, AIMessage) and not is_pipeline_step(m) for m in turn) >= MAX_MODEL_CALLS:
            request = request.override(tools=[])
        start = time.perf_counter()
        try:
            return handler(request)
        finally:
            self.model_seconds.append(time.perf_counter() - start)


def _audit(name: str, arguments: dict, error: str | None, start: float) -> None:
    """One line per tool call: which tool, on which image, outcome, time; never pixels or the person's words."""
    shown = {k: (v if k == "image_id" else f"<{len(str(v))} chars>") for k, v in arguments.items()}
    AUDIT.info(json.dumps({"tool": name, "arguments": shown, "ok": error is None, "error": error,
                           "ms": round(1000 * (time.perf_counter() - start), 1)}))


def _step(message: ToolMessage, args: dict, by: str) -> Step:
    artifact = message.artifact or {}
    ok = "error" not in artifact and message.status != "error"
    return Step(message.name, args, ok, message.text if ok else artifact.get("error", message.text), artifact.get("findings", {}) if ok else {},
                artifact.get("citations", []), artifact.get("artifacts", []), artifact.get("seconds", 0.0), by)


class Assistant:
    """A multi-turn conversation with its own session, tools and chat model."""

    def __init__(self, settings: Settings, chat_model=None, tools: dict[str, Tool] | None = None, checkpointer=None,
                 thread_id: str | None = None, routers: tuple[str, ...] | None = None):
        from ophglm.agent.chat_models import make_chat_model
        from ophglm.tools.registry import load_tools

        self.settings = settings
        self.routers = settings.router_names if routers is None else tuple(routers)
        self.session = Session()
        self.tools = tools if tools is not None else load_tools(settings)
        if "classify_fundus" in self.tools and TRIAGE not in self.tools:
            self.tools = {**self.tools, TRIAGE: TriageFindings()}
        self.chat_model = chat_model if chat_model is not None else make_chat_model(settings)
        if getattr(self.chat_model, "fusion", None) is not None:  # the LLM sees this session's photographs
            self.chat_model = self.chat_model.model_copy(update={"image_source": self._fusion_image})
        # Tools run in worker threads so a hung tool can be abandoned after settings.tool_timeout_s.
        self._tool_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ophglm-tool")
        self.thread = {"configurable": {"thread_id": thread_id or uuid.uuid4().hex}, "recursion_limit": 24}
        self.model_steps = ModelSteps()
        self.langchain_tools = {name: self._langchain_tool(t) for name, t in self.tools.items()}
        self.graph = create_agent(
            self.chat_model,
            list(self.langchain_tools.values()),
            system_prompt=SYSTEM_PROMPT,
            middleware=[self.model_steps],
            checkpointer=checkpointer if checkpointer is not None else InMemorySaver(),
        )

    def _langchain_tool(self, tool: Tool) -> StructuredTool:
        def run(**arguments):
            start = time.perf_counter()
            error = None
            try:
                result = self._tool_pool.submit(tool, self.session, **arguments).result(timeout=self.settings.tool_timeout_s)
            except ToolTimeout:
                error = f"no result within {self.settings.tool_timeout_s:g} s (timed out)"
            except (ToolError, ImageError, KeyError, ValueError, FileNotFoundError) as err:
                error = err.args[0] if isinstance(err, KeyError) else str(err)
            except Exception as err:  # a broken or plug-in tool must not end the conversation
                log.exception("tool %s failed unexpectedly", tool.name)
                error = f"failed unexpectedly ({type(err).__name__}: {err})"
            _audit(tool.name, arguments, error, start)
            seconds = round(time.perf_counter() - start, 3)
            if error is not None:
                return f"Error from {tool.name}: {error}", {"error": error, "seconds": seconds}
            self.session.artifacts.update(result.artifacts)
            if result.findings:
                self.session.findings[tool.name] = result.findings
            return result.summary, {"findings": result.findings, "citations": result.citations, "artifacts": list(result.artifacts), "seconds": seconds}

        return StructuredTool.from_function(run, name=tool.name, description=tool.description, args_schema=tool.inputs, response_format="content_and_artifact")

    def _fusion_image(self, image_id: str):
        """The session's Photo for the fusion tokens (aperture found once, as for the tools); None for one the gate rejected (or an unknown id)."""
        from ophglm.tools.assess_quality import gradable_photo

        try:
            return gradable_photo(self.session, image_id, "fusion")
        except (ToolError, ImageError, KeyError):
            return None

    def add_image(self, image: str | Path | bytes | Image.Image) -> str:
        """A file path, an uploaded file's bytes, or an already decoded photograph (decoded once)."""
        if isinstance(image, Image.Image):
            return self.session.add_image(image if image.mode == "RGB" else image.convert("RGB"))
        if isinstance(image, bytes):
            return self.session.add_image(decode_image(image, "uploaded image"), image)
        return self.session.add_image_file(image)

    def _pipeline_runner(self, calls: list[tuple[dict, ToolMessage]]):
        """A Runner for examine() and the routers: each call goes through the same tool wrapper the LLM's calls use."""
        def run(name: str, args: dict) -> Step:
            call = _call(name, args)
            message = self.langchain_tools[name].invoke(call, config={"metadata": {"by": PIPELINE}})
            calls.append((call, message))
            return _step(message, args, PIPELINE)
        return run

    def ask(self, text: str, image: str | Path | bytes | Image.Image | None = None, on_token: Callable[[str], None] | None = None) -> Reply:
        """One turn: the question (and optionally a new photograph) in, a checked reply out."""
        text = text.strip()
        if not text:
            raise ValueError("the question is empty")
        extra: dict[str, str] = {"question": text}
        content = text
        started = time.perf_counter()
        self.model_steps.model_seconds, self.model_steps.refusal = [], ""
        history = self._messages()
        calls: list[tuple[dict, ToolMessage]] = []
        run = self._pipeline_runner(calls)
        examination = None
        if image is not None:
            image_id = self.add_image(image)
            extra["image_id"] = image_id
            content = f"{text}\n[Fundus photograph attached: image_id={image_id}]"
            examination = examine(self.session, image_id, self.tools, run=run)
            self.model_steps.refusal = examination.refusal
        self._route(text, examination, history, run)
        before = len(history)
        failure = ""
        try:
            messages = [HumanMessage(content=content, additional_kwargs=extra), *_grouped(calls)]
            for chunk, _ in self.graph.stream({"messages": messages}, self.thread, stream_mode="messages"):
                if on_token and isinstance(chunk, AIMessageChunk) and chunk.text:
                    on_token(chunk.text)
        except Exception as err:  # the LLM endpoint down (or the model broken): answer with what the tools found
            log.exception("the agent loop failed")
            failure = f"{type(err).__name__}: {err}"
        history = self._messages()
        reply = self._reply(text, history[before:], history, examination)
        if failure:
            reply.notes.append(f"the language model failed: {failure}")
            reply.answer = f"The language model failed, so there is no written answer this time. {reply.answer}"
        reply.timings = {"turn_s": round(time.perf_counter() - started, 3), "llm_s": round(sum(self.model_steps.model_seconds), 3),
                         "llm_calls": len(self.model_steps.model_seconds), "tools_s": round(sum(c.seconds for c in reply.tool_calls), 3)}
        return reply

    def _route(self, question: str, examination: Examination | None, history: list, run) -> None:
        """The routers the settings switch on, and the off-topic gate: pipeline steps before the LLM."""
        if self.model_steps.refusal:
            return
        latest = from_findings(self.session.findings)
        if "vessels" in self.routers and "measure_vessels" in self.tools and latest and asks_about_vessels(question):
            run("measure_vessels", {"image_id": latest.image_id})
        if "knowledge" in self.routers and "search_knowledge" in self.tools:
            most_likely = examination.classifier.most_likely if examination and examination.classifier else None
            searched = run("search_knowledge", {"query": knowledge_query(question, most_likely)})
            # A conversation about a photograph (even a rejected one) is in scope: the LLM answers follow-ups.
            photographed = examination is not None or any(isinstance(m, ToolMessage) and m.name == QUALITY_GATE for m in history)
            if searched.ok and not searched.findings.get("passages") and not photographed:
                self.model_steps.refusal = OUT_OF_SCOPE

    def _messages(self) -> list:
        state = self.graph.get_state(self.thread)
        return list(state.values.get("messages", [])) if state and state.values else []

    def _reply(self, question: str, turn: list, history: list, examination: Examination | None) -> Reply:
        calls = {c["id"]: c for m in turn if isinstance(m, AIMessage) for c in m.tool_calls}
        steps = [_step(m, calls.get(m.tool_call_id, {}).get("args", {}), PIPELINE if m.tool_call_id.startswith(PIPELINE_CALL) else MODEL)
                 for m in turn if isinstance(m, ToolMessage)]
        final = next((m for m in reversed(turn) if isinstance(m, AIMessage) and not m.tool_calls), None)
        by_pipeline = final is not None and final.additional_kwargs.get("by") == PIPELINE
        # A follow-up may quote an earlier turn's results: every tool result of the session is evidence.
        evidence = [m.text for m in history if isinstance(m, ToolMessage) and "error" not in (m.artifact or {})]
        retrieved = {c["id"]: c for m in history if isinstance(m, ToolMessage) for c in (m.artifact or {}).get("citations", [])}
        examined_now = examination is not None and examination.accepted
        # A photograph this turn that could not be examined (its tools failed) must not borrow an earlier one's findings.
        examined = examination if examination is not None else from_findings(self.session.findings)
        examined = examined if examined is not None and examined.accepted else None
        reply = compose(Turn(
            question=question, steps=steps, model_answer=None if by_pipeline else (final.text if final else ""),
            refusal=final.text if by_pipeline else "", evidence=evidence, retrieved=retrieved,
            probabilities=probabilities_of(self.session.findings.get("classify_fundus", {})),
            urgency=examined.triage if examined else None, examined=examined,
            examined_now=examined_now, tool_descriptions=tuple(t.description for t in self.tools.values())))
        for message in turn:
            if isinstance(message, AIMessage):
                reply.notes += [f"unusable tool call from the model: {c['error']}" for c in message.invalid_tool_calls]
                reply.notes += [f"repaired a tool call from the model: {r}" for r in message.response_metadata.get("repairs", [])]
                if retried := message.response_metadata.get("retried"):
                    reply.notes.append(f"asked the model once more after an unusable tool call ({retried})")
        if final is not None:  # the stored history says who wrote what, beside the model's raw answer
            record = {"parts": [asdict(p) for p in reply.parts], "fallback": reply.fallback,
                      "tool_calls": [{"name": c.name, "by": c.by} for c in reply.tool_calls]}
            marked = final.model_copy(update={"additional_kwargs": {**final.additional_kwargs, "ophglm_reply": record}})
            self.graph.update_state(self.thread, {"messages": [marked]}, as_node="model")
        return reply


def _grouped(calls: list[tuple[dict, ToolMessage]]) -> list:
    """The pipeline's calls as the conversation shows them: one step per stage (the examination's three tools together)."""
    stages: list[list[tuple[dict, ToolMessage]]] = []
    for call, message in calls:
        if not (stages and call["name"] in EXAMINE and stages[-1][0][0]["name"] in EXAMINE):
            stages.append([])
        stages[-1].append((call, message))
    messages = []
    for stage in stages:
        stage.sort(key=lambda pair: EXAMINE.index(pair[0]["name"]) if pair[0]["name"] in EXAMINE else 0)
        messages.append(AIMessage(content="", tool_calls=[call for call, _ in stage], additional_kwargs={"by": PIPELINE}))
        messages += [message for _, message in stage]
    return messages
