"""Prompt-cache benchmark: turn latency of the local LLM with and without reusing the last prompt's cache.

    python benchmarks/prompt_cache.py --data ../shared/data [--scenarios 4]

Plays photograph scenarios of benchmarks/agent_scenarios.jsonl (half single turns, half with
a follow-up) through the real assistant (shipped SmolLM2 + adapter + fusion, real tools)
twice each, once with the prompt cache and once without it, alternating which goes first,
and prints the median turn and LLM times of each, their ratio, how many prompt tokens the
cache spared, and whether the answers were the same (greedy decoding should not notice).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from ophglm.agent.assistant import Assistant
from ophglm.agent.chat_models import make_chat_model
from ophglm.agent.local_model import LocalChatModel
from ophglm.agent.prompt_cache import PromptCache
from ophglm.finetune.evaluate_agent import load_image
from ophglm.settings import load_settings
from ophglm.tools.registry import load_tools


class NoPromptCache(PromptCache):
    """Always a fresh cache: every call reads its whole prompt."""

    def take(self, prompt, new_cache):
        return new_cache()


def play(scenario: dict, root: Path, settings, model, tools) -> list[dict]:
    assistant = Assistant(settings, chat_model=model, tools=tools)
    return [assistant.ask(t["user"], image=load_image(t["image"], root) if t.get("image") else None).to_dict() for t in scenario["turns"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--scenarios", type=int, default=4, help="how many photograph scenarios")
    parser.add_argument("--file", default="benchmarks/agent_scenarios.jsonl")
    args = parser.parse_args(argv)
    root = Path(args.data)
    scenarios = [json.loads(line) for line in Path(args.file).read_text().splitlines() if line.strip()]
    single, follow_ups = ([s for s in scenarios if s["id"].startswith(prefix)] for prefix in ("photo-", "follow-up-"))
    photos = single[: args.scenarios // 2] + follow_ups[: args.scenarios - args.scenarios // 2]
    if not photos or not root.is_dir():
        print(f"no photograph scenarios, or no data folder at {root}", file=sys.stderr)
        return 2
    settings = load_settings()
    model, tools = make_chat_model(settings), load_tools(settings)
    if not isinstance(model, LocalChatModel):
        print(f"the configured LLM backend ({settings.llm_backend}) is not the local model", file=sys.stderr)
        return 2
    play(photos[0], root, settings, model, tools)  # warm-up: model loading, first-call costs
    times = {"with cache": [], "without cache": []}
    llm = {"with cache": [], "without cache": []}
    answers, spared = {"with cache": [], "without cache": []}, 0
    for i, scenario in enumerate(photos):
        order = ["with cache", "without cache"] if i % 2 else ["without cache", "with cache"]
        for mode in order:
            model.prompt_cache = PromptCache() if mode == "with cache" else NoPromptCache()
            replies = play(scenario, root, settings, model, tools)
            spared += model.prompt_cache.reused_tokens
            times[mode] += [r["timings"]["turn_s"] for r in replies]
            llm[mode] += [r["timings"]["llm_s"] for r in replies]
            answers[mode].append([r["answer"] for r in replies])
    for mode in times:
        print(f"{mode:14s} turn p50 {statistics.median(times[mode]):6.2f} s   LLM p50 {statistics.median(llm[mode]):6.2f} s   ({len(times[mode])} turns)")
    print(f"ratio with/without: turn {statistics.median(times['with cache']) / statistics.median(times['without cache']):.2f}, "
          f"LLM {statistics.median(llm['with cache']) / statistics.median(llm['without cache']):.2f}")
    print(f"prompt tokens the cache spared: {spared}; same answers: "
          f"{sum(a == b for a, b in zip(answers['with cache'], answers['without cache']))}/{len(photos)} scenarios")
    return 0


if __name__ == "__main__":
    sys.exit(main())
