"""The reply record: the checked answer, and who wrote or did each part of it.

Every tool call is marked `pipeline` (the examination, a router) or `model` (the LLM's own
choice). The answer is a list of parts, each marked `model` (the LLM's sentence, kept by the
grounding check), `removed` (the LLM's sentence the check took out, with why; not in the
answer) or `added` (the code's: the findings statement, fallback text, the asked-for
measurement, sources, urgency line, disclaimer). `fallback` says nothing of the model's
answer survived. Evaluations read these marks, so what the model adds can be told apart from
what the code around it writes.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from ophglm import DISCLAIMER
from ophglm.agent.examination import EXAMINE, MODEL, QUALITY_GATE, TRIAGE, Examination, Step
from ophglm.agent.grounding import CITATION, NUMBER, check_answer, named_diseases
from ophglm.agent.triage import Triage
from ophglm.knowledge.lexical import best_sentences

NOT_A_DIAGNOSIS = "This is not a diagnosis: have an eye-care professional review the photograph."
REMOVED_NOTE = "(Some statements were removed because no tool result supported them.)"
ADDED, REMOVED = "added", "removed"


@dataclass
class ToolCallRecord:
    name: str
    args: dict
    ok: bool
    summary: str
    seconds: float = 0.0
    by: str = MODEL  # "pipeline" (the examination or a router) or "model" (the LLM chose it)


@dataclass
class AnswerPart:
    text: str
    source: str  # "model", "removed" or "added"
    why: str = ""


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
    parts: list[AnswerPart] = field(default_factory=list)
    fallback: bool = False  # the model was asked, and none of its sentences survived the check
    # Wall-clock seconds: the whole turn, the LLM's own calls, each tool call (in ToolCallRecord).
    timings: dict[str, float] = field(default_factory=dict)
    disclaimer: str = DISCLAIMER

    def to_dict(self) -> dict:
        return asdict(self)

    def model_text(self) -> str:
        """The model's own sentences that survived the check."""
        return " ".join(p.text for p in self.parts if p.source == MODEL)


@dataclass
class Turn:
    """What the reply is composed from (collected by the Assistant)."""
    question: str
    steps: list[Step]
    model_answer: str | None  # None: the model was not asked (a pipeline refusal)
    refusal: str
    evidence: list[str]  # every tool result of the conversation
    retrieved: dict[str, dict]  # every passage retrieved in the conversation, by id
    probabilities: dict[str, float]
    urgency: Triage | None
    examined: Examination | None  # this turn's accepted examination, else the conversation's latest
    examined_now: bool
    tool_descriptions: tuple[str, ...] = ()


def compose(turn: Turn) -> Reply:
    reply = Reply(answer="")
    for step in turn.steps:
        reply.tool_calls.append(ToolCallRecord(step.name, step.args, step.ok, step.summary, step.seconds, step.by))
        if not step.ok:
            reply.notes.append(f"{step.name} failed: {step.summary}")
            continue
        if step.findings:
            reply.findings[step.name] = step.findings
        reply.citations += [c for c in step.citations if c["id"] not in {x["id"] for x in reply.citations}]
        reply.artifacts += step.artifacts
    if turn.refusal:
        reply.refused, reply.refusal_reason = True, turn.refusal
        reply.parts = [AnswerPart(turn.refusal, ADDED)]
        reply.answer = turn.refusal
        return reply
    passages = {pid: c.get("text", "") for pid, c in turn.retrieved.items()}
    level = turn.urgency.level if turn.urgency else None
    counts = turn.examined.lesions.counts if turn.examined and turn.examined.lesions else None
    grounded = check_answer(turn.model_answer or "", turn.evidence, passages, turn.probabilities, checks_urgency=True,
                            urgency=level, tool_descriptions=turn.tool_descriptions, lesion_counts=counts)
    parts = [AnswerPart(s, REMOVED, why) if why else AnswerPart(s, MODEL) for s, why in grounded.verdicts]
    kept = [p for p in parts if p.source == MODEL]
    reply.fallback = not kept
    reply.notes += [f"removed an unsupported statement: {r}" for r in grounded.removed]
    added: list[str] = []
    examined = turn.examined
    if examined is not None and (turn.examined_now or not kept):
        # The findings lead: the model's sentences must name the classifier's finding, or the code states it.
        named = {d for p in kept for d in named_diseases(p.text)}
        if examined.classifier and examined.classifier.most_likely not in named:
            added.append(examined.statement())
    if not kept and examined is None:
        found = [s.summary for s in turn.steps if s.ok and s.name not in ("search_knowledge", QUALITY_GATE, TRIAGE)]
        quoted = [] if found else best_sentences(turn.question, [(c["id"], c.get("text", "")) for c in reply.citations])
        added.append(("What the tools found: " + " ".join(found)) if found else
                     ("What the knowledge base says: " + " ".join(f"{s[:-1]} [{pid}]{s[-1]}" for pid, s in quoted)) if quoted else
                     "I could not produce an answer supported by the tool results.")
    text = " ".join(p.text for p in kept)
    # A measurement beyond the examination (the vessels, a plug-in's), run for this question by a router or the model,
    # answers it even where the model did not quote its figures.
    for step in turn.steps:
        figures = set(NUMBER.findall(step.summary))
        if (step.ok and step.name not in (*EXAMINE, QUALITY_GATE, TRIAGE, "search_knowledge") and figures
                and not figures & set(NUMBER.findall(" ".join([text, *added])))):
            added.append(step.summary)
    if grounded.removed:
        added.append(REMOVED_NOTE)
    answer = " ".join([text, *added]).strip()
    # A follow-up may cite a passage an earlier turn retrieved: the reply carries its text too.
    reply.citations += [turn.retrieved[pid] for pid in dict.fromkeys(CITATION.findall(answer))
                        if pid in turn.retrieved and pid not in {c["id"] for c in reply.citations}]
    if reply.citations and not any(f"[{c['id']}]" in answer for c in reply.citations):
        added.append("Sources: " + ", ".join(f"[{c['id']}]" for c in reply.citations[:3]) + ".")
    if not reply.citations and "search_knowledge" in reply.findings:
        added.append("The knowledge base does not cover this question.")
    reply.triage = turn.urgency
    if examined is not None and turn.urgency is not None:
        # An answer about a photograph is read on its own (an API client may show only this field).
        stated = re.search(rf"urgen\w*\W+(?:is\W+)?{turn.urgency.level}\b", " ".join([text, *added]).lower())
        if not stated:
            added.append(f"Urgency: {turn.urgency.level} — {turn.urgency.reason}.")
        if "not a diagnosis" not in " ".join([text, *added]).lower():
            added.append(NOT_A_DIAGNOSIS)
    reply.parts = parts + [AnswerPart(a, ADDED) for a in added]
    reply.answer = " ".join([text, *added]).strip()
    return reply
