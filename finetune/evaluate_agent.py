"""`ophglm eval agent`: what the LLM adds, measured beside a null model on hand-written scenarios.

Every scenario is played twice through a fresh `Assistant` with the real tools: once with the
chosen chat model, once with the null model (answers nothing, calls nothing). Every figure is
printed for both and their difference, the lift, so what the code around the LLM does (the
examination pipeline, the routers, the sentences the code adds) cancels out. Figures read the
reply record's marks (reply.py), never the grounding check's functions:
- tool selection P/R/F1: the model's own calls against the tools the scenario needs beyond the
  pipeline (a tool a router already ran in that turn is not the model's to call);
- fact recall and "addresses the question": in the model's own surviving sentences only;
- fallback rate (nothing of the model's answer survived), share of the model's sentences removed;
- number support: numbers in the model's surviving sentences found among the tools' structured
  findings or the cited passages (its own rule, not the check's);
- language match: the model's surviving sentences written in the scenario's language;
- triage and refusal accuracy (only scenarios with an expected level / refusal), p50/p95 latency.
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

from ophglm.finetune.answer_lexicon import in_language, names_finding, numbers_in, quotes_number
from ophglm.jsonl import read_json_lines

GENERATED = re.compile(r"^generated:non_fundus:(\d+)$")
# Figures counted per scenario (hits / total), printed in this order.
COUNTED = ("fact_recall", "addresses_question", "fallback_rate", "removed_share", "language_match", "triage_accuracy", "refusal_accuracy")


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


def _scenario(item: dict) -> dict:
    if not (item["turns"] and all(isinstance(t["user"], str) for t in item["turns"]) and isinstance(item["expect"], dict)):
        raise TypeError("a scenario needs turns with a user question each, and expect")
    return item


def load_scenarios(path: Path) -> list[dict]:
    return read_json_lines(path, _scenario, '{"id", "turns": [{"user", "image"}], "expect": {...}}', "scenarios")


@dataclass
class Tally:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    args_ok: int = 0
    args_total: int = 0
    numbers_supported: int = 0
    numbers_total: int = 0
    counts: dict[str, list[int]] = field(default_factory=dict)  # figure -> [hits, total]
    latencies: list[float] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)

    def add(self, figure: str, hits: int | bool, total: int = 1) -> None:
        entry = self.counts.setdefault(figure, [0, 0])
        entry[0] += int(hits)
        entry[1] += total


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 3) if b else None


def _findings_numbers(replies: list[dict]) -> set[float]:
    """Every number of the conversation's structured findings (JSON values, not summaries)."""
    found: set[float] = set()

    def walk(value):
        if isinstance(value, bool):
            return
        if isinstance(value, (int, float)):
            found.add(float(value))
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
    for reply in replies:
        walk(reply["findings"])
    return found


def _latest(replies: list[dict], tool: str) -> dict:
    return next((r["findings"][tool] for r in reversed(replies) if tool in r["findings"]), {})


def addresses(target: str, text: str, replies: list[dict]) -> bool:
    """Whether the model's own text holds what the question asked for (the scenario names it)."""
    kind, _, value = target.partition(":")
    if kind == "words":
        return any(w.lower() in text.lower() for w in value.split("|"))
    if value == "most_likely":
        top = _latest(replies, "classify_fundus").get("most_likely")
        return bool(top) and names_finding(text, top)
    if value == "urgency":
        level = next((r["triage"]["level"] for r in reversed(replies) if r.get("triage")), None)
        return bool(level) and names_finding(text, f"urgency:{level}")
    if value == "vessel_density":
        density = _latest(replies, "measure_vessels").get("vessel_density", {}).get("value")
        return density is not None and quotes_number(text, density)
    if value == "cdr":
        cdr = _latest(replies, "measure_optic_disc").get("vertical_cdr", {}).get("value")
        return cdr is not None and quotes_number(text, cdr)
    if value == "lesions":
        counts = [v["count"]["value"] for v in _latest(replies, "segment_lesions").get("lesions", {}).values()]
        if counts and not any(counts):
            return names_finding(text, "none_found")
        return any(quotes_number(text, n) for n in counts if n)
    raise ValueError(f"unknown 'addresses' target {target!r}")


def score(scenario: dict, replies: list[dict], tally: Tally) -> list[str]:
    """Add one scenario's outcome (its last turn) to the tally; the list of what went wrong."""
    expect, last, problems = scenario["expect"], replies[-1], []
    lang = scenario.get("lang", "en")
    model_calls = {c["name"] for c in last["tool_calls"] if c["by"] == "model"}
    routed = {c["name"] for c in last["tool_calls"] if c["by"] == "pipeline"}
    needed = set(expect.get("tools", []))
    owned = needed - routed
    tally.tp, tally.fn = tally.tp + len(model_calls & owned), tally.fn + len(owned - model_calls)
    tally.fp += len(model_calls - needed)
    if model_calls & owned != owned or model_calls - needed:
        problems.append(f"model called {sorted(model_calls)}, owned {sorted(owned)}")
    for reply in replies:
        mine = [c for c in reply["tool_calls"] if c["by"] == "model"]
        tally.args_total += len(mine) + sum("unusable tool call" in n for n in reply["notes"])
        tally.args_ok += sum("invalid arguments" not in c["summary"] for c in mine)
    own = " ".join(p["text"] for p in last["parts"] if p["source"] == "model")
    said = [p for p in last["parts"] if p["source"] in ("model", "removed")]
    if said:  # one entry per sentence the model wrote
        tally.add("removed_share", sum(p["source"] == "removed" for p in said), len(said))
    if "refusal" in expect:
        tally.add("refusal_accuracy", last["refused"] == expect["refusal"])
        if last["refused"] != expect["refusal"]:
            problems.append(f"refused={last['refused']} expected {expect['refusal']}")
    if last["refused"]:
        return problems
    tally.add("fallback_rate", last["fallback"])
    if expect.get("triage"):
        level = (last["triage"] or {}).get("level")
        tally.add("triage_accuracy", level == expect["triage"])
        if level != expect["triage"]:
            problems.append(f"triage {level} != {expect['triage']}")
    for fact in expect.get("facts", []):
        options = [fact] if isinstance(fact, str) else fact
        found = any(o.lower() in own.lower() for o in options)
        tally.add("fact_recall", found)
        if not found:
            problems.append(f"fact missing from the model's sentences: {options[0]}")
    if target := expect.get("addresses"):
        hit = addresses(target, own, replies)
        tally.add("addresses_question", hit)
        if not hit:
            problems.append(f"does not address {target}")
    if lang != "en":
        tally.add("language_match", bool(own) and in_language(own, lang))
    known = _findings_numbers(replies)
    cited = " ".join(c.get("text", "") for r in replies for c in r["citations"])
    for number in numbers_in(own):
        tally.numbers_total += 1
        tally.numbers_supported += any(abs(number - k) <= 0.0051 or abs(number - 100 * k) <= 0.51 for k in known) or quotes_number(cited, number)
    return problems


def summarise(tally: Tally, scenarios: int) -> dict:
    precision, recall = _ratio(tally.tp, tally.tp + tally.fp), _ratio(tally.tp, tally.tp + tally.fn)
    f1 = round(2 * precision * recall / (precision + recall), 3) if precision and recall else 0.0
    latencies = sorted(tally.latencies)
    figures = {"tool_selection_precision": precision, "tool_selection_recall": recall, "tool_selection_f1": f1,
               "argument_validity": _ratio(tally.args_ok, tally.args_total),
               "number_support": _ratio(tally.numbers_supported, tally.numbers_total)}
    figures |= {name: _ratio(*tally.counts.get(name, (0, 0))) for name in COUNTED}
    figures |= {"latency_p50_s": round(statistics.median(latencies), 2) if latencies else None,
                "latency_p95_s": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 2) if latencies else None}
    counts = {f"{name}_n": tally.counts.get(name, (0, 0))[1] for name in COUNTED}
    return {"scenarios": scenarios, "turns": len(latencies), "figures": figures, "counts": counts, "failures": tally.failures}


def run_scenarios(scenarios: list[dict], root: Path, settings, model, tools, routers, label: str) -> dict:
    from ophglm.agent.assistant import Assistant

    tally = Tally()
    for scenario in tqdm(scenarios, desc=f"scenarios ({label})", unit="scenario"):
        assistant = Assistant(settings, chat_model=model, tools=tools, routers=routers)
        replies = []
        for turn in scenario["turns"]:
            image = load_image(turn["image"], root) if turn.get("image") else None
            reply = assistant.ask(turn["user"], image=image).to_dict()
            tally.latencies.append(reply["timings"]["turn_s"])
            replies.append(reply)
        if problems := score(scenario, replies, tally):
            tally.failures.append({"id": scenario["id"], "problems": problems, "answer": replies[-1]["answer"][:300]})
    return summarise(tally, len(scenarios))


def evaluate_agent(scenarios_path: Path, root: Path, settings=None, chat_model=None, limit: int = 0,
                   routers: tuple[str, ...] | None = None, with_null: bool = True) -> dict:
    from ophglm.agent.chat_models import make_chat_model
    from ophglm.agent.null_model import NullChatModel
    from ophglm.settings import load_settings
    from ophglm.tools.registry import load_tools

    settings = settings or load_settings(None)
    routers = settings.router_names if routers is None else routers
    scenarios = load_scenarios(scenarios_path)
    scenarios = scenarios[:limit] if limit else scenarios
    tools = load_tools(settings)
    model = chat_model if chat_model is not None else make_chat_model(settings)
    report = {"scenarios": len(scenarios), "routers": list(routers),
              "llm": {"backend": settings.llm_backend, "model": settings.llm_model, "adapter": settings.resolved_llm_adapter(),
                      "fusion": settings.resolved_fusion()} if not isinstance(model, NullChatModel) else {"model": "null"}}
    chosen = run_scenarios(scenarios, root, settings, model, tools, routers, "model")
    report["model"] = chosen
    if with_null and not isinstance(model, NullChatModel):
        null = run_scenarios(scenarios, root, settings, NullChatModel(), tools, routers, "null model")
        report["null"] = null
        report["lift"] = {k: (round(v - null["figures"][k], 3) if v is not None and null["figures"][k] is not None else None)
                          for k, v in chosen["figures"].items()}
    return report


def print_table(report: dict) -> None:
    columns = [c for c in ("model", "null", "lift") if c in report]
    print(f"{report['scenarios']} scenarios, routers: {','.join(report['routers']) or 'none'}, model: {report['llm'].get('model')}")
    print(f"{'figure':32}" + "".join(f"{c:>10}" for c in columns))
    for name in report["model"]["figures"]:
        values = [report["model"]["figures"][name], *(report[c]["figures"][name] if c != "lift" else report["lift"][name] for c in columns[1:])]
        print(f"{name:32}" + "".join(f"{'-' if v is None else v:>10}" for v in values))
    failures = report["model"]["failures"]
    print(f"scenarios with a problem (model): {len(failures)}")
    for failure in failures[:15]:
        print(f"  {failure['id']}: {'; '.join(failure['problems'])}")


def cmd_eval_agent(args) -> None:
    from ophglm.agent.null_model import NullChatModel
    from ophglm.settings import load_settings

    settings = load_settings(args.config)
    routers = tuple(r for r in args.routers.split(",") if r) if args.routers is not None else None
    report = evaluate_agent(Path(args.scenarios), Path(args.data), settings=settings, limit=args.limit, routers=routers,
                            chat_model=NullChatModel() if args.llm == "null" else None)
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print_table(report)


def add_eval_agent_parser(eval_subparsers) -> None:
    p = eval_subparsers.add_parser("agent", help="what the LLM adds over a null model: tool choice, facts, fallbacks, refusals, latency")
    p.add_argument("--scenarios", default="benchmarks/agent_scenarios.jsonl")
    p.add_argument("--data", required=True, help="the folder scenario image paths are relative to")
    p.add_argument("--llm", choices=["settings", "null"], default="settings", help="the chat model the settings name, or the null model alone")
    p.add_argument("--routers", help="override settings.routers, e.g. '' for none (the model alone decides vessels and knowledge)")
    p.add_argument("--limit", type=int, default=0, help="only the first N scenarios")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval_agent)
