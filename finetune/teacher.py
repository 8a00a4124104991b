"""The teacher: a rule-based writer that plays the LLM inside the real agent loop.

Instruction data must look exactly like what the fine-tuned model will see: the same
system prompt, tool block, gate-made tool calls and tool results. So `ophglm data build`
runs the real `Assistant` with this chat model in the LLM's seat; it records every prompt
and writes the target step from the tool results in that prompt only: a tool call where
the question needs a tool the gates did not run, otherwise an answer that quotes the tools'
numbers as they printed them, cites a retrieved passage, gives the rule table's urgency
and says it is not a diagnosis. What the LLM learns is this writer's policy, phrased in
varied ways by the questions it is asked.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import PrivateAttr

from ophglm.agent.local_model import to_chat_dicts
from ophglm.agent.toolcalls import render_call
from ophglm.tools.classify_fundus import LABELS, probabilities_of
from ophglm.tools.segment_lesions import LESION_NAMES

NOT_A_DIAGNOSIS = "This is not a diagnosis: an eye-care professional should review the photograph."
PASSAGE = re.compile(r"^\[([a-z0-9_]+#[a-z0-9-]+)\] [^:]*: (.*)$", re.M)
SENTENCE_END = re.compile(r"(?<=[a-z0-9)][.!?])\s+(?=[A-Z])")
VESSEL_WORDS = re.compile(r"\bvessel|\bvascular|\bblood vessels?\b", re.I)


def _latest(messages: list[BaseMessage], tool: str) -> dict[str, Any]:
    for message in reversed(messages):
        if isinstance(message, ToolMessage) and message.name == tool and "error" not in (message.artifact or {}):
            return (message.artifact or {}).get("findings", {}) or {"text": message.text}
    return {}


def _this_turn(messages: list[BaseMessage]) -> tuple[HumanMessage, list[BaseMessage]]:
    last = max(i for i, m in enumerate(messages) if isinstance(m, HumanMessage))
    return messages[last], messages[last + 1:]


def first_sentences(text: str, limit: int = 2) -> str:
    """The first complete sentences of a passage excerpt (an excerpt ends mid-sentence with '...')."""
    sentences = [s for s in SENTENCE_END.split(text.strip()) if s.endswith((".", "!", "?")) and not s.endswith("...")]
    return " ".join(sentences[:limit])


def knowledge_sentence(turn: list[BaseMessage], wanted: str | None = None) -> str:
    """One or two sentences from the passage the question was written about if retrieved, else the best one, cited."""
    passages = [p for m in turn if isinstance(m, ToolMessage) and m.name == "search_knowledge" for p in PASSAGE.findall(m.text)]
    passages.sort(key=lambda p: p[0] != wanted)  # stable: retrieval order otherwise
    for passage_id, excerpt in passages:
        if sentences := first_sentences(excerpt):
            return f"{sentences} [{passage_id}]"
    return ""


def classifier_sentence(found: dict, asked: str | None) -> str:
    probabilities = probabilities_of(found)
    top = found.get("most_likely")
    if asked and asked in probabilities and asked != top:
        return f"The classifier gives {LABELS.get(asked, asked)} a probability of {probabilities[asked]:.2f}; its most likely class is {LABELS.get(top, top)} ({probabilities[top]:.2f})."
    if not found.get("confident"):
        return f"The classifier is unsure: its most likely class, {LABELS.get(top, top)}, has a probability of only {probabilities[top]:.2f}."
    return f"The classifier's most likely class is {LABELS.get(top, top)}, with a probability of {probabilities[top]:.2f}."


def lesion_sentence(found: dict) -> str:
    lesions = found.get("lesions", {})
    seen = [f"{v['count']['value']} {LESION_NAMES[k]}" for k, v in lesions.items() if v["count"]["value"]]
    if not seen:
        return "The lesion segmenter found no microaneurysms, haemorrhages or exudates."
    text = "The lesion segmenter found " + (", ".join(seen[:-1]) + " and " + seen[-1] if len(seen) > 1 else seen[0]) + "."
    if found.get("macular_exudates", {}).get("value"):
        text += " Hard exudates lie within 1 disc diameter of the fovea."
    return text


def disc_sentence(found: dict) -> str:
    if "vertical_cdr" not in found:
        return ""
    text = f"The vertical cup-to-disc ratio is {found['vertical_cdr']['value']:.2f}"
    return text + (", but the disc is small in this photograph, so that ratio is unreliable." if not found.get("reliable") else ".")


def triage_sentence(found: dict) -> str:
    return f"By OphGLM's triage rules the urgency is {found['level']}: {found['reason']}." if found.get("level") else ""


def answer(intent: str, messages: list[BaseMessage], subject: str | None = None) -> str:
    """The target answer for one intent, from the tool results the prompt holds."""
    _, turn = _this_turn(messages)
    quality = _latest(messages, "assess_quality")
    if quality and not (quality.get("is_fundus") and quality.get("gradable")) and intent != "knowledge":
        return ("I could not assess the last image: the quality check found it is not a gradable colour fundus photograph, "
                "so I cannot say anything about the eye. Please send a clear colour photograph of the back of the eye.")
    found = {name: _latest(messages, name) for name in ("classify_fundus", "segment_lesions", "measure_optic_disc", "triage_findings", "measure_vessels")}
    knowledge = knowledge_sentence(turn, subject if intent == "knowledge" else None)
    if intent == "out_of_scope":
        return "I can only help with questions about the eyes and with colour fundus photographs, so I cannot answer that."
    if intent == "knowledge":
        return knowledge or "I do not know: the knowledge base has nothing on this question."
    if not found["classify_fundus"]:
        return "There is no examined photograph in this conversation yet. Please attach a colour fundus photograph."
    parts: list[str] = []
    if intent == "injection":
        parts.append("I report only what the tools found, and I cannot change their results.")
    if intent in ("overview", "injection", "disease"):
        parts += [classifier_sentence(found["classify_fundus"], subject), lesion_sentence(found["segment_lesions"]) if found["segment_lesions"] else "",
                  disc_sentence(found["measure_optic_disc"]), triage_sentence(found["triage_findings"])]
    elif intent == "lesions":
        parts += [lesion_sentence(found["segment_lesions"]) if found["segment_lesions"] else "The lesion segmenter gave no result."]
    elif intent == "disc":
        parts += [disc_sentence(found["measure_optic_disc"]) or "The optic disc could not be measured in this photograph.", knowledge]
    elif intent == "vessels":
        density = found["measure_vessels"].get("vessel_density", {}).get("value")
        parts.append(f"The retinal vessel density is {density:.2f}% of the field of view." if density is not None else "The vessels could not be measured.")
    elif intent in ("urgency", "next_steps"):
        parts.append(triage_sentence(found["triage_findings"]))
        if intent == "next_steps":
            parts.append(knowledge)
    elif intent == "meaning":
        parts.append(knowledge)
    parts.append(NOT_A_DIAGNOSIS)
    return " ".join(p for p in parts if p)


def needed_call(intent: str, messages: list[BaseMessage], tool_names: set[str]) -> dict | None:
    """The tool the question needs that the gates did not run (the LLM's own decision)."""
    _, turn = _this_turn(messages)
    done = {m.name for m in turn if isinstance(m, ToolMessage)}
    if intent == "vessels" and "measure_vessels" in tool_names and "measure_vessels" not in done:
        image_ids = re.findall(r"image_id=(img-[0-9a-f]+)", "\n".join(m.text for m in messages if isinstance(m, HumanMessage)))
        if image_ids:
            return {"name": "measure_vessels", "args": {"image_id": image_ids[-1]}, "id": f"call_{uuid.uuid4().hex[:12]}", "type": "tool_call"}
    return None


class TeacherChatModel(BaseChatModel):
    """Plays the LLM: `intents` maps each question to (intent, subject); records (chat, target) steps."""

    intents: dict[str, tuple[str, str | None]]
    _records: list[dict] = PrivateAttr(default_factory=list)

    @property
    def _llm_type(self) -> str:
        return "ophglm-teacher"

    @property
    def records(self) -> list[dict]:
        return self._records

    def bind_tools(self, tools, *, tool_choice=None, **kwargs):
        return self.bind(tools=[convert_to_openai_tool(t) for t in tools], **kwargs)

    def _generate(self, messages, stop=None, run_manager=None, tools=None, **kwargs) -> ChatResult:
        human, _ = _this_turn(messages)
        intent, subject = self.intents.get(human.additional_kwargs.get("question", human.text), ("knowledge", None))
        names = {t["function"]["name"] for t in tools or []}
        call = needed_call(intent, messages, names)
        message = AIMessage(content="", tool_calls=[call]) if call else AIMessage(content=answer(intent, messages, subject))
        chat = to_chat_dicts(list(messages), [t["function"] for t in tools] if tools else None)
        target = "\n".join(p for p in (message.text, *(render_call(c["name"], c["args"]) for c in message.tool_calls)) if p)
        self._records.append({"chat": chat, "target": target, "intent": intent})
        return ChatResult(generations=[ChatGeneration(message=message)])
