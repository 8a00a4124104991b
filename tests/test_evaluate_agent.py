"""`ophglm eval agent` end to end on scenarios that need no shared data: a scripted model beside the null model.

The scripted model behaves well on purpose except where a scenario says otherwise, so each
figure is seen moving, and the null model (answers nothing, calls nothing) shows what the
code around the LLM scores alone.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from langchain_core.messages import AIMessage, ToolMessage

from ophglm.agent.scripted_model import ScriptedChatModel
from ophglm.finetune.answer_lexicon import in_language, names_finding, quotes_number
from ophglm.finetune.evaluate_agent import evaluate_agent, load_scenarios
from ophglm.tools.synthetic_fundus import make_synthetic_fundus

SCENARIOS = [
    {"id": "non-fundus", "lang": "en", "turns": [{"user": "Is anything wrong with this eye?", "image": "generated:non_fundus:0"}],
     "expect": {"tools": [], "refusal": True, "triage": None, "facts": []}},
    {"id": "knowledge", "lang": "en", "turns": [{"user": "What are the symptoms of glaucoma?", "image": None}],
     "expect": {"tools": ["search_knowledge"], "refusal": False, "facts": [["knowledge base", "wissen"]], "addresses": "words:knowledge"}},
    {"id": "out-of-scope", "lang": "en", "turns": [{"user": "How do I bake sourdough bread?", "image": None}],
     "expect": {"tools": [], "refusal": True, "facts": []}},
    {"id": "vessels", "lang": "zh", "turns": [{"user": "Please look at this.", "image": "demo.png"}, {"user": "血管怎么样？", "image": None}],
     "expect": {"tools": ["measure_vessels"], "refusal": False, "facts": ["unicorn"], "addresses": "finding:vessel_density"}},
]


def _scripted_step(messages):
    """Answers from the tool results; on a vessel follow-up with no vessel result yet, calls the tool itself."""
    results = {m.name: m for m in messages if isinstance(m, ToolMessage)}
    question = next(m for m in reversed(messages) if m.type == "human").additional_kwargs.get("question", "")
    if "血管" in question and "measure_vessels" not in results:
        image_id = re.search(r"image_id=(img-[0-9a-f]+)", next(m.text for m in messages if m.type == "human"))[1]
        return AIMessage(content="", tool_calls=[{"name": "measure_vessels", "args": {"image_id": image_id}, "id": "call_1", "type": "tool_call"}])
    if "measure_vessels" in results:
        density = results["measure_vessels"].artifact["findings"]["vessel_density"]["value"]
        return f"视网膜血管密度为 {density:.2f}%。"
    cited = re.search(r"\[([a-z_]+#[a-z-]+)\]", results["search_knowledge"].text) if "search_knowledge" in results else None
    return f"This is described in the knowledge base [{cited[1]}]." if cited else "I do not know."


@pytest.fixture
def scenario_file(tmp_path):
    make_synthetic_fundus(512, seed=4).image.save(tmp_path / "demo.png")
    path = tmp_path / "scenarios.jsonl"
    path.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in SCENARIOS), encoding="utf-8")
    return path


def test_eval_agent_prints_the_model_the_null_model_and_the_lift(scenario_file, settings, knowledge_index, monkeypatch):
    monkeypatch.setenv("OPHGLM_CHROMA_PATH", str(settings.chroma_folder))
    model = ScriptedChatModel(steps=[_scripted_step] * 8)
    # No routers: the model alone must call the vessel tool and search the knowledge base.
    report = evaluate_agent(scenario_file, scenario_file.parent, settings=settings, chat_model=model, routers=("knowledge",))
    chosen, null, lift = report["model"]["figures"], report["null"]["figures"], report["lift"]
    assert report["model"]["scenarios"] == report["null"]["scenarios"] == 4
    # the knowledge router ran the search (a pipeline step, not the model's): only the vessel call was the model's to make
    assert chosen["tool_selection_recall"] == 1.0 and chosen["tool_selection_precision"] == 1.0
    assert null["tool_selection_f1"] == 0.0 and null["tool_selection_recall"] == 0.0 and lift["tool_selection_f1"] == 1.0
    # the null model's answers are all the code's own: nothing of it survives, nothing addresses the question
    assert null["fallback_rate"] == 1.0 and null["addresses_question"] == 0.0 and null["fact_recall"] == 0.0
    assert chosen["fallback_rate"] == 0.0 and chosen["addresses_question"] == 1.0
    assert chosen["fact_recall"] == pytest.approx(1 / 2)  # "knowledge base" found, "unicorn" in no answer
    assert chosen["language_match"] == 1.0 and null["language_match"] == 0.0  # the Chinese question got a Chinese answer
    # refusals come from the pipeline (the quality gate, the off-topic gate): the same for both, lift 0
    assert chosen["refusal_accuracy"] == null["refusal_accuracy"] == 1.0 and lift["refusal_accuracy"] == 0.0
    assert chosen["number_support"] == 1.0
    assert {f["id"] for f in report["model"]["failures"]} == {"vessels"}


def test_scenarios_without_the_keys_a_turn_needs_are_named_by_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "a", "turns": [{"user": "hi"}], "expect": {}}\n{"id": "b", "turns": []}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected .*turns"):
        load_scenarios(path)


def test_the_evaluations_own_lexicon_reads_findings_numbers_and_languages():
    assert names_finding("疑似青光眼", "glaucoma") and names_finding("Routine review", "urgency:routine")
    assert not names_finding("The eye looks fine", "glaucoma")
    assert quotes_number("density 16.3%", 16.33) and quotes_number("95%", 0.95) and not quotes_number("density 17%", 16.33)
    assert in_language("视网膜血管密度为 16.33%。", "zh") and not in_language("The vessel density is 16.33%.", "zh")
    assert in_language("La densidad vascular es del 16 % del campo.", "es") and not in_language("Die Dichte ist hoch.", "es")


SCENARIO_FILE = Path(__file__).parents[1] / "benchmarks" / "agent_scenarios.jsonl"


def _normalised(text: str) -> str:
    return re.sub(r"[^\w{}]+", " ", text.lower()).strip()


def test_no_scenario_question_shares_a_template_with_the_instruction_data_generator():
    from ophglm.finetune import questions

    templates = [t for bank in (questions.PHOTO_QUESTIONS, questions.DISEASE_QUESTIONS, questions.FOLLOW_UPS, questions.KNOWLEDGE_TEMPLATES)
                 for listed in bank.values() for t in listed] + questions.AFTER_REFUSAL + questions.OUT_OF_SCOPE
    patterns = [re.compile("^" + re.escape(_normalised(t)).replace(r"\{t\}", ".+") + "$") for t in templates]
    scenarios = load_scenarios(SCENARIO_FILE)
    shared = [(turn["user"], p.pattern) for s in scenarios for turn in s["turns"] for p in patterns if p.match(_normalised(turn["user"]))]
    assert not shared, shared[:5]
    assert len(scenarios) >= 150
    assert sum(s.get("lang", "en") != "en" for s in scenarios) >= 0.2 * len(scenarios)
    assert sum(s.get("lang") == "zh" for s in scenarios) >= 20


def test_the_template_check_can_fail():
    template = re.compile("^" + re.escape(_normalised("What causes {t}?")).replace(r"\{t\}", ".+") + "$")
    assert template.match(_normalised("What causes Glaucoma?")) and not template.match(_normalised("Why do people get glaucoma?"))
