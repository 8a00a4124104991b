from ophglm.agent.grounding import check_answer
from ophglm.agent.triage import triage

EVIDENCE = ["Disease probabilities: diabetic retinopathy 0.87, normal 0.05.", "haemorrhages: 12 (0.41% of field)"]


def test_numbers_from_tools_survive_in_any_common_form():
    answer = "Diabetic retinopathy has probability 0.87 (87%). There are 12 haemorrhages covering 0.4% of the field."
    result = check_answer(answer, EVIDENCE, {}, {"diabetic_retinopathy": 0.87, "normal": 0.05})
    assert result.text == answer and not result.removed


def test_invented_numbers_and_citations_are_removed_and_reported():
    answer = "The cup-to-disc ratio is 0.7. Haemorrhages: 12 [diabetic_retinopathy#visual-diagnosis]. See [glaucoma#treatment-and-prevention]."
    result = check_answer(answer, EVIDENCE, {"diabetic_retinopathy#visual-diagnosis": "Haemorrhages and microaneurysms."})
    assert result.text == "Haemorrhages: 12 [diabetic_retinopathy#visual-diagnosis]."
    assert "number 0.7 not in any tool result" in result.removed[0]
    assert "citation [glaucoma#treatment-and-prevention] was not retrieved" in result.removed[1]


# Tool results as the tools write them (segment_lesions, measure_optic_disc, measure_vessels).
SESSION_EVIDENCE = [
    "Disease probabilities for img1: glaucoma (suspect optic disc) 0.62, no referable disease 0.20, cataract (hazy view) 0.05.",
    "Lesions in img1: microaneurysms: 3 (0.10% of field, nearest 1.20 disc diameters from the fovea); haemorrhages: 0 (0.00% of field); "
    "hard exudates: 2 (0.05% of field, nearest 0.80 disc diameters from the fovea); optic disc found; "
    "hard exudates within 1 disc diameter of the fovea (macula involved). Overlay saved as overlay-img1.",
    "Vertical cup-to-disc ratio of img1: 0.45 (below 0.7).",
    "Retinal vessel density of img1: 11.30% of the field of view.",
]


def test_a_number_must_be_a_figure_of_the_quantity_its_clause_names():
    kept = ("The classifier's most likely class is glaucoma, with a probability of 0.62. "
            "The lesion segmenter found 3 microaneurysms and 2 hard exudates. Hard exudates lie within 1 disc diameter of the fovea. "
            "The vertical cup-to-disc ratio is 0.45. The retinal vessel density is 11.3% of the field of view. "
            "The classifier gives cataract a probability of 0.05; its most likely class is glaucoma (62%).")
    result = check_answer(kept, SESSION_EVIDENCE, {}, {"glaucoma": 0.62, "normal": 0.2, "cataract": 0.05})
    assert result.text == kept and not result.removed
    for wrong, why in (("The vessel density is 3.", "number 3 is not a vessel density figure"),  # the microaneurysm count
                       ("The cup-to-disc ratio is 0.62.", "number 0.62 is not a cup-to-disc ratio figure"),  # a probability
                       ("There are 2 microaneurysms.", "number 2 is not a microaneurysms figure"),
                       ("The vessel density is 7.5%.", "number 7.5 not in any tool result")):
        result = check_answer(wrong, SESSION_EVIDENCE, {}, {"glaucoma": 0.62})
        assert result.text == "" and why in result.removed[0], (wrong, result.removed)
    # A clause that names no quantity may quote any tool's number.
    assert check_answer("That is 0.45.", SESSION_EVIDENCE, {}).removed == []


def test_a_stated_urgency_must_be_the_rule_tables():
    answer = "By OphGLM's triage rules the urgency is soon: refer within weeks. A sudden curtain over the vision needs urgent referral."
    assert check_answer(answer, [], {}, checks_urgency=True, urgency="soon").text == answer
    result = check_answer("The referral urgency is routine: see a doctor.", [], {}, checks_urgency=True, urgency="soon")
    assert result.text == "" and "the rule table gives the urgency soon" in result.removed[0]
    # After a rejected photograph there is no level to state; listing the scale states none.
    result = check_answer("The urgency is routine. Urgency levels are urgent, soon, routine or none.", [], {}, checks_urgency=True, urgency=None)
    assert result.text == "Urgency levels are urgent, soon, routine or none."
    assert "no examined photograph has an urgency" in result.removed[0]
    assert check_answer("The urgency is routine.", [], {}).removed == []  # not asked to check


def test_a_sentence_copied_from_a_tool_description_is_removed():
    description = "Find diabetic-retinopathy lesions and the optic disc in one colour fundus photograph of this session."
    answer = "Find diabetic retinopathy lesions and the optic disc in one colour fundus photograph. The optic disc was found."
    result = check_answer(answer, [], {}, tool_descriptions=[description])
    assert result.text == "The optic disc was found." and "repeats a tool's description" in result.removed[0]


def test_a_sentence_cut_off_by_the_token_limit_is_dropped():
    passage = {"glaucoma#overview": "Glaucoma damages the optic nerve."}
    assert check_answer("Glaucoma damages the optic nerve [glaucoma#overview]. It is often", [], passage).text == "Glaucoma damages the optic nerve [glaucoma#overview]."


def _findings(probs: dict, counts: dict) -> dict:
    return {
        "classify_fundus": {"probabilities": {k: {"value": v, "unit": "probability"} for k, v in probs.items()}},
        "segment_lesions": {"lesions": {k: {"count": {"value": v, "unit": "lesions"}, "area": {"value": 0.2 * v, "unit": "% of field of view"}}
                                        for k, v in counts.items()}},
    }


def test_triage_rules_are_ordered_and_explain_themselves():
    assert triage({}) is None
    moderate = triage(_findings({"diabetic_retinopathy": 0.9}, {"HE": 7, "SE": 0}))
    assert (moderate.level, moderate.rule) == ("soon", "dr-moderate-signs")
    assert triage(_findings({"diabetic_retinopathy": 0.9}, {"HE": 1})).level == "routine"
    assert triage(_findings({"normal": 0.9}, {"HE": 0, "EX": 0, "SE": 0})).level == "none"
    # a confident "normal" with a large haemorrhage area on the lesion map is not called normal
    assert triage(_findings({"normal": 0.9}, {"HE": 30})).rule == "uncertain"
    assert triage(_findings({"normal": 0.9}, {"HE": 3})).rule == "normal"  # a few specks: the segmenter's noise floor
    assert triage(_findings({"glaucoma": 0.7}, {})).level == "soon"


def test_a_reason_resting_on_the_classifier_quotes_its_probability():
    """A follow-up repeats the reason without the classifier's sentence: the reason must carry its own figure."""
    assert "glaucoma 0.65" in triage(_findings({"glaucoma": 0.65}, {})).reason
    assert "(classifier 0.81)" in triage(_findings({"diabetic_retinopathy": 0.81}, {"HE": 1})).reason
    assert check_answer(f"Reason: {triage(_findings({'glaucoma': 0.65}, {})).reason}.", ["glaucoma 0.65"], {}, {"glaucoma": 0.65}).text


def _measured(dr=0.3, normal=0.6, ex_count=0, macular=False, cdr=None, reliable=True, glaucoma=0.0):
    findings = {
        "classify_fundus": {"probabilities": {"diabetic_retinopathy": {"value": dr}, "normal": {"value": normal}, "glaucoma": {"value": glaucoma}}},
        "segment_lesions": {"lesions": {"EX": {"count": {"value": ex_count}}}, "macular_exudates": {"value": macular}},
    }
    if cdr is not None:
        findings["measure_optic_disc"] = {"vertical_cdr": {"value": cdr}, "reliable": reliable}
    return findings


def test_exudates_at_the_fovea_are_urgent_when_the_classifier_corroborates_retinopathy():
    level = triage(_measured(dr=0.7, normal=0.1, ex_count=2, macular=True))
    assert (level.level, level.rule) == ("urgent", "macular-exudates") and "fovea" in level.reason
    assert triage(_measured(dr=0.7, normal=0.1, ex_count=2, macular=False)).level != "urgent"
    # the segmenter finds "exudates" on healthy retinas from other cameras: alone they do not make it urgent
    assert triage(_measured(dr=0.1, normal=0.9, ex_count=2, macular=True)).level != "urgent"


def test_a_large_cup_is_referred_only_when_reliable_and_corroborated():
    assert triage(_measured(normal=0.3, cdr=0.75, glaucoma=0.35)).rule == "large-cup"
    assert triage(_measured(normal=0.3, cdr=0.75, glaucoma=0.35, reliable=False)).rule != "large-cup"
    assert triage(_measured(normal=0.3, cdr=0.5, glaucoma=0.35)).rule != "large-cup"
    assert triage(_measured(normal=0.3, cdr=0.75, glaucoma=0.05)).rule != "large-cup"


PROBS = {"normal": 0.08, "diabetic_retinopathy": 0.81, "glaucoma": 0.06, "cataract": 0.03, "pathologic_myopia": 0.02}


def test_claims_about_the_photograph_must_agree_with_the_classifier():
    answer = ("The photograph shows signs of diabetic retinopathy. Your eye also has glaucoma. "
              "The eye is healthy. There are no signs of diabetic retinopathy. Glaucoma damages the optic nerve. "
              "There is no sign of cataract.")
    result = check_answer(answer, [], {"glaucoma#overview": "Glaucoma damages the optic nerve."}, PROBS)
    assert result.text == ("The photograph shows signs of diabetic retinopathy. Glaucoma damages the optic nerve [glaucoma#overview]. "
                           "There is no sign of cataract.")
    reasons = " ".join(result.removed)
    assert "does not support glaucoma (0.06)" in reasons and "does not support a healthy eye" in reasons
    assert "diabetic retinopathy 0.81, so it cannot be ruled out" in reasons


PASSAGES = {"glaucoma#symptoms": "Open-angle glaucoma has no early symptoms.", "cataract#signs": "A cataract makes the view hazy."}


def test_general_statements_about_a_disease_must_be_traceable_to_a_passage():
    answer = "Glaucoma has no early symptoms. Cataract has signs such as a hazy view [cataract#signs]."
    traced = "Glaucoma has no early symptoms [glaucoma#symptoms]. Cataract has signs such as a hazy view [cataract#signs]."
    assert check_answer(answer, [], PASSAGES, PROBS).text == traced
    assert check_answer(answer, [], PASSAGES, {}).text == traced
    # nothing retrieved discusses glaucoma, and the classifier disfavours it: not grounded
    result = check_answer(answer, [], {"cataract#signs": PASSAGES["cataract#signs"]}, PROBS)
    assert result.text == "Cataract has signs such as a hazy view [cataract#signs]."
    assert "no tool result or retrieved passage discusses glaucoma" in result.removed[0]
    # a passage about something else does not vouch for a disease the sentence cites it for
    result = check_answer("Glaucoma is treatable [cataract#signs].", [], PASSAGES, PROBS)
    assert result.text == "Glaucoma is treatable [cataract#signs] [glaucoma#symptoms]."


def test_the_classifier_itself_supports_the_diseases_it_favours_or_quotes():
    assert check_answer("Diabetic retinopathy is likely here.", [], {}, PROBS).text == "Diabetic retinopathy is likely here."
    assert check_answer("Glaucoma has probability 0.06.", ["glaucoma 0.06"], {}, PROBS).removed == []
    # The summary rounds the raw probability, the findings keep three decimals: 0.035 quoted as 0.03 is still a quote.
    assert check_answer("Glaucoma 0.03.", ["glaucoma 0.03"], {}, {"glaucoma": 0.035}).removed == []


def test_a_sign_must_come_from_a_tool_result_or_a_passage_whether_asserted_or_denied():
    # Session 5's evaluation kept "...has a cherry-red spot": no tool looks for one, no passage discussed it.
    for invented in ("The retina has a cherry-red spot.", "There is no neovascularisation in this eye.", "Drusen are visible."):
        result = check_answer(invented, EVIDENCE, {}, PROBS)
        assert result.text == "" and "no tool result or retrieved passage discusses" in result.removed[0], invented
    # the segmenter's result names haemorrhages: a sentence about them needs no passage (and "blot" is a way to say it)
    assert check_answer("The haemorrhages are dot and blot shaped.", EVIDENCE, {}, PROBS).removed == []
    # a retrieved passage that discusses the sign vouches for it, and is cited
    passages = {"dr#signs": "Proliferative retinopathy shows neovascularization at the disc or elsewhere."}
    result = check_answer("Neovascularisation means proliferative disease.", [], passages, {})
    assert result.text == "Neovascularisation means proliferative disease [dr#signs]." and not result.removed
    # ordinary words that contain no sign stay ("tell me", "blotchy" are not findings)
    assert check_answer("Tell me if the view is blotchy.", [], {}, {}).removed == []
