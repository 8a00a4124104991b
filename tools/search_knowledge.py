"""`search_knowledge`: passages from the ophthalmic knowledge base, each with a citation id.

The LLM cites what it was given (`[doc_id#section]`); the grounding step later checks that
every cited id was in fact retrieved this turn.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from ophglm.knowledge.index import KnowledgeIndex
from ophglm.session import Session
from ophglm.settings import Settings
from ophglm.tools.base import Tool, ToolResult


EXCERPT_WORDS = 45


def _excerpt(text: str) -> str:
    words = text.split()
    return " ".join(words[:EXCERPT_WORDS]) + (" ..." if len(words) > EXCERPT_WORDS else "")


class KnowledgeQuery(BaseModel):
    query: str = Field(min_length=2, max_length=500, description="what to look up, in plain words")

    model_config = {"extra": "forbid"}


class SearchKnowledge(Tool):
    name = "search_knowledge"
    description = (
        "Look up ophthalmology background in OphGLM's knowledge base (diseases, signs, tests, "
        "treatments, urgency). Returns short passages, each with a citation id in square brackets to cite."
    )
    inputs = KnowledgeQuery

    def __init__(self, settings: Settings, index: KnowledgeIndex | None = None):
        super().__init__()
        self.settings, self.index = settings, index

    def setup(self) -> None:
        if self.index is None:
            self.index = KnowledgeIndex(self.settings)

    def run(self, inputs: KnowledgeQuery, session: Session) -> ToolResult:
        passages = self.index.search(inputs.query, k=3)
        if not passages:
            return ToolResult(summary=f"The knowledge base has nothing relevant to {inputs.query!r}.", findings={"query": inputs.query, "passages": []})
        # The LLM reads a short excerpt of each passage: on a CPU every prompt token costs
        # (~250 tokens/s prefill for SmolLM2); the person gets the whole passage as a citation.
        text = "\n".join(f"[{p.id}] {p.title} - {p.section}: {_excerpt(p.text)}" for p in passages)
        return ToolResult(summary=text, findings={"query": inputs.query, "passages": [p.id for p in passages]}, citations=[p.citation() for p in passages])
