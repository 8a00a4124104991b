"""The examination pipeline, and who did what in a reply: pipeline steps, the model's own calls and sentences."""

from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage

from ophglm.agent.assistant import Assistant
from ophglm.agent.examination import examine
from ophglm.agent.scripted_model import ScriptedChatModel
from ophglm.session import Session
from ophglm.tools.non_fundus import non_fundus_images
from ophglm.tools.registry import load_tools
from ophglm.tools.search_knowledge import SearchKnowledge


@pytest.fixture
def tools(settings, knowledge_index):
    tools = load_tools(settings)
    tools["search_knowledge"] = SearchKnowledge(settings, knowledge_index)
    return tools


def test_examine_runs_each_step_once_with_typed_findings(settings, tools, demo_fundus_path):
    session = Session()
    image_id = session.add_image_file(demo_fundus_path)
    examination = examine(session, image_id, tools)
    assert [s.name for s in examination.steps] == ["assess_quality", "classify_fundus", "segment_lesions", "measure_optic_disc", "triage_findings"]
    assert all(s.by == "pipeline" and s.ok for s in examination.steps)
    assert examination.accepted and examination.refusal == ""
    classifier = examination.classifier
    assert abs(sum(classifier.probabilities.values()) - 1) < 0.05 and classifier.most_likely in classifier.probabilities
    assert set(examination.lesions.counts) == {"MA", "HE", "EX", "SE"} and all(isinstance(n, int) for n in examination.lesions.counts.values())
    assert examination.triage.level in ("urgent", "soon", "routine", "none")
    # the plain-words statement names the finding and the lesions, with the tools' own figures
    statement = examination.statement()
    assert classifier.most_likely_name in statement and f"{classifier.probabilities[classifier.most_likely]:.2f}" in statement
    assert all(seen in statement for seen in examination.lesions.seen())


def test_examine_stops_at_the_quality_gate_for_a_non_fundus_image(tools):
    session = Session()
    image_id = session.add_image(next(non_fundus_images(1, seed=3))[1])
    examination = examine(session, image_id, tools)
    assert [s.name for s in examination.steps] == ["assess_quality"]
    assert not examination.accepted and examination.classifier is None
    assert examination.refusal.startswith("I cannot assess this image: it is")


URGENCY_ONLY = "The referral urgency (urgent) is a possible macular oedema, sight-threatening: refer urgently."


def test_is_something_wrong_names_the_classifiers_finding_and_the_lesions(settings, tools, demo_fundus_path):
    # The first example of issue 23: the model said only the urgency; the answer must still lead with the findings.
    assistant = Assistant(settings, chat_model=ScriptedChatModel(steps=[URGENCY_ONLY]), tools=tools)
    reply = assistant.ask("Is something wrong with this eye?", image=demo_fundus_path)
    from ophglm.tools.classify_fundus import LABELS

    assert LABELS[reply.findings["classify_fundus"]["most_likely"]] in reply.answer and "The lesion segmenter found" in reply.answer
    lesions = reply.findings["segment_lesions"]["lesions"]
    assert all(str(v["count"]["value"]) in reply.answer for v in lesions.values() if v["count"]["value"])
    assert [c.by for c in reply.tool_calls] == ["pipeline"] * len(reply.tool_calls)
    # "the urgency is a possible macular oedema" puts a finding where a level belongs: removed, the code states the findings
    assert [p.source for p in reply.parts][0] == "removed" and reply.fallback
    # a sentence of the model's that holds stays first, marked as the model's; the findings statement follows it
    polite = "Please have this photograph reviewed by an eye-care professional."
    kept = Assistant(settings, chat_model=ScriptedChatModel(steps=[polite]), tools=tools).ask("Is something wrong?", image=demo_fundus_path)
    assert kept.answer.startswith(polite + " The classifier") and [p.source for p in kept.parts][:2] == ["model", "added"]
    assert not kept.fallback


def test_a_blood_supply_question_measures_the_vessels_and_no_disease_is_a_blood_supply(settings, tools, demo_fundus_path):
    # The second example: "The blood supply of the retina in this photo is diabetic retinopathy."
    wrong = "The blood supply of the retina in this photo is diabetic retinopathy."
    assistant = Assistant(settings, chat_model=ScriptedChatModel(steps=["Here is what I found.", wrong]), tools=tools)
    assistant.ask("Please check this retinal photo.", image=demo_fundus_path)
    reply = assistant.ask("How is the blood supply of the retina in this photo?")
    vessels = next(c for c in reply.tool_calls if c.name == "measure_vessels")
    assert vessels.ok and vessels.by == "pipeline"  # the vessel router, reported as such
    assert wrong not in reply.answer and any(p.source == "removed" and "value of a measurement" in p.why for p in reply.parts)
    density = reply.findings["measure_vessels"]["vessel_density"]["value"]
    assert f"{density:.2f}%" in reply.answer


def test_without_routers_the_model_calls_the_vessel_tool_itself_or_the_answer_says_nothing_of_it(settings, tools, demo_fundus_path):
    def call_vessels(messages):
        image_id = next(m.additional_kwargs["image_id"] for m in messages if m.additional_kwargs.get("image_id"))
        return AIMessage(content="", tool_calls=[{"name": "measure_vessels", "args": {"image_id": image_id}, "id": "call_v", "type": "tool_call"}])

    own = Assistant(settings, chat_model=ScriptedChatModel(steps=["Here is what I found.", call_vessels, "The vessels were measured."]),
                    tools=tools, routers=())
    own.ask("Please check this retinal photo.", image=demo_fundus_path)
    reply = own.ask("Are the arteries narrowed?")
    assert [(c.name, c.by) for c in reply.tool_calls] == [("measure_vessels", "model")]
    silent = Assistant(settings, chat_model=ScriptedChatModel(steps=["Here is what I found.", "I cannot measure that."]), tools=tools, routers=())
    silent.ask("Please check this retinal photo.", image=demo_fundus_path)
    assert silent.ask("Are the arteries narrowed?").tool_calls == []


def test_the_stored_history_says_who_wrote_what(settings, tools, demo_fundus_path):
    assistant = Assistant(settings, chat_model=ScriptedChatModel(steps=["The eye is healthy."]), tools=tools)
    reply = assistant.ask("Is something wrong with this eye?", image=demo_fundus_path)
    stored = assistant.graph.get_state(assistant.thread).values["messages"]
    pipeline_steps = [m for m in stored if isinstance(m, AIMessage) and m.additional_kwargs.get("by") == "pipeline"]
    assert pipeline_steps and all(c["id"].startswith("pipeline_") for m in pipeline_steps for c in m.tool_calls)
    record = stored[-1].additional_kwargs["ophglm_reply"]
    assert record["fallback"] is True and reply.fallback  # "healthy" did not hold: the answer is the code's
    assert [p["source"] for p in record["parts"]][0] == "removed" and {c["by"] for c in record["tool_calls"]} == {"pipeline"}


@pytest.mark.parametrize("question, vessels", [
    ("How is the blood supply of the retina?", True), ("Are the arteries narrowed?", True), ("视网膜供血好不好？", True),
    ("Und wie steht es um die Blutgefäße?", True), ("¿Cómo están los vasos sanguíneos?", True), ("रक्त वाहिकाएँ कैसी हैं?", True),
    ("What is glaucoma?", False), ("How urgent is it?", False),
])
def test_the_vessel_router_reads_the_users_languages(question, vessels):
    from ophglm.agent.routers import asks_about_vessels

    assert asks_about_vessels(question) is vessels


def test_a_plug_in_measurement_the_model_ran_answers_even_when_it_did_not_quote_it():
    from ophglm.agent.examination import Step
    from ophglm.agent.reply import Turn, compose

    measured = Step("measure_iop", {"image_id": "img-1"}, True, "Intraocular pressure of img-1: 18 mmHg.", by="model")
    turn = Turn(question="What is the eye pressure?", steps=[measured], model_answer="Here is what I found.", refusal="",
                evidence=[measured.summary], retrieved={}, probabilities={}, urgency=None, examined=None, examined_now=False)
    reply = compose(turn)
    assert reply.answer == "Here is what I found. Intraocular pressure of img-1: 18 mmHg."
    assert [(p.source, p.text) for p in reply.parts] == [("model", "Here is what I found."), ("added", measured.summary)]
    assert [(c.name, c.by) for c in reply.tool_calls] == [("measure_iop", "model")]
