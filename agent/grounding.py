"""Check an answer against the session's tool results before anyone reads it.

A small LLM invents numbers and citations. Every number in the answer must appear in a
tool result of this conversation (as written, or rounded), and every `[doc#section]`
citation must name a passage that was retrieved; a sentence that fails is removed, and the
reply says so. Disease names are checked against the classifier's findings in a later iteration.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?![\w])")
CITATION = re.compile(r"\[([a-z0-9_]+#[a-z0-9-]+)\]")
SENTENCE = re.compile(r"(?<=[.!?])\s+")


@dataclass
class GroundedAnswer:
    text: str
    removed: list[str] = field(default_factory=list)  # the sentences taken out, with why


def _variants(number: str) -> set[str]:
    """Ways a tool's number may be quoted: as is, rounded, or as a percentage of a probability."""
    value = float(number)
    forms = {number, f"{value:g}"}
    for digits in range(0, 3):
        forms.add(f"{value:.{digits}f}")
    if 0 <= value <= 1:
        forms |= {f"{100 * value:.0f}", f"{100 * value:.1f}"}
    return forms


def supported_numbers(evidence: list[str]) -> set[str]:
    found: set[str] = set()
    for text in evidence:
        for number in NUMBER.findall(text):
            found |= _variants(number)
    return found


def check_answer(answer: str, evidence: list[str], citation_ids: set[str]) -> GroundedAnswer:
    """Drop sentences with numbers or citations that no tool result of this turn supports."""
    allowed = supported_numbers(evidence)
    kept, removed = [], []
    sentences = SENTENCE.split(answer.strip())
    if len(sentences) > 1 and not sentences[-1].rstrip().endswith((".", "!", "?", ")", "]")):
        sentences.pop()  # cut off by the token limit: a half sentence can mislead
    for sentence in sentences:
        bad_numbers = [n for n in NUMBER.findall(sentence) if n not in allowed and f"{float(n):g}" not in allowed]
        bad_citations = [c for c in CITATION.findall(sentence) if c not in citation_ids]
        if bad_numbers or bad_citations:
            why = ", ".join([f"number {n} not in any tool result" for n in bad_numbers] + [f"citation [{c}] was not retrieved" for c in bad_citations])
            removed.append(f"{sentence.strip()} ({why})")
        elif sentence.strip():
            kept.append(sentence.strip())
    return GroundedAnswer(" ".join(kept), removed)
