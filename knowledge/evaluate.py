"""Measured retrieval quality: recall@1/@5, MRR, out-of-scope rejection and query latency.

The question set is JSON lines, `{"question": ..., "relevant": [doc_id, ...]}`; an empty
`relevant` marks an out-of-scope question that should retrieve nothing. Hits are counted
per document (a passage hits when its doc_id is relevant), at the passage's rank. The set
splits in two fixed halves by a hash of each question, so weights tuned on one half can be
checked on the other (benchmarks/retrieval.py --tune); every report shows both halves.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from ophglm.jsonl import read_json_lines
from ophglm.knowledge.lexical import asked_aspects, tokenize

K = 5  # passages retrieved per question: recall@5 is the headline figure
SHOWN = 3  # passages search_knowledge shows the LLM (tools/search_knowledge.py)
HALVES = ("tune", "holdout")
DEFAULT_QUESTIONS = Path(__file__).resolve().parents[1] / "benchmarks" / "retrieval_questions.jsonl"


def load_questions(path: str | Path) -> list[dict]:
    return read_json_lines(path, lambda item: {"question": str(item["question"]), "relevant": [str(d) for d in item["relevant"]]},
                           '{"question": ..., "relevant": [...]}', "questions")


def half(question: str) -> str:
    """The fixed half a question belongs to (a hash, so adding questions moves no others)."""
    return HALVES[hashlib.sha256(question.encode("utf-8")).digest()[0] % 2]


def summarize(questions: list[dict], retrieved: list[list[str]], latencies_ms: list[float] | None = None) -> dict:
    """Metrics for retrieved doc_ids (best first, one per passage) against the questions."""
    hits1 = hits5 = reciprocal = rejected = 0
    in_scope = [q for q in questions if q["relevant"]]
    misses = []
    for q, docs in zip(questions, retrieved):
        if not q["relevant"]:
            rejected += not docs
            if docs:
                misses.append({"question": q["question"], "relevant": [], "retrieved": docs})
            continue
        rank = next((i for i, d in enumerate(docs[:K], 1) if d in q["relevant"]), None)
        hits1 += rank == 1
        hits5 += rank is not None
        reciprocal += 1 / rank if rank else 0.0
        if rank is None:
            misses.append({"question": q["question"], "relevant": q["relevant"], "retrieved": docs})
    n, off = len(in_scope), len(questions) - len(in_scope)
    report = {
        "questions": len(questions),
        "in_scope": n,
        "out_of_scope": off,
        "recall@1": hits1 / n if n else None,
        "recall@5": hits5 / n if n else None,
        "mrr": reciprocal / n if n else None,
        "oos_rejection": rejected / off if off else None,
    }
    if latencies_ms:
        report["latency_ms_p50"] = float(np.percentile(latencies_ms, 50))
        report["latency_ms_p95"] = float(np.percentile(latencies_ms, 95))
    report["misses"] = misses
    return report


def evaluate_retrieval(index, questions_path: str | Path = DEFAULT_QUESTIONS) -> dict:
    """Runs every question through `index.search` (k=5) and reports the whole set and each half.

    The index is built and warmed up first, so latency is per query, not model loading.
    """
    questions = load_questions(questions_path)
    index.search(questions[0]["question"], k=K)
    retrieved, latencies, asked, answered = [], [], 0, 0
    for q in questions:
        start = time.perf_counter()
        passages = index.search(q["question"], k=K)
        latencies.append((time.perf_counter() - start) * 1000)
        retrieved.append([p.doc_id for p in passages])
        # A question whose words name an aspect ("how is it treated") should see that section of a relevant
        # document among the passages search_knowledge shows the LLM.
        if aspects := q["relevant"] and asked_aspects(tokenize(q["question"])):
            asked += 1
            answered += any(p.doc_id in q["relevant"] and p.section in aspects for p in passages[:SHOWN])
    report = summarize_with_halves(questions, retrieved, latencies)
    report["aspect_questions"], report["aspect_section_shown"] = asked, answered / asked if asked else None
    return report


def summarize_with_halves(questions: list[dict], retrieved: list[list[str]], latencies_ms: list[float] | None = None) -> dict:
    """`summarize` for the whole set, with the same figures for each half under "halves"."""
    report = summarize(questions, retrieved, latencies_ms)
    report["halves"] = {}
    for name in HALVES:
        picked = [i for i, q in enumerate(questions) if half(q["question"]) == name]
        part = summarize([questions[i] for i in picked], [retrieved[i] for i in picked], [latencies_ms[i] for i in picked] if latencies_ms else None)
        part.pop("misses")
        report["halves"][name] = part
    return report


def format_report(report: dict) -> str:
    columns = [("whole set", report), *((f"{n} half", report["halves"][n]) for n in HALVES if n in report.get("halves", {}))]
    rows = [("questions", "questions", "{:d}"), ("in scope", "in_scope", "{:d}"), ("out of scope", "out_of_scope", "{:d}"),
            ("recall@1", "recall@1", "{:.3f}"), ("recall@5", "recall@5", "{:.3f}"), ("MRR", "mrr", "{:.3f}"),
            ("out-of-scope rejection", "oos_rejection", "{:.3f}"), (f"asked-for section in top {SHOWN}", "aspect_section_shown", "{:.3f}"), ("latency p50 (ms)", "latency_ms_p50", "{:.1f}"),
            ("latency p95 (ms)", "latency_ms_p95", "{:.1f}")]
    width = max(len(label) for label, _, _ in rows) + 2
    lines = ["".ljust(width) + "".join(name.rjust(12) for name, _ in columns)]
    for label, key, fmt in rows:
        cells = [fmt.format(part[key]) if part.get(key) is not None else "-" for _, part in columns]
        lines.append(label.ljust(width) + "".join(c.rjust(12) for c in cells))
    for miss in report.get("misses", []):
        lines.append(f"miss: {miss['question']!r} wanted {miss['relevant'] or 'nothing'}, got {miss['retrieved'][:3] or 'nothing'}")
    return "\n".join(lines)


def cmd_eval_retrieval(args) -> None:
    from ophglm.knowledge.index import KnowledgeIndex
    from ophglm.settings import load_settings

    if not args.questions:
        raise ValueError("--questions FILE is required (no benchmarks/retrieval_questions.jsonl beside this install)")
    report = evaluate_retrieval(KnowledgeIndex(load_settings(getattr(args, "config", None))), args.questions)
    print(json.dumps(report, indent=2) if args.json else format_report(report))


def add_eval_retrieval_parser(eval_subparsers) -> None:
    """Registers `retrieval` under an `eval` sub-command (`ophglm eval retrieval`)."""
    p = eval_subparsers.add_parser("retrieval", help="recall@1/@5, MRR, out-of-scope rejection and latency of knowledge search")
    default = str(DEFAULT_QUESTIONS) if DEFAULT_QUESTIONS.is_file() else None
    p.add_argument("--questions", metavar="FILE", default=default, help=f"JSON lines of {{question, relevant}} (default: {default or 'none'})")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_eval_retrieval)
