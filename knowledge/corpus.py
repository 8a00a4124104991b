"""The knowledge corpus as citable chunks.

Each markdown document has YAML-like front matter (id, title, aliases) and sections that
follow OphGLM's five aspects plus Sources. A chunk is one section of one document; its id
`doc_id#section-slug` is stable across rebuilds, so a citation in a stored conversation
still resolves after the index is rebuilt.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

ASPECTS = ("Visual diagnosis", "Causes and symptoms", "Diagnosis and examination", "Treatment and prevention", "Prognosis and lifestyle")


@dataclass(frozen=True)
class Chunk:
    id: str
    doc_id: str
    title: str
    section: str
    aliases: tuple[str, ...]
    text: str
    sources: str

    def embedding_text(self) -> str:
        # Title and section give a short section the context a bare paragraph lacks.
        return f"{self.title} ({', '.join(self.aliases[:6])}). {self.section}: {self.text}"


def default_corpus_dir() -> Path:
    return Path(str(resources.files("ophglm.knowledge") / "corpus"))


def _front_matter(text: str, path: Path) -> tuple[dict[str, object], str]:
    match = re.match(r"^---\n(.*?)\n---\n(.*)$", text, re.S)
    if not match:
        raise ValueError(f"{path}: missing front matter (--- id/title/aliases ---)")
    fields: dict[str, object] = {}
    for line in match[1].splitlines():
        key, _, value = line.partition(":")
        value = value.strip()
        if value.startswith("[") and value.endswith("]"):
            fields[key.strip()] = tuple(v.strip().strip("'\"") for v in value[1:-1].split(",") if v.strip())
        else:
            fields[key.strip()] = value.strip("'\"")
    for key in ("id", "title"):
        if not fields.get(key):
            raise ValueError(f"{path}: front matter lacks {key!r}")
    if fields["id"] != path.stem:
        raise ValueError(f"{path}: id {fields['id']!r} differs from the file name")
    return fields, match[2]


def _slug(section: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", section.lower()).strip("-")


def parse_document(path: Path) -> list[Chunk]:
    fields, body = _front_matter(path.read_text(encoding="utf-8"), path)
    sections = {m[1].strip(): m[2].strip() for m in re.finditer(r"^## (.+?)\n(.*?)(?=^## |\Z)", body, re.S | re.M)}
    missing = [a for a in ASPECTS if a not in sections]
    if missing:
        raise ValueError(f"{path}: missing sections {missing}")
    sources = sections.get("Sources", "")
    aliases = tuple(fields.get("aliases", ()))
    return [
        Chunk(f"{fields['id']}#{_slug(s)}", str(fields["id"]), str(fields["title"]), s, aliases, text, sources)
        for s, text in sections.items()
        if s != "Sources"
    ]


def load_corpus(folder: Path | None = None) -> list[Chunk]:
    folder = folder or default_corpus_dir()
    paths = sorted(folder.glob("*.md"))
    if not paths:
        raise ValueError(f"no markdown documents in {folder}")
    return [chunk for path in paths for chunk in parse_document(path)]


def corpus_fingerprint(chunks: list[Chunk]) -> str:
    """Changes whenever any chunk's text or metadata changes: the index is rebuilt then."""
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(repr(chunk).encode())
    return digest.hexdigest()[:16]
