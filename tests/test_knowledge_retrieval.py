"""Hybrid retrieval: abbreviations, misspellings, lay wording and eponyms find their documents;
off-topic questions find nothing. The lexical pieces are checked on their own first."""

import pytest

from ophglm.knowledge.corpus import load_corpus
from ophglm.knowledge.lexical import AliasMatcher, LexicalIndex, edit_distance, normalize, words


@pytest.fixture(scope="module")
def lexical():
    return LexicalIndex(load_corpus())


@pytest.mark.parametrize("a, b, distance", [("glaucoma", "glaukoma", 1), ("iritis", "irtiis", 1), ("retinopathy", "retinopathie", 2), ("", "abc", 3)])
def test_edit_distance_counts_slips(a, b, distance):
    assert edit_distance(a, b) == distance


def test_spellings_and_plurals_fold_together():
    assert normalize("oedema") == normalize("edema")
    assert normalize("haemorrhages") == normalize("hemorrhage")
    assert words("Frisén grade of papilloedema") == ["frisen", "grade", "of", "papilloedema"]


@pytest.mark.parametrize("question, repaired", [("glaukoma drops", ["glaucoma"]), ("does irits come back", ["iritis"]),
                                                ("diabetic retinopathie", ["retinopathy"]), ("opthalmologist", ["ophthalmologist"])])
def test_misspelt_words_are_repaired_against_the_corpus(lexical, question, repaired):
    assert lexical.read(question).repaired == repaired


@pytest.mark.parametrize("question", ["how do I treat a sprained ankle", "weather forecast for London", "coming back"])
def test_ordinary_english_words_are_left_alone(lexical, question):
    assert lexical.read(question).repaired == []


@pytest.mark.parametrize("question, doc", [
    ("CRVO treatment", "retinal_vein_occlusion"),
    ("crvo", "retinal_vein_occlusion"),
    ("is GA the same as dry AMD", "amd_dry"),
    ("a curtain is coming across my vision", "retinal_detachment"),
    ("what is the 4-2-1 rule", "dr_grading_scales"),
])
def test_aliases_name_their_documents(lexical, question, doc):
    assert doc in lexical.read(question).alias_docs


@pytest.mark.parametrize("question", ["what is the offside rule in football", "turn the light on", "eye changes from high blood pressure"])
def test_aliases_do_not_fire_on_loose_matches(lexical, question):
    # "rule" alone is not "4-2-1 rule", lower-case "on" is not optic neuritis ("ON"), and
    # scattered words in another order are not "high eye pressure"
    assert not lexical.read(question).alias_docs & {"dr_grading_scales", "optic_neuritis", "glaucoma"}


def test_two_letter_abbreviations_need_capitals():
    chunks = [c for c in load_corpus() if c.doc_id == "optic_neuritis"]
    matcher = AliasMatcher(chunks)
    assert matcher.match("ON and MS", [], []) == {"optic_neuritis"}
    assert matcher.match("on and ms", [], []) == set()


def test_terms_of_art_are_flagged(lexical):
    assert lexical.read("Hollenhorst plaque").jargon
    assert not lexical.read("symptoms of a heart attack").jargon


def _top_docs(index, question, n=3):
    return [p.doc_id for p in index.search(question)][:n]


@pytest.mark.parametrize("question, doc", [
    ("CRVO treatment", "retinal_vein_occlusion"),  # abbreviation
    ("glacoma symptoms", "glaucoma"),  # misspelling listed among the aliases
    ("will I go blind from glaukoma", "glaucoma"),  # misspelling repaired by spelling
    ("a curtain is coming down over my vision in one eye", "retinal_detachment"),  # lay wording
    ("can sugar damage the back of my eyes", "diabetic_retinopathy"),  # lay wording
    ("Hollenhorst plaque", "retinal_artery_occlusion"),  # eponym that MiniLM reads as noise
    ("papiledema Frisen grading", "papilloedema"),
])
def test_hybrid_search_finds_the_document(knowledge_index, question, doc):
    assert doc in _top_docs(knowledge_index, question), question


def test_an_abbreviation_reaches_the_right_section(knowledge_index):
    top_two = [p.id for p in knowledge_index.search("CRVO treatment")[:2]]
    assert "retinal_vein_occlusion#treatment-and-prevention" in top_two


def test_the_section_a_question_asks_for_joins_its_documents_best_passage(knowledge_index):
    # The treatment section of wet AMD ranked below two sections that repeat "wet AMD" and
    # "treatment", so search_knowledge's three passages never said how it is treated.
    passages = knowledge_index.search("How do doctors treat wet macular degeneration?", k=3)
    assert passages[0].doc_id == "amd_wet" and "amd_wet#treatment-and-prevention" in [p.id for p in passages[:2]]
    assert "anti-vegf" in passages[[p.id for p in passages].index("amd_wet#treatment-and-prevention")].text.lower()


@pytest.mark.parametrize("question", ["How do I bake sourdough bread?", "how do I treat a sprained ankle",
                                      "capital gains tax allowance this year", "python list comprehension with if else"])
def test_off_topic_questions_find_nothing(knowledge_index, question):
    assert knowledge_index.search(question) == []


def test_passages_are_complete_sorted_and_spread(knowledge_index):
    passages = knowledge_index.search("glaucoma eye drops and laser", k=5)
    assert len(passages) == 5
    assert [p.score for p in passages] == sorted((p.score for p in passages), reverse=True)
    assert all(p.id.startswith(p.doc_id + "#") and p.title and p.section and p.text for p in passages)
    docs = [p.doc_id for p in passages]
    assert max(docs.count(d) for d in docs) <= knowledge_index.retriever().fusion.max_per_doc


def test_min_similarity_overrides_the_dense_floor(knowledge_index):
    assert knowledge_index.search("How do I bake sourdough bread?", min_similarity=0.0)
    assert knowledge_index.search("CRVO treatment", min_similarity=1.1), "an alias still opens the gate"
