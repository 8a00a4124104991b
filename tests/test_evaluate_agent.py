"""`ophglm eval agent` end to end on scenarios that need no shared data, with a scripted model.

The scripted model behaves well on purpose except where a scenario says otherwise, so each
metric is seen moving: a missing fact, an expected tool that was not called, a wrong refusal.
"""

from __future__ import annotations

import json

import pytest

from ophglm.agent.scripted_model import ScriptedChatModel
from ophglm.finetune.evaluate_agent import evaluate_agent, groundedness
from ophglm.tools.synthetic_fundus import make_synthetic_fundus

from server_support import answer_from_tools

SCENARIOS = [
    {"id": "non-fundus", "turns": [{"user": "Is anything wrong with this eye?", "image": "generated:non_fundus:0"}],
     "expect": {"tools": ["assess_quality"], "refusal": True, "triage": None, "facts": ["fundus photograph"]}},
    {"id": "knowledge", "turns": [{"user": "What are the symptoms of glaucoma?", "image": None}],
     "expect": {"tools": ["search_knowledge"], "refusal": False, "triage": None, "facts": ["knowledge base"]}},
    {"id": "out-of-scope", "turns": [{"user": "How do I bake sourdough bread?", "image": None}],
     "expect": {"tools": ["search_knowledge"], "refusal": True, "facts": []}},
    {"id": "photo", "turns": [{"user": "What do you see?", "image": "demo.png"}],
     "expect": {"tools": ["assess_quality", "classify_fundus", "segment_lesions", "measure_optic_disc", "triage_findings",
                          "search_knowledge", "measure_vessels"], "refusal": False, "facts": ["probability", "unicorn"]}},
]


def test_eval_agent_scores_every_metric_from_the_reply_records(tmp_path, settings, knowledge_index, monkeypatch):
    monkeypatch.setenv("OPHGLM_CHROMA_PATH", str(settings.chroma_folder))
    make_synthetic_fundus(512, seed=4).image.save(tmp_path / "demo.png")
    scenarios = tmp_path / "scenarios.jsonl"
    scenarios.write_text("".join(json.dumps(s) + "\n" for s in SCENARIOS))
    model = ScriptedChatModel(steps=[answer_from_tools] * 4)  # the refusals never reach the model
    report = evaluate_agent(scenarios, tmp_path, chat_model=model)
    assert report["scenarios"] == 4 and report["turns"] == 4 and len(model.prompts) == 2
    # measure_vessels was expected but never called: recall < 1, precision 1
    assert report["tool_selection"]["precision"] == 1.0 and report["tool_selection"]["recall"] == pytest.approx(9 / 10)
    assert report["refusal_accuracy"] == 1.0 and report["refusal_accuracy_non_fundus_images"] == 1.0
    assert report["groundedness"] == 1.0 and report["argument_validity"] == 1.0
    assert report["fact_recall"] == pytest.approx(3 / 4)  # "unicorn" is in no answer
    assert report["triage_checked"] == 2 and report["triage_accuracy"] == 1.0
    assert {f["id"] for f in report["failures"]} == {"photo"}
    assert report["latency_s"]["p95"] >= report["latency_s"]["p50"] > 0


def test_groundedness_counts_invented_numbers_and_unsupported_diseases():
    record = {"answer": "The classifier gives glaucoma 0.81. There are 12 haemorrhages. It looks like cataract.",
              "findings": {"classify_fundus": {"probabilities": {"glaucoma": {"value": 0.81}, "cataract": {"value": 0.05}}}}}
    supported, total = groundedness(record, ["glaucoma 0.81, cataract 0.05"], cited_text="")
    assert (supported, total) == (2, 4)  # 0.81 and glaucoma yes; 12 and cataract no
    assert groundedness(record, ["glaucoma 0.81, cataract 0.05"], cited_text="cataract clouds the lens")[0] == 3


def test_groundedness_takes_numbers_from_cited_passages_and_a_follow_up_rests_on_earlier_findings():
    quoted = {"answer": "Moderate NPDR is reviewed every 6 to 12 months [screening#a].", "findings": {}}
    assert groundedness(quoted, [], cited_text="")[0] < groundedness(quoted, [], cited_text="moderate npdr every 6 to 12 months")[0]
    follow_up = {"answer": "Reason: diabetic retinopathy is likely (classifier 0.81).", "findings": {}}
    earlier = {"probabilities": {"diabetic_retinopathy": {"value": 0.81}}}
    assert groundedness(follow_up, ["diabetic retinopathy 0.81"], "", earlier) == (2, 2)
    assert groundedness(follow_up, ["diabetic retinopathy 0.81"], "")[0] == 1  # without them the disease name is unsupported
