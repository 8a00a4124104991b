"""The Chroma side: re-indexing embeds only what changed, and a real `chroma run` server works.

Both tests index a small copy of a few corpus documents, so they stay quick.
"""

import hashlib
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ophglm.knowledge import index as index_module
from ophglm.knowledge.corpus import default_corpus_dir, load_corpus
from ophglm.knowledge.index import COLLECTION_PREFIX, KnowledgeIndex, chroma_client
from ophglm.settings import load_settings

DOCS = ("retinal_vein_occlusion", "glaucoma", "cataract")


@pytest.fixture
def corpus_copy(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for doc in DOCS:
        shutil.copy(default_corpus_dir() / f"{doc}.md", folder)
    return folder


@pytest.fixture
def embedded(monkeypatch):
    """Records every text sent to the embedder; vectors are a stable hash (no model needed)."""
    texts: list[str] = []

    def fake_embed(batch, progress=False):
        texts.extend(batch)
        vectors = np.stack([np.random.default_rng(int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)).normal(size=384) for t in batch])
        return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)

    monkeypatch.setattr(index_module, "embed", fake_embed)
    return texts


def _vectors(collection) -> dict[str, np.ndarray]:
    got = collection.get(include=["embeddings"])
    return dict(zip(got["ids"], map(np.asarray, got["embeddings"])))


def test_only_changed_documents_are_re_embedded(tmp_path, corpus_copy, embedded):
    settings = load_settings(chroma_path=str(tmp_path / "chroma"))
    first = KnowledgeIndex(settings, load_corpus(corpus_copy))
    assert first.build() == 15 and len(embedded) == 15
    before = _vectors(first.collection())

    # one section of one document changes: only that chunk is embedded again
    path = corpus_copy / "cataract.md"
    path.write_text(path.read_text().replace("## Treatment and prevention\n", "## Treatment and prevention\nSurgery is the only cure. "))
    embedded.clear()
    second = KnowledgeIndex(settings, load_corpus(corpus_copy))
    assert second.name != first.name
    assert second.build() == 15
    assert [t.split(". ")[1] for t in embedded] == ["Treatment and prevention: Surgery is the only cure"]
    after = _vectors(second.collection())
    assert all(np.allclose(before[id_], after[id_]) for id_ in before if id_ != "cataract#treatment-and-prevention")

    # a document's aliases belong to every one of its chunks: all five, and no others
    path.write_text(path.read_text().replace("aliases: [", "aliases: [lens clouding, "))
    embedded.clear()
    third = KnowledgeIndex(settings, load_corpus(corpus_copy))
    third.build()
    assert len(embedded) == 5 and all(t.startswith("Cataract") for t in embedded)
    names = {c.name for c in chroma_client(settings).list_collections()}
    assert names == {third.name}, "older complete builds are retired once the new one is complete"


def test_an_interrupted_build_resumes_without_serving_half_an_index(tmp_path, corpus_copy, embedded):
    settings = load_settings(chroma_path=str(tmp_path / "chroma"))
    chunks = load_corpus(corpus_copy)
    KnowledgeIndex(settings, chunks).build()
    # a crash after writing part of the vectors: the collection is never marked complete
    crashed = chroma_client(settings).get_collection(KnowledgeIndex(settings, chunks).name)
    crashed.delete(ids=[c.id for c in chunks if c.doc_id == "glaucoma"])
    crashed.modify(metadata={"complete": False})
    embedded.clear()
    resumed = KnowledgeIndex(settings, chunks)
    assert resumed.collection().count() == 15 and resumed.collection().metadata["complete"] is True
    assert len(embedded) == 5 and all(t.startswith("Primary open-angle glaucoma") for t in embedded)


def test_a_forced_rebuild_embeds_everything(tmp_path, corpus_copy, embedded):
    settings = load_settings(chroma_path=str(tmp_path / "chroma"))
    KnowledgeIndex(settings, load_corpus(corpus_copy)).build()
    embedded.clear()
    assert KnowledgeIndex(settings, load_corpus(corpus_copy)).build(force=True) == 15
    assert len(embedded) == 15


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def chroma_server(tmp_path):
    """A real `chroma run` on a free loopback port, stopped after the test."""
    import chromadb
    from chromadb.config import Settings as ChromaSettings

    executable = Path(sys.executable).parent / "chroma"
    if not executable.exists():
        pytest.skip(f"no chroma executable next to {sys.executable}")
    port = _free_port()
    log = tmp_path / "chroma.log"
    with log.open("w") as out:
        server = subprocess.Popen([str(executable), "run", "--path", str(tmp_path / "server"), "--host", "127.0.0.1", "--port", str(port)],
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                chromadb.HttpClient(host="127.0.0.1", port=port, settings=ChromaSettings(anonymized_telemetry=False)).heartbeat()
                break
            except Exception:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"chroma server did not answer on port {port}: {log.read_text()[-2000:]}")
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()


def test_chroma_server_builds_searches_and_reuses(chroma_server, corpus_copy, monkeypatch):
    settings = load_settings(chroma_url=chroma_server)
    chunks = load_corpus(corpus_copy)
    index = KnowledgeIndex(settings, chunks)
    assert index.build() == 15
    assert index.name.startswith(COLLECTION_PREFIX)
    top = index.search("CRVO treatment")
    assert top and top[0].doc_id == "retinal_vein_occlusion"
    assert index.search("how do I bake sourdough bread") == []
    # a second process-like client finds the complete collection and embeds nothing
    calls = []
    monkeypatch.setattr(index_module, "embed", lambda texts, progress=False: calls.append(texts))
    assert KnowledgeIndex(settings, chunks).collection().count() == 15
    assert calls == []
