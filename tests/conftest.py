"""Shared fixtures: offline by default, temporary cache and Chroma folders, the shared data path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "MANIFEST.csv").is_file():
        pytest.skip(f"real data not present at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def settings(tmp_path_factory):
    """Settings with a private Chroma folder; the LLM cache is shared so conversion happens once."""
    from ophglm.settings import load_settings

    chroma = tmp_path_factory.mktemp("chroma")
    return load_settings(chroma_path=str(chroma))


@pytest.fixture(scope="session")
def knowledge_index(settings):
    from ophglm.knowledge.index import KnowledgeIndex

    index = KnowledgeIndex(settings)
    index.build()
    return index


@pytest.fixture(scope="session")
def demo_fundus_path(tmp_path_factory):
    from ophglm.tools.synthetic_fundus import make_synthetic_fundus

    fundus = make_synthetic_fundus(size=768, seed=3)
    path = tmp_path_factory.mktemp("images") / "demo.png"
    fundus.image.save(path)
    return path
