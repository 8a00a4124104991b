import pytest

from ophglm.knowledge.corpus import ASPECTS, load_corpus, parse_document
from ophglm.knowledge.index import KnowledgeIndex

REQUIRED = {"normal_fundus", "diabetic_retinopathy", "glaucoma", "cataract", "pathologic_myopia", "amd_dry", "amd_wet",
            "hypertensive_retinopathy", "retinal_vein_occlusion", "retinal_detachment", "diabetic_macular_oedema"}


def test_corpus_covers_the_required_topics_in_five_aspects():
    chunks = load_corpus()
    docs = {c.doc_id for c in chunks}
    assert REQUIRED <= docs and len(docs) >= 12
    for doc in docs:
        assert [c.section for c in chunks if c.doc_id == doc] == list(ASPECTS)
    assert all(c.sources.strip() for c in chunks), "every document names its sources"
    assert len({c.id for c in chunks}) == len(chunks)


@pytest.mark.parametrize("text, message", [
    ("# no front matter\n", "missing front matter"),
    ("---\nid: other\ntitle: T\n---\n", "differs from the file name"),
    ("---\nid: doc\ntitle: T\n---\n## Visual diagnosis\nx\n", "missing sections"),
])
def test_malformed_documents_are_named(tmp_path, text, message):
    path = tmp_path / "doc.md"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        parse_document(path)


def test_search_cites_the_right_passage(knowledge_index):
    passages = knowledge_index.search("What are the symptoms of glaucoma?")
    assert passages, "a core question must retrieve something"
    assert any("glaucoma" in p.doc_id for p in passages[:2])
    assert all(p.id.startswith(p.doc_id + "#") for p in passages)
    assert passages == sorted(passages, key=lambda p: -p.score)


@pytest.mark.parametrize("question", ["How do I bake sourdough bread?", "Who won the football match yesterday?"])
def test_off_topic_questions_retrieve_nothing(knowledge_index, question):
    assert knowledge_index.search(question) == []


def test_index_is_reused_and_an_unfinished_build_is_redone(settings, knowledge_index):
    again = KnowledgeIndex(settings)
    assert again.name == knowledge_index.name
    assert again.collection().count() == len(again.chunks)
    # simulate a crash mid-build: the collection exists but was never marked complete
    again.collection().modify(metadata={"complete": False})
    fresh = KnowledgeIndex(settings)
    assert (fresh.collection().metadata or {}).get("complete") is True
    assert fresh.collection().count() == len(fresh.chunks)
