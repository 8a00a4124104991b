"""`ophglm eval agent --scenarios FILE --data DIR [--json]`: the whole assistant, scenario by scenario.

Each scenario is a conversation played through a fresh `Assistant` with the configured chat
model and the real tools; `expect` is checked on the last turn's reply record (the same
record `ophglm ask --json` prints). Figures: tool-selection precision/recall/F1 (sets of tool
names, micro-averaged), argument validity (share of tool calls whose arguments were
accepted, unusable model calls counted as invalid), groundedness (share of the answer's
numbers and disease names that this conversation's tool results or cited passages support; a
number counts only as a figure of the quantity its clause names), triage and refusal accuracy,
fact recall (expected words found in the answer), and p50/p95 turn latency.
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from ophglm.agent.grounding import (DISEASE_NAMES, NUMBER, SENTENCE, classifier_supports, named_diseases, supported_numbers,
                                    unsupported_numbers)
from ophglm.tools.classify_fundus import probabilities_of

GENERATED = re.compile(r"^generated:non_fundus:(\d+)$")


@lru_cache(maxsize=1)
def _non_fundus(count: int = 64) -> list[Image.Image]:
    from ophglm.tools.non_fundus import non_fundus_images

    return [image for _, image in non_fundus_images(count, seed=11)]


def load_image(ref: str, root: Path) -> Image.Image | Path:
    if match := GENERATED.match(ref):
        return _non_fundus()[int(match.group(1)) % 64]
    path = root / ref
    if not path.is_file():
        raise FileNotFoundError(f"scenario image not found: {path}")
    return path


def groundedness(record: dict, evidence: list[str], cited_text: str, classified: dict | None = None) -> tuple[int, int]:
    """(supported, total) numbers and disease names in the answer.

    Evidence is every tool result of the conversation and the passages the answer cites (a
    number quoted from a cited passage is grounded in it); `classified` is the conversation's
    latest classifier findings, which a follow-up's answer (and its triage reason) rests on.
    """
    answer = record["answer"]
    allowed = supported_numbers([*evidence, cited_text])
    classified = classified or record["findings"].get("classify_fundus", {})
    probabilities = probabilities_of(classified)
    supported = total = 0
    for sentence in SENTENCE.split(answer):
        numbers = len(NUMBER.findall(sentence))
        total += numbers
        supported += numbers - len(unsupported_numbers(sentence, allowed))
        for disease in named_diseases(sentence):
            if disease == "normal":
                continue
            total += 1
            # Supported: the classifier backs it (the check's own rule), or a passage the answer cites discusses it.
            supported += classifier_supports(sentence, probabilities.get(disease)) or any(n in cited_text for n in DISEASE_NAMES[disease])
    return supported, total


@dataclass
class Tally:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    args_ok: int = 0
    args_total: int = 0
    grounded: int = 0
    grounded_total: int = 0
    triage_right: int = 0
    triage_total: int = 0
    refusal_right: int = 0
    refusal_total: int = 0
    image_refusal_right: int = 0
    image_refusal_total: int = 0
    facts_found: int = 0
    facts_total: int = 0
    latencies: list[float] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 3) if b else None


def score(scenario: dict, replies: list[dict], tally: Tally) -> list[str]:
    """Add one scenario's outcome to the tally; the list of what went wrong."""
    expect, last = scenario["expect"], replies[-1]
    problems = []
    called, wanted = {c["name"] for c in last["tool_calls"]}, set(expect.get("tools", []))
    tally.tp, tally.fp, tally.fn = tally.tp + len(called & wanted), tally.fp + len(called - wanted), tally.fn + len(wanted - called)
    if called != wanted:
        problems.append(f"tools {sorted(called)} != {sorted(wanted)}")
    for reply in replies:
        calls = reply["tool_calls"]
        tally.args_total += len(calls) + sum("unusable tool call" in n for n in reply["notes"])
        tally.args_ok += sum("invalid arguments" not in c["summary"] for c in calls)
    evidence = [c["summary"] for r in replies for c in r["tool_calls"] if c["ok"]]
    cited = " ".join(c.get("text", "") for c in last["citations"] if f"[{c['id']}]" in last["answer"]).lower()
    classified = next((r["findings"]["classify_fundus"] for r in reversed(replies) if "classify_fundus" in r["findings"]), None)
    supported, total = groundedness(last, evidence, cited, classified)
    tally.grounded, tally.grounded_total = tally.grounded + supported, tally.grounded_total + total
    if supported < total:
        problems.append(f"ungrounded: {total - supported} of {total} numbers/diseases")
    if "triage" in expect:
        level = (last["triage"] or {}).get("level")
        tally.triage_total += 1
        tally.triage_right += level == expect["triage"]
        if level != expect["triage"]:
            problems.append(f"triage {level} != {expect['triage']}")
    if "refusal" in expect:
        right = last["refused"] == expect["refusal"]
        tally.refusal_total += 1
        tally.refusal_right += right
        if any(GENERATED.match(t["image"] or "") for t in scenario["turns"]):
            tally.image_refusal_total += 1
            tally.image_refusal_right += right
        if not right:
            problems.append(f"refused={last['refused']} expected {expect['refusal']}")
    answer = last["answer"].lower()
    missing = [f for f in expect.get("facts", []) if f.lower() not in answer]
    tally.facts_total += len(expect.get("facts", []))
    tally.facts_found += len(expect.get("facts", [])) - len(missing)
    if missing:
        problems.append(f"facts missing: {missing}")
    return problems


def evaluate_agent(scenarios_path: Path, root: Path, settings=None, chat_model=None, limit: int = 0) -> dict:
    from ophglm.agent.assistant import Assistant
    from ophglm.agent.chat_models import make_chat_model
    from ophglm.settings import load_settings
    from ophglm.tools.registry import load_tools

    settings = settings or load_settings(None)
    scenarios = [json.loads(line) for line in scenarios_path.read_text().splitlines() if line.strip()]
    scenarios = scenarios[:limit] if limit else scenarios
    tools = load_tools(settings)
    model = chat_model if chat_model is not None else make_chat_model(settings)
    tally = Tally()
    for scenario in tqdm(scenarios, desc="scenarios", unit="scenario"):
        assistant = Assistant(settings, chat_model=model, tools=tools)
        replies = []
        for turn in scenario["turns"]:
            image = load_image(turn["image"], root) if turn.get("image") else None
            reply = assistant.ask(turn["user"], image=image).to_dict()
            tally.latencies.append(reply["timings"]["turn_s"])
            replies.append(reply)
        if problems := score(scenario, replies, tally):
            tally.failures.append({"id": scenario["id"], "problems": problems, "answer": replies[-1]["answer"][:400]})
    precision, recall = _ratio(tally.tp, tally.tp + tally.fp), _ratio(tally.tp, tally.tp + tally.fn)
    f1 = round(2 * precision * recall / (precision + recall), 3) if precision and recall else 0.0
    latencies = sorted(tally.latencies)
    return {
        "scenarios": len(scenarios), "turns": len(latencies),
        "llm": {"backend": settings.llm_backend, "model": settings.llm_model, "adapter": settings.resolved_llm_adapter(), "fusion": settings.resolved_fusion()},
        "tool_selection": {"precision": precision, "recall": recall, "f1": f1},
        "argument_validity": _ratio(tally.args_ok, tally.args_total), "groundedness": _ratio(tally.grounded, tally.grounded_total),
        "triage_accuracy": _ratio(tally.triage_right, tally.triage_total), "triage_checked": tally.triage_total,
        "refusal_accuracy": _ratio(tally.refusal_right, tally.refusal_total),
        "refusal_accuracy_non_fundus_images": _ratio(tally.image_refusal_right, tally.image_refusal_total),
        "fact_recall": _ratio(tally.facts_found, tally.facts_total),
        "latency_s": {"p50": round(statistics.median(latencies), 2), "p95": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 2)} if latencies else {},
        "failures": tally.failures,
    }


def cmd_eval_agent(args) -> None:
    report = evaluate_agent(Path(args.scenarios), Path(args.data), limit=args.limit)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for key, value in report.items():
        if key != "failures":
            print(f"{key}: {value}")
    print(f"failures: {len(report['failures'])} scenario(s)")
    for failure in report["failures"][:15]:
        print(f"  {failure['id']}: {'; '.join(failure['problems'])}")


def add_eval_agent_parser(eval_subparsers) -> None:
    p = eval_subparsers.add_parser("agent", help="tool selection, groundedness, triage, refusals and latency over scenarios")
    p.add_argument("--scenarios", default="benchmarks/agent_scenarios.jsonl")
    p.add_argument("--data", required=True, help="the folder scenario image paths are relative to")
    p.add_argument("--limit", type=int, default=0, help="only the first N scenarios")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval_agent)
