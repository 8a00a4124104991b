"""One OphGLM conversation: LangChain's `create_agent` loop over our tools, gated and checked.

Deterministic gates act before the LLM must decide (STACK.md: a small model's weakest
skill is choosing the next tool): a turn that brings a photograph first runs the quality
gate (a rejected image ends the turn with a refusal and its reason, no LLM and no
diagnosis), then the classifier, the lesion segmenter and the disc measurement, then the
triage rule table as a tool (so the LLM reads the level it explains); a question that asks
for a finer measurement by name (the vessels) runs that tool on the conversation's latest
examined photograph (the fine-tuned SmolLM2 never learnt to call it); every turn retrieves
knowledge before the LLM writes, and an off-topic text question (nothing retrieved, no
photograph in the conversation) is refused without the LLM. The LLM may call further tools itself. Its answer is then checked against this turn's tool results
(grounding.py), the triage level comes from the rule table (triage.py), and the reply
carries findings, citations, the overlay and the disclaimer.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as ToolTimeout
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from langchain.agents import create_agent
from langchain.agents.middleware import AgentMiddleware
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_core.tools import StructuredTool
from langgraph.checkpoint.memory import InMemorySaver
from PIL import Image

from ophglm import DISCLAIMER
from ophglm.agent.grounding import CITATION, NUMBER, check_answer
from ophglm.agent.triage import Triage, TriageFindings, triage
from ophglm.knowledge.lexical import best_sentences
from ophglm.session import ImageError, Session, decode_image
from ophglm.settings import Settings
from ophglm.tools.base import Tool, ToolError
from ophglm.tools.classify_fundus import LABELS, probabilities_of

SYSTEM_PROMPT = (
    "You are OphGLM, an assistant for eye-care questions and colour fundus photographs. "
    "Answer in at most five short sentences, only from the tool results in this conversation. "
    "Quote numbers exactly as the tools gave them. Cite knowledge passages by their id in square brackets, "
    "for example [glaucoma#causes-and-symptoms]. If the tools found nothing relevant, say that you do not know. "
    "You do not diagnose: you describe what the tools found."
)
QUALITY_GATE = "assess_quality"
AUDIT = logging.getLogger("ophglm.audit")
OUT_OF_SCOPE = ("I can only help with questions about the eyes and with colour fundus photographs, "
                "and the knowledge base has nothing on this question.")
log = logging.getLogger(__name__)
EXAMINE = ("classify_fundus", "segment_lesions", "measure_optic_disc")
TRIAGE = "triage_findings"
NOT_A_DIAGNOSIS = "not a diagnosis"
MAX_MODEL_CALLS = 3  # the LLM's own steps per turn: then it must answer without tools
GATE_CALL = "gate_"  # id prefix of the calls the gates make (they are not the LLM's steps)
# Finer tools a question asks for by name: what it must mention for the gates to run the tool.
ASKED_FOR = {"measure_vessels": re.compile(
    r"\b(blood vessels?|vessels?|vascular\w*|vasculature|arteries|arterial|arterioles?|veins?|venous|venules?)\b", re.I)}


def _call(name: str, args: dict) -> dict:
    return {"name": name, "args": args, "id": f"{GATE_CALL}{uuid.uuid4().hex[:12]}", "type": "tool_call"}


def is_gate_step(message) -> bool:
    return isinstance(message, AIMessage) and bool(message.tool_calls) and all(c["id"].startswith(GATE_CALL) for c in message.tool_calls)


def rejected_image(turn: list) -> str:
    """The refusal for a photograph the quality gate rejected in this turn, else ''."""
    for message in turn:
        findings = (message.artifact or {}).get("findings", {}) if isinstance(message, ToolMessage) and message.name == QUALITY_GATE else {}
        if findings and not (findings["is_fundus"] and findings["gradable"]):
            return (f"I cannot assess this image: it is {findings['verdict']}. "
                    "Please send a clear colour photograph of the back of the eye (a fundus photograph).")
    return ""


def out_of_scope(messages: list, turn: list) -> str:
    """The refusal for a text question the knowledge base has nothing on, in a conversation without photographs."""
    searched = [m for m in turn if isinstance(m, ToolMessage) and m.name == "search_knowledge" and "error" not in (m.artifact or {})]
    # A conversation about a photograph (even a rejected one) is in scope: the LLM answers follow-ups.
    photographed = any(isinstance(m, ToolMessage) and m.name == QUALITY_GATE for m in messages)
    if searched and not photographed and not any(m.artifact["findings"].get("passages") for m in searched):
        return OUT_OF_SCOPE
    return ""


def _examined_photo(messages: list) -> str | None:
    """The latest photograph of the conversation, if the classifier examined it (it passed the quality gate)."""
    latest = next((m.additional_kwargs["image_id"] for m in reversed(messages) if isinstance(m, HumanMessage) and m.additional_kwargs.get("image_id")), None)
    examined = any(isinstance(m, ToolMessage) and m.name == "classify_fundus" and "error" not in (m.artifact or {})
                   and (m.artifact or {}).get("findings", {}).get("image_id") == latest for m in messages)
    return latest if examined else None


def _this_turn(messages: list) -> tuple[HumanMessage | None, list]:
    for i in range(len(messages) - 1, -1, -1):
        if isinstance(messages[i], HumanMessage):
            return messages[i], messages[i + 1:]
    return None, list(messages)


class ToolGates(AgentMiddleware):
    """Run the examination and retrieval tools before the LLM's first step of a turn."""

    def __init__(self, tool_names: set[str]):
        super().__init__()
        self.tool_names = tool_names
        self.model_seconds: list[float] = []  # the LLM's own calls this turn (the Assistant resets it)

    def wrap_model_call(self, request, handler):
        human, turn = _this_turn(request.messages)
        if human is None:
            return handler(request)
        done = {m.name for m in turn if isinstance(m, ToolMessage)}
        image_id = human.additional_kwargs.get("image_id")
        if image_id and QUALITY_GATE in self.tool_names and QUALITY_GATE not in done:
            return AIMessage(content="", tool_calls=[_call(QUALITY_GATE, {"image_id": image_id})])
        if image_id and (refusal := rejected_image(turn)):
            return AIMessage(content=refusal)
        if image_id and not done & set(EXAMINE):
            calls = [_call(name, {"image_id": image_id}) for name in EXAMINE if name in self.tool_names]
            if calls:
                return AIMessage(content="", tool_calls=calls)
        if image_id and TRIAGE in self.tool_names and TRIAGE not in done and "classify_fundus" in done:
            return AIMessage(content="", tool_calls=[_call(TRIAGE, {"image_id": image_id})])
        question = human.additional_kwargs.get("question", human.text)
        asked = [name for name, pattern in ASKED_FOR.items() if name in self.tool_names and name not in done and pattern.search(question)]
        if asked and (photo := _examined_photo(request.messages)):
            return AIMessage(content="", tool_calls=[_call(name, {"image_id": photo}) for name in asked])
        if "search_knowledge" in self.tool_names and "search_knowledge" not in done:
            return AIMessage(content="", tool_calls=[_call("search_knowledge", {"query": self._query(human, turn)})])
        if refusal := out_of_scope(request.messages, turn):
            return AIMessage(content=refusal)
        if sum(isinstance(m, AIMessage) and not is_gate_step(m) for m in turn) >= MAX_MODEL_CALLS:
            request = request.override(tools=[])
        start = time.perf_counter()
        try:
            return handler(request)
        finally:
            self.model_seconds.append(time.perf_counter() - start)

    @staticmethod
    def _query(human: HumanMessage, turn: list) -> str:
        question = human.additional_kwargs.get("question", human.text)
        for message in turn:  # an examined photograph: look up what the classifier found
            findings = (message.artifact or {}).get("findings", {}) if isinstance(message, ToolMessage) else {}
            if message.name == "classify_fundus" and findings.get("most_likely"):
                label = LABELS.get(findings["most_likely"], findings["most_likely"])
                return f"{label}: signs and referral urgency. {question}"[:500]
        return question[:500]


@dataclass
class ToolCallRecord:
    name: str
    args: dict
    ok: bool
    summary: str
    seconds: float = 0.0


@dataclass
class Reply:
    answer: str
    tool_calls: list[ToolCallRecord] = field(default_factory=list)
    findings: dict[str, Any] = field(default_factory=dict)
    citations: list[dict] = field(default_factory=list)
    artifacts: list[str] = field(default_factory=list)
    triage: Triage | None = None
    refused: bool = False
    refusal_reason: str = ""
    notes: list[str] = field(default_factory=list)
    # Wall-clock seconds: the whole turn, the LLM's own calls, each tool call (in ToolCallRecord).
    timings: dict[str, float] = field(default_factory=dict)
    disclaimer: str = DISCLAIMER

    def to_dict(self) -> dict:
        return asdict(self)


def _audit(name: str, arguments: dict, error: str | None, start: float) -> None:
    """One line per tool call: which tool, on which image, outcome, time; never pixels or the person's words."""
    shown = {k: (v if k == "image_id" else f"<{len(str(v))} chars>") for k, v in arguments.items()}
    AUDIT.info(json.dumps({"tool": name, "arguments": shown, "ok": error is None, "error": error,
                           "ms": round(1000 * (time.perf_counter() - start), 1)}))


class Assistant:
    """A multi-turn conversation with its own session, tools and chat model."""

    def __init__(self, settings: Settings, chat_model=None, tools: dict[str, Tool] | None = None, checkpointer=None, thread_id: str | None = None):
        from ophglm.agent.chat_models import make_chat_model
        from ophglm.tools.registry import load_tools

        self.settings = settings
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
        self.gates = ToolGates(set(self.tools))
        self.graph = create_agent(
            self.chat_model,
            [self._langchain_tool(t) for t in self.tools.values()],
            system_prompt=SYSTEM_PROMPT,
            middleware=[self.gates],
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

    def ask(self, text: str, image: str | Path | bytes | Image.Image | None = None, on_token: Callable[[str], None] | None = None) -> Reply:
        """One turn: the question (and optionally a new photograph) in, a checked reply out."""
        text = text.strip()
        if not text:
            raise ValueError("the question is empty")
        extra: dict[str, str] = {"question": text}
        content = text
        if image is not None:
            image_id = self.add_image(image)
            extra["image_id"] = image_id
            content = f"{text}\n[Fundus photograph attached: image_id={image_id}]"
        before = len(self._messages())
        failure = ""
        started, self.gates.model_seconds = time.perf_counter(), []
        try:
            for chunk, _ in self.graph.stream({"messages": [HumanMessage(content=content, additional_kwargs=extra)]}, self.thread, stream_mode="messages"):
                if on_token and isinstance(chunk, AIMessageChunk) and chunk.text:
                    on_token(chunk.text)
        except Exception as err:  # the LLM endpoint down (or the model broken): answer with what the tools found
            log.exception("the agent loop failed")
            failure = f"{type(err).__name__}: {err}"
        history = self._messages()
        reply = self._reply(history[before + 1:], history)
        reply.timings = {"turn_s": round(time.perf_counter() - started, 3), "llm_s": round(sum(self.gates.model_seconds), 3),
                         "llm_calls": len(self.gates.model_seconds), "tools_s": round(sum(c.seconds for c in reply.tool_calls), 3)}
        if failure:
            found = [c.summary for c in reply.tool_calls if c.ok and c.name != "search_knowledge"]
            reply.answer = ("The language model failed, so there is no written answer this time. "
                            + ("What the tools found: " + " ".join(found) if found else "No tool results either.")).strip()
            reply.notes.append(f"the language model failed: {failure}")
        return reply

    def _messages(self) -> list:
        state = self.graph.get_state(self.thread)
        return list(state.values.get("messages", [])) if state and state.values else []

    def _reply(self, turn: list, history: list) -> Reply:
        reply = Reply(answer="")
        # A follow-up may quote an earlier turn's results: every tool result of the session is evidence.
        evidence = [m.text for m in history if isinstance(m, ToolMessage) and "error" not in (m.artifact or {})]
        retrieved = {c["id"]: c for m in history if isinstance(m, ToolMessage) for c in (m.artifact or {}).get("citations", [])}
        passages = {pid: c.get("text", "") for pid, c in retrieved.items()}
        for message in turn:
            if isinstance(message, AIMessage):
                reply.notes += [f"unusable tool call from the model: {c['error']}" for c in message.invalid_tool_calls]
                reply.notes += [f"repaired a tool call from the model: {r}" for r in message.response_metadata.get("repairs", [])]
                if retried := message.response_metadata.get("retried"):
                    reply.notes.append(f"asked the model once more after an unusable tool call ({retried})")
            if not isinstance(message, ToolMessage):
                continue
            artifact = message.artifact or {}
            ok = "error" not in artifact and message.status != "error"
            call = next((c for m in turn if isinstance(m, AIMessage) for c in m.tool_calls if c["id"] == message.tool_call_id), {"args": {}})
            reply.tool_calls.append(ToolCallRecord(message.name, call["args"], ok, message.text, artifact.get("seconds", 0.0)))
            if not ok:
                reply.notes.append(f"{message.name} failed: {artifact.get('error', message.text)}")
                continue
            if artifact.get("findings"):
                reply.findings[message.name] = artifact["findings"]
            reply.citations += [c for c in artifact.get("citations", []) if c["id"] not in {x["id"] for x in reply.citations}]
            reply.artifacts += artifact.get("artifacts", [])
        final = next((m for m in reversed(turn) if isinstance(m, AIMessage) and not m.tool_calls), None)
        probabilities = probabilities_of(self.session.findings.get("classify_fundus", {}))
        level = triage(self.session.findings)
        grounded = check_answer(final.text if final else "", evidence, passages, probabilities, checks_urgency=True,
                                urgency=level and level.level, tool_descriptions=tuple(t.description for t in self.tools.values()))
        # Nothing of the model's answer held: the person still gets this turn's findings in the tools' own words,
        # or the retrieved sentences that best answer the question, quoted and cited.
        found = [c.summary for c in reply.tool_calls if c.ok and c.name not in ("search_knowledge", QUALITY_GATE, TRIAGE)]
        question = next((m.additional_kwargs.get("question", m.text) for m in reversed(history) if isinstance(m, HumanMessage)), "")
        quoted = [] if found else best_sentences(question, [(c["id"], c.get("text", "")) for c in reply.citations])
        reply.answer = (grounded.text or ("What the tools found: " + " ".join(found) if found else "")
                        or ("What the knowledge base says: " + " ".join(f"{s[:-1]} [{pid}]{s[-1]}" for pid, s in quoted) if quoted else "")
                        or "I could not produce an answer supported by the tool results.")
        # A tool the question asked for by name ("the vessel density") answers it even where the LLM's sentence did not hold.
        for call in reply.tool_calls:
            if call.ok and call.name in ASKED_FOR and not set(NUMBER.findall(call.summary)) & set(NUMBER.findall(reply.answer)):
                reply.answer += " " + call.summary
        reply.notes += [f"removed an unsupported statement: {r}" for r in grounded.removed]
        if grounded.removed:
            reply.answer += " (Some statements were removed because no tool result supported them.)"
        # A follow-up may cite a passage an earlier turn retrieved: the reply carries its text too.
        reply.citations += [retrieved[pid] for pid in dict.fromkeys(CITATION.findall(reply.answer))
                            if pid in retrieved and pid not in {c["id"] for c in reply.citations}]
        if reply.citations and not any(f"[{c['id']}]" in reply.answer for c in reply.citations):
            reply.answer += " Sources: " + ", ".join(f"[{c['id']}]" for c in reply.citations[:3]) + "."
        if not reply.citations and "search_knowledge" in reply.findings and OUT_OF_SCOPE not in reply.answer:
            reply.answer += " The knowledge base does not cover this question."
        reply.triage = level
        if any(name in reply.findings for name in EXAMINE):
            # An answer about a photograph is read on its own (an API client may show only this field):
            # it carries the rule table's urgency and the disclaimer even where the LLM left them out.
            stated = re.search(rf"urgen\w*\W+(?:is\W+)?{reply.triage.level}\b", reply.answer.lower()) if reply.triage else True
            if not stated:
                reply.answer += f" Urgency: {reply.triage.level} — {reply.triage.reason}."
            if NOT_A_DIAGNOSIS not in reply.answer.lower():
                reply.answer += " This is not a diagnosis: have an eye-care professional review the photograph."
        if refusal := rejected_image(turn) or out_of_scope(history, turn):
            reply.refused, reply.refusal_reason, reply.triage = True, refusal, None
        return reply
