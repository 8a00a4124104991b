"""The grounding check reads a claim's polarity and subject, in the user's language; and it is measured on labelled sentences."""

from __future__ import annotations

from pathlib import Path

import pytest

from ophglm.agent.grounding import check_answer
from ophglm.finetune.evaluate_grounding import CONTEXTS, HELD_OUT, SENTENCES, evaluate_grounding

ROOT = Path(__file__).parents[1]

GLAUCOMA = {"glaucoma": 0.92, "normal": 0.05, "diabetic_retinopathy": 0.02}
UNSURE = {"glaucoma": 0.10, "normal": 0.40, "diabetic_retinopathy": 0.30}
EVIDENCE = ["Lesions in img-1: microaneurysms: 0 (0.00% of field); haemorrhages: 3 (0.10% of field); hard exudates: 0 (0.00% of field); "
            "soft exudates (cotton-wool spots): 0 (0.00% of field).", "Retinal vessel density of img-1: 12.50% of the field of view."]


COUNTS = {"MA": 0, "HE": 3, "EX": 0, "SE": 0}  # the segmenter's findings behind EVIDENCE's first line


def removed(sentence, probabilities=GLAUCOMA, urgency="soon", evidence=EVIDENCE, passages=None) -> bool:
    return bool(check_answer(sentence, evidence, passages or {}, probabilities, checks_urgency=True, urgency=urgency,
                             lesion_counts=COUNTS).removed)


@pytest.mark.parametrize("sentence, probabilities, gone", [
    ("Glaucoma is unlikely.", GLAUCOMA, True),                       # a hedge that denies what the classifier favours
    ("Glaucoma is likely in this eye.", GLAUCOMA, False),
    ("There is no doubt that this is glaucoma.", UNSURE, True),      # certainty at p = 0.10
    ("Glaucoma cannot be ruled out in this eye.", UNSURE, True),     # a negation word that affirms a possibility
    ("There are no signs of glaucoma here.", UNSURE, False),
    ("DR is unlikely in this photo.", UNSURE, False),                # the abbreviation, denied at 0.30
    ("This photo suggests DR.", UNSURE, True),
    ("这只眼睛可能患有青光眼。", UNSURE, True),                         # Chinese: a possibility at 0.10
    ("青光眼的可能性不大。", GLAUCOMA, True),                          # Chinese: "unlikely" at 0.92
    ("Die diabetische Retinopathie ist unwahrscheinlich.", UNSURE, False),
    ("El ojo está sano.", GLAUCOMA, True),                           # "healthy" at normal 0.05
])
def test_polarity_against_the_classifier(sentence, probabilities, gone):
    assert removed(sentence, probabilities) is gone


@pytest.mark.parametrize("sentence, gone", [
    ("The blood supply of the retina in this photo is diabetic retinopathy.", True),
    ("The vessel density shows glaucoma.", True),
    ("杯盘比是青光眼。", True),
    ("The vessel density is 12.50% of the field of view.", False),
    ("IOP above about 21 mmHg is the most important risk factor for POAG.", False),  # a threshold in the subject, not a value
])
def test_a_disease_is_not_a_measurements_value(sentence, gone):
    passages = {"glaucoma#causes": "Raised IOP, above about 21 mmHg, is the most important risk factor for POAG."}
    assert removed(sentence, passages=passages) is gone


@pytest.mark.parametrize("sentence, urgency, gone", [
    ("Go to the emergency department immediately.", "soon", True),
    ("Please see an eye doctor within the next few weeks.", "soon", False),
    ("This can wait until your next routine eye test.", "soon", True),
    ("需要立即去急诊就诊。", "routine", True),
    ("You need to be seen today for your macular oedema.", None, True),   # no examined photograph: no urgency for this person
    ("A sudden curtain over the vision needs urgent referral.", "soon", False),  # a rule for anyone
    ("Urgency levels are urgent, soon, routine or none.", None, False),
])
def test_urgency_stated_by_time_frame(sentence, urgency, gone):
    assert removed(sentence, urgency=urgency) is gone


def test_lesions_against_the_segmenters_counts_and_signs_no_tool_looks_for():
    assert removed("No haemorrhages were found in this eye.")           # 3 counted
    assert removed("Microaneurysms are visible in this photo.")         # 0 counted
    assert not removed("No microaneurysms, hard exudates or cotton-wool spots were found in this photo.")
    assert removed("There are drusen at the macula.", passages={"amd#signs": "Drusen are yellow deposits at the macula."})
    assert not removed("Drusen are yellow deposits at the macula.", passages={"amd#signs": "Drusen are yellow deposits at the macula."})


def test_a_general_statement_needs_a_passage_that_says_it():
    passages = {"cataract#treatment": "Cataract is treated by surgery: the cloudy lens is replaced with a clear artificial lens."}
    assert not removed("Cataract is treated by replacing the cloudy lens with an artificial lens.", passages=passages)
    assert removed("Cataract can be dissolved with eye drops.", passages=passages)
    assert removed("Cataract surgery always cures every eye completely.", passages=passages)  # absolute words no passage states


def test_the_check_meets_its_bar_on_the_development_set_and_is_measured_on_the_held_out_one():
    development = evaluate_grounding(ROOT / SENTENCES, ROOT / CONTEXTS)["all"]
    assert development["sentences"] >= 300 and development["precision"] >= 0.90 and development["recall"] >= 0.95
    held_out = evaluate_grounding(ROOT / HELD_OUT, ROOT / CONTEXTS)["all"]  # never used to change the rules: reported, with no bar here
    assert held_out["sentences"] >= 100 and held_out["precision"] is not None and held_out["recall"] is not None
