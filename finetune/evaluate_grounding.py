"""`ophglm eval grounding`: the grounding check alone, on sentences labelled keep / remove by hand.

Each set holds sentences a small model might write, each with the verdict the labelling
policy gives, written without reading the check's code, against the recorded contexts of
`benchmarks/grounding_contexts.json` (real tool outputs and retrieved passages). The check
sees exactly what it sees in a turn: the sentence, the context's tool results, passages,
classifier probabilities and urgency. Two sets, by two authors: the development set, whose
disagreements the check's rules were fixed against, and the held-out set, written after the
rules were frozen and never used to change them. Figures: precision and recall of removal
for each set, and per category and language.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from ophglm.jsonl import read_json_lines

SENTENCES = Path("benchmarks/grounding_sentences.jsonl")
HELD_OUT = Path("benchmarks/grounding_sentences_holdout.jsonl")
CONTEXTS = Path("benchmarks/grounding_contexts.json")


def tool_descriptions() -> tuple[str, ...]:
    """What the tools tell the LLM about themselves (a copied description is no finding)."""
    from ophglm.agent.triage import TriageFindings
    from ophglm.settings import load_settings
    from ophglm.tools.registry import builtin_tools

    return tuple(t.description for t in [*builtin_tools(load_settings(None)), TriageFindings()])


def _labelled(row: dict) -> dict:
    if row["verdict"] not in ("keep", "remove") or not isinstance(row["sentence"], str) or not row["context"]:
        raise TypeError("a labelled sentence needs a context, a sentence and a verdict of keep or remove")
    return row


def judge(rows: list[dict], contexts: dict, descriptions: tuple[str, ...]) -> list[dict]:
    """Each row with the check's verdict and, when it removed the sentence, why."""
    from ophglm.agent.grounding import check_answer

    judged = []
    for row in rows:
        context = contexts[row["context"]]
        result = check_answer(row["sentence"], context["evidence"], context["passages"], context["probabilities"],
                              checks_urgency=True, urgency=context["urgency"], tool_descriptions=descriptions,
                              lesion_counts=context.get("lesion_counts"))
        judged.append({**row, "check": "remove" if result.removed else "keep",
                       "check_why": "; ".join(why for _, why in result.removed_with_why)})
    return judged


def removal_scores(judged: list[dict]) -> dict:
    tp = sum(r["check"] == "remove" and r["verdict"] == "remove" for r in judged)
    fp = sum(r["check"] == "remove" and r["verdict"] == "keep" for r in judged)
    fn = sum(r["check"] == "keep" and r["verdict"] == "remove" for r in judged)
    return {"sentences": len(judged), "precision": round(tp / (tp + fp), 3) if tp + fp else None,
            "recall": round(tp / (tp + fn), 3) if tp + fn else None, "wrongly_removed": fp, "missed": fn}


def evaluate_grounding(sentences: Path = SENTENCES, contexts: Path = CONTEXTS) -> dict:
    rows = read_json_lines(sentences, _labelled, '{"id", "context", "sentence", "verdict": "keep"|"remove", ...}',
                          "labelled sentences")
    context_table = json.loads(contexts.read_text(encoding="utf-8"))["contexts"]
    if unknown := {r["context"] for r in rows} - set(context_table):
        raise ValueError(f"{sentences} names contexts that {contexts} lacks: {', '.join(sorted(unknown))}")
    judged = judge(rows, context_table, tool_descriptions())
    groups: dict[str, dict[str, list]] = {"category": defaultdict(list), "lang": defaultdict(list)}
    for row in judged:
        groups["category"][row["category"]].append(row)
        groups["lang"][row["lang"]].append(row)
    return {"all": removal_scores(judged),
            **{name: {key: removal_scores(rows) for key, rows in sorted(group.items())} for name, group in groups.items()},
            "errors": [{k: r[k] for k in ("id", "context", "sentence", "verdict", "check", "check_why")}
                       for r in judged if r["check"] != r["verdict"]]}


def cmd_eval_grounding(args) -> None:
    sets = {Path(f).stem.removeprefix("grounding_sentences").strip("_") or "development": Path(f) for f in args.sentences}
    reports = {name: evaluate_grounding(path, Path(args.contexts)) for name, path in sets.items() if path.is_file()}
    if not reports:
        raise FileNotFoundError(f"no labelled sentences at {', '.join(args.sentences)}")
    if args.json:
        print(json.dumps(reports, indent=2, ensure_ascii=False))
        return
    for name, report in reports.items():
        _print_report(name, report, args.show)


def _print_report(name: str, report: dict, show: int) -> None:
    print(f"{name + ' set':24}{'n':>5}{'precision':>11}{'recall':>8}")
    rows = [("all", report["all"])] + [(f"{group} {key}", s) for group in ("category", "lang") for key, s in report[group].items()]
    for row, s in rows:
        print(f"{row:24}{s['sentences']:>5}{s['precision'] if s['precision'] is not None else '-':>11}{s['recall'] if s['recall'] is not None else '-':>8}")
    print(f"disagreements: {len(report['errors'])}")
    for error in report["errors"][:show]:
        print(f"  {error['id']} [{error['context']}] labelled {error['verdict']}, check says {error['check']}: {error['sentence']}"
              + (f" ({error['check_why']})" if error["check_why"] else ""))


def add_eval_grounding_parser(eval_subparsers) -> None:
    p = eval_subparsers.add_parser("grounding", help="precision and recall of the grounding check's removals on hand-labelled sentences")
    p.add_argument("--sentences", nargs="+", default=[str(SENTENCES), str(HELD_OUT)], help="labelled sets (JSON lines)")
    p.add_argument("--contexts", default=str(CONTEXTS))
    p.add_argument("--show", type=int, default=10, help="how many disagreements to print per set")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval_grounding)
