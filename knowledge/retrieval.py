"""Hybrid retrieval: dense MiniLM fused with BM25 and aliases, and a "nothing relevant" gate.

Each side fails differently: MiniLM understands lay wording ("a curtain came down over my
sight") but not abbreviations, misspellings or eponyms; BM25 and the alias table catch
"CRVO", "glacoma" and "Hollenhorst" but not paraphrase. `Signals` holds what both sides
measured for one question; `Fusion` turns them into a ranking and a relevance decision.
Keeping the two apart lets the benchmark tune the fusion on stored signals without
re-running the model (benchmarks/retrieval.py --tune).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ophglm.knowledge.corpus import Chunk
from ophglm.knowledge.lexical import LexicalIndex


@dataclass(frozen=True)
class Fusion:
    """How the signals combine. lexical_weight, min_dense and min_jargon_coverage were tuned
    on the tune half of benchmarks/retrieval_questions.jsonl (benchmarks/retrieval.py --tune)."""

    # BM25 relative to the best BM25 chunk, added to the cosine. (A further bonus for the
    # chunks of a document whose alias the question names was tried and tuned to zero: the
    # alias already reaches the ranking through the dense text and the chunks' BM25 text.)
    lexical_weight: float = 0.3
    # At most this many passages from one document, so a question that one document
    # dominates still shows the runner-up documents. Not tuned: one per document scores a
    # shade higher on the doc-level benchmark (one question in 154 on the tune half), but
    # two let an answer cite, say, both the symptoms and the treatment of the leading topic.
    max_per_doc: int = 2
    # Added to the sections whose aspect the question's cue words name ("treatment",
    # "symptoms"): enough to reorder the sections of one document, too little to move
    # documents much (it costs one question's recall@1 on the tune half). Not tuned: the
    # question set judges documents, not sections.
    aspect_bonus: float = 0.05
    # The relevance gate. A question is in scope if it names an alias, or its best dense
    # match is close, or it names a term of art that one chunk explains together with most
    # of the rest of the question (eponyms like "Hollenhorst plaque" that MiniLM reads as noise).
    min_dense: float = 0.45
    min_jargon_coverage: float = 0.6


@dataclass
class Signals:
    """What the dense and lexical sides measured for one question, before fusion."""

    dense: dict[str, float]  # cosine of the nearest chunks, by chunk id
    lexical: np.ndarray  # BM25 of every chunk, in corpus order
    alias_docs: set[str]
    coverage: float
    jargon: bool
    aspects: set[str]

    @property
    def best_dense(self) -> float:
        return max(self.dense.values(), default=0.0)


class HybridRetriever:
    def __init__(self, chunks: list[Chunk], dense: Callable[[str], dict[str, float]], fusion: Fusion | None = None):
        self.chunks = chunks
        self.dense = dense
        self.fusion = fusion or Fusion()
        self.lexical = LexicalIndex(chunks)

    def signals(self, query: str) -> Signals:
        read = self.lexical.read(query)
        # Name what an abbreviation or misspelling stands for, so MiniLM sees real words.
        titles = sorted({self.lexical.aliases.titles[d] for d in read.alias_docs})
        dense = self.dense(" ".join([query, *read.repaired, *titles]))
        return Signals(dense, self.lexical.scores(read.tokens), read.alias_docs, read.coverage, read.jargon, read.aspects)

    def relevant(self, s: Signals, fusion: Fusion | None = None) -> bool:
        f = fusion or self.fusion
        return bool(s.alias_docs or s.best_dense >= f.min_dense or (s.jargon and s.coverage >= f.min_jargon_coverage))

    def scores(self, s: Signals, fusion: Fusion | None = None) -> np.ndarray:
        f = fusion or self.fusion
        floor = min(s.dense.values(), default=0.0)  # chunks beyond the dense candidates rank below them
        dense = np.array([s.dense.get(c.id, floor) for c in self.chunks], dtype=np.float32)
        top = float(s.lexical.max()) if len(s.lexical) else 0.0
        lexical = s.lexical / top if top > 0 else np.zeros_like(dense)
        aspect = np.array([c.section in s.aspects for c in self.chunks], dtype=np.float32)
        return dense + f.lexical_weight * lexical + f.aspect_bonus * aspect

    def rank(self, s: Signals, k: int, fusion: Fusion | None = None) -> list[tuple[int, float]]:
        """(chunk index, fused score) of the best k chunks, or [] when nothing is relevant."""
        return self.order(s, k, fusion) if self.relevant(s, fusion) else []

    def order(self, s: Signals, k: int, fusion: Fusion | None = None) -> list[tuple[int, float]]:
        """The best k chunks by fused score, at most `max_per_doc` from one document."""
        f = fusion or self.fusion
        scores = self.scores(s, f)
        if s.aspects:
            # The section a question asks for ("how is wet AMD treated") joins its document's best
            # chunk: the aspect bonus alone could not lift it past sections that repeat the
            # document's name, and documents keep their order (their best chunk's score is unchanged).
            best = {}
            for i, chunk in enumerate(self.chunks):
                best[chunk.doc_id] = max(best.get(chunk.doc_id, -np.inf), scores[i])
            for i, chunk in enumerate(self.chunks):
                if chunk.section in s.aspects:
                    scores[i] = max(scores[i], best[chunk.doc_id] - 1e-4)
        picked, per_doc = [], Counter()
        for i in np.argsort(-scores, kind="stable"):
            doc = self.chunks[i].doc_id
            if per_doc[doc] < f.max_per_doc:
                per_doc[doc] += 1
                picked.append((int(i), float(scores[i])))
                if len(picked) == k:
                    break
        return picked
