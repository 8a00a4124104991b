"""The retrieval evaluation: exact metrics on a tiny question file, and the `eval retrieval` command."""

import argparse
import json

import pytest

from ophglm.knowledge.evaluate import DEFAULT_QUESTIONS, add_eval_retrieval_parser, evaluate_retrieval, half, load_questions
from ophglm.knowledge.index import Passage


class CannedIndex:
    """Answers each question with fixed doc_ids, so the metrics can be checked by hand."""

    def __init__(self, answers):
        self.answers = answers

    def search(self, query, k=4):
        return [Passage(f"{d}#s", d, d, "s", "text", 1.0) for d in self.answers[query]][:k]


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_metrics_on_a_tiny_question_file(tmp_path):
    rows = [{"question": "q1", "relevant": ["a"]}, {"question": "q2", "relevant": ["c", "d"]},
            {"question": "q3", "relevant": ["e"]}, {"question": "off topic", "relevant": []}, {"question": "also off", "relevant": []}]
    answers = {"q1": ["a", "b"], "q2": ["b", "b", "d"], "q3": [], "off topic": [], "also off": ["x"]}
    report = evaluate_retrieval(CannedIndex(answers), _write(tmp_path / "q.jsonl", rows))
    assert (report["questions"], report["in_scope"], report["out_of_scope"]) == (5, 3, 2)
    assert report["recall@1"] == pytest.approx(1 / 3)
    assert report["recall@5"] == pytest.approx(2 / 3)
    assert report["mrr"] == pytest.approx((1 + 1 / 3) / 3)
    assert report["oos_rejection"] == pytest.approx(0.5)
    assert 0 <= report["latency_ms_p50"] <= report["latency_ms_p95"]
    assert {m["question"] for m in report["misses"]} == {"q3", "also off"}
    halves = report["halves"]
    assert set(halves) == {"tune", "holdout"} and sum(h["questions"] for h in halves.values()) == 5
    assert report["aspect_questions"] == 0 and report["aspect_section_shown"] is None  # no question names an aspect


def test_the_real_index_on_a_few_questions(tmp_path, knowledge_index):
    rows = [{"question": "CRVO treatment", "relevant": ["retinal_vein_occlusion"]},
            {"question": "glacoma symptoms", "relevant": ["glaucoma"]},
            {"question": "how do I bake sourdough bread", "relevant": []}]
    report = evaluate_retrieval(knowledge_index, _write(tmp_path / "q.jsonl", rows))
    assert report["recall@5"] == 1.0 and report["oos_rejection"] == 1.0 and report["misses"] == []
    assert (report["aspect_questions"], report["aspect_section_shown"]) == (2, 1.0)  # "treatment", "symptoms"


@pytest.mark.parametrize("text, message", [('{"question": "x"}\n', r"q.jsonl:1"), ("not json\n", r"q.jsonl:1"), ("\n", "no questions")])
def test_malformed_question_files_are_named(tmp_path, text, message):
    path = tmp_path / "q.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_questions(path)
    with pytest.raises(FileNotFoundError):
        load_questions(tmp_path / "missing.jsonl")


def test_the_question_set_splits_into_two_stable_halves():
    questions = load_questions(DEFAULT_QUESTIONS)
    sides = [half(q["question"]) for q in questions]
    assert len(questions) >= 200 and 0.4 < sides.count("tune") / len(sides) < 0.6
    assert sides == [half(q["question"]) for q in questions]


def test_eval_retrieval_subcommand(tmp_path, settings, knowledge_index, monkeypatch, capsys):
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    add_eval_retrieval_parser(parser.add_subparsers(dest="command").add_parser("eval").add_subparsers(dest="action"))
    monkeypatch.setenv("OPHGLM_CHROMA_PATH", str(settings.chroma_folder))  # the index the fixture built
    questions = _write(tmp_path / "q.jsonl", [{"question": "CRVO treatment", "relevant": ["retinal_vein_occlusion"]},
                                               {"question": "capital gains tax allowance", "relevant": []}])
    args = parser.parse_args(["eval", "retrieval", "--questions", str(questions), "--json"])
    args.func(args)
    report = json.loads(capsys.readouterr().out)
    assert report["recall@5"] == 1.0 and report["oos_rejection"] == 1.0
    args = parser.parse_args(["eval", "retrieval", "--questions", str(questions)])
    args.func(args)
    table = capsys.readouterr().out
    assert "recall@5" in table and "out-of-scope rejection" in table and "latency p50 (ms)" in table
    assert parser.parse_args(["eval", "retrieval"]).questions == str(DEFAULT_QUESTIONS)
