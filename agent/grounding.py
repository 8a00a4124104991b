"""Check an answer against the session's tool results before anyone reads it.

A small LLM invents numbers and citations. Every number in the answer must appear in a
tool result of this conversation (as written, or rounded), as a figure of the quantity the
answer's clause names: "vessel density is 5" needs a 5 in a clause about vessels, not
another tool's 5 (a clause naming no quantity may quote any tool's number). Every
`[doc#section]` citation must name a passage that was retrieved. A sentence that fails is
removed, and the reply says so. A sentence that says what *this* photograph shows ("your eye has glaucoma",
"the eye is healthy") must agree with the classifier: naming a disease it gives less than
0.5, or denying one it gives 0.5 or more, removes the sentence. General statements about
a disease ("glaucoma damages the optic nerve") are knowledge: a retrieved passage must
discuss that disease; the sentence keeps its own citation of one, or gets one added, so the
reader can trace it. A disease named by neither the classifier nor any passage is removed.
A clinical sign ("a cherry-red spot", "drusen", "neovascularisation") follows the same rule
whether asserted or denied: a tool result of the conversation must name it (the segmenter
reports haemorrhages, exudates...), or a retrieved passage must discuss it (and is cited);
no tool looks for a cherry-red spot, so neither "there is one" nor "there is none" is a
finding. The urgency is the rule table's: a sentence that states another level ("the referral
urgency is routine" when the table says soon, or any level when no photograph was
examined) is removed. A small model also copies a tool's description from its prompt ("The
referral urgency (urgent, soon, routine or none) that OphGLM's rule table gives..."): such
a sentence says nothing about this eye and is removed too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from difflib import SequenceMatcher

NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?![\w])")
CITATION = re.compile(r"\[([a-z0-9_]+#[a-z0-9-]+)\]")
SENTENCE = re.compile(r"(?<=[.!?])\s+")
# How an answer may name each class the classifier knows (lower case).
DISEASE_NAMES = {
    "diabetic_retinopathy": ("diabetic retinopathy", "diabetic eye disease"),
    "glaucoma": ("glaucoma", "glaucomatous"),
    "cataract": ("cataract",),
    "pathologic_myopia": ("pathologic myopia", "pathological myopia", "myopic maculopathy"),
    "amd": ("macular degeneration", "amd"),
    "hypertensive_retinopathy": ("hypertensive retinopathy",),
    "normal": ("healthy", "normal eye", "is normal", "looks normal", "no disease", "nothing wrong"),
}
ABOUT_THE_PHOTO = re.compile(r"\b(this|the|your) (eye|photo|photograph|picture|image|fundus|retina)\b|\b(shows?|consistent with|suggests?|appears?|looks?|there is|there are|there's)\b")
DENIAL = re.compile(r"\b(no|not|without|unlikely|absent|rules? out)\b")
SUPPORTED_PROBABILITY = 0.5
# The quantities a number can be a figure of, and how a clause (of a tool result or of an answer) names them.
QUANTITIES = {
    "microaneurysms": r"micro-?aneurysms?",
    "haemorrhages": r"ha?emorrhag\w*",
    "hard exudates": r"hard exudates?|(?<!soft )exudates?",
    "soft exudates": r"soft exudates?|cotton[- ]wool",
    "cup-to-disc ratio": r"cup[- ]to[- ]disc|\bcdr\b",
    "vessel density": r"\bvessels?\b|\bvascular",
    "normal": r"\bnormal\b|\bhealthy\b|no referable disease",
} | {disease: "|".join(rf"\b{re.escape(n)}\b" for n in names) for disease, names in DISEASE_NAMES.items() if disease != "normal"}
QUANTITY_PATTERNS = {quantity: re.compile(pattern) for quantity, pattern in QUANTITIES.items()}
# Signs an answer may name, each with the ways it is written (lower case). A tool result or a passage
# naming the sign in any of these ways supports it.
SIGNS = {
    "microaneurysms": r"micro-?aneurysms?",
    "haemorrhages": r"ha?emorrhag\w*|\bblots?\b|flame[- ]shaped",
    "exudates": r"exudates?",
    "cotton-wool spots": r"cotton[- ]wool",
    "drusen": r"\bdrusen\b",
    "neovascularisation": r"neovasculari[sz]\w*|new vessels",
    "macular oedema": r"macular o?edema|\bcsme\b|\bdme\b",
    "cherry-red spot": r"cherry[- ]red",
    "papilloedema": r"papill?o?edema|swollen (optic )?disc|disc (swelling|o?edema)",
    "retinal detachment": r"detach\w*",
    "venous beading": r"venous beading|beaded veins?",
    "intraretinal microvascular abnormalities": r"\birma\b|intraretinal microvascular",
    "vessel tortuosity": r"tortuo\w+",
    "arteriovenous nicking": r"\bav nicking|arterio-?venous nicking|nipping",
    "peripapillary atrophy": r"peripapillary atrophy|\bppa\b",
    "tessellation": r"tessellat\w+|tigroid",
    "lacquer cracks": r"lacquer cracks?",
    "fuchs spot": r"fuchs'? spot",
    "staphyloma": r"staphyloma",
    "geographic atrophy": r"geographic atrophy",
    "disc pallor": r"pallor|pale (optic )?disc",
    "rim notching": r"notch\w*",
    "vessel occlusion": r"occlu\w+",
    "emboli": r"embol\w+",
    "laser scars": r"photocoagulation|laser scars?",
    "pigmentary changes": r"pigment\w*|bone[- ]spicule",
    "naevus": r"na?evus|na?evi\b",
    "tumour": r"melanoma|retinoblastoma|tumou?r",
    "macular hole": r"macular hole|retinal (hole|tear)",
    "epiretinal membrane": r"epiretinal",
    "copper or silver wiring": r"(copper|silver)[- ]wir\w+",
}
SIGN_PATTERNS = {sign: re.compile(pattern) for sign, pattern in SIGNS.items()}
CLAUSE = re.compile(r";\s+|,\s+(?![^(]*\))")  # commas inside parentheses stay with their clause
COPIED_WORDS = 8
URGENCY_TOPIC = re.compile(r"\b(urgency|triage)\b")  # "the urgency is ...": a claim; "needs urgent referral" is knowledge
URGENCY_LEVEL = {"urgent": r"\burgent(ly)?\b", "soon": r"\bsoon\b", "routine": r"\broutine\b", "none": r"\bnone\b"}


@dataclass
class GroundedAnswer:
    kept: list[str] = field(default_factory=list)
    removed_with_why: list[tuple[str, str]] = field(default_factory=list)  # (sentence, why)

    @property
    def text(self) -> str:
        return " ".join(self.kept)

    @property
    def removed(self) -> list[str]:
        """The sentences taken out, each followed by why in parentheses."""
        return [f"{s} ({why})" for s, why in self.removed_with_why]


def _variants(number: str) -> set[str]:
    """Ways a tool's number may be quoted: as is, rounded, or as a percentage of a probability."""
    value = float(number)
    forms = {number, f"{value:g}"}
    for digits in range(0, 3):
        forms.add(f"{value:.{digits}f}")
    if 0 <= value <= 1:
        forms |= {f"{100 * value:.0f}", f"{100 * value:.1f}"}
    return forms


def quantities_named(text: str) -> set[str]:
    lowered = text.lower()
    return {q for q, pattern in QUANTITY_PATTERNS.items() if pattern.search(lowered)}


@dataclass
class EvidenceNumbers:
    """Every number of the tool results (as they may be quoted), and those of each quantity."""
    anywhere: set[str] = field(default_factory=set)
    by_quantity: dict[str, set[str]] = field(default_factory=dict)


def supported_numbers(evidence: list[str]) -> EvidenceNumbers:
    found = EvidenceNumbers()
    for text in evidence:
        for sentence in SENTENCE.split(text):
            sentence_quantities = quantities_named(sentence)
            for clause in CLAUSE.split(sentence):
                numbers = {form for number in NUMBER.findall(clause) for form in _variants(number)}
                found.anywhere |= numbers
                for quantity in quantities_named(clause) or sentence_quantities:
                    found.by_quantity.setdefault(quantity, set()).update(numbers)
    return found


def unsupported_numbers(sentence: str, numbers: EvidenceNumbers) -> list[str]:
    """Why each number of an answer sentence that no tool result gives for its quantity is unsupported."""
    problems, sentence_quantities = [], quantities_named(sentence)
    for clause in CLAUSE.split(sentence):
        quantities = quantities_named(clause) or sentence_quantities
        allowed = set().union(*(numbers.by_quantity.get(q, set()) for q in quantities)) if quantities else numbers.anywhere
        for number in NUMBER.findall(clause):
            if number in allowed or f"{float(number):g}" in allowed:
                continue
            if quantities and (number in numbers.anywhere or f"{float(number):g}" in numbers.anywhere):
                problems.append(f"number {number} is not a {' or '.join(sorted(quantities)).replace('_', ' ')} figure in any tool result")
            else:
                problems.append(f"number {number} not in any tool result")
    return problems


def _quotes_probability(sentence: str, p: float) -> bool:
    """The sentence gives `p` to two decimals or as a whole percentage (the tools round p before the findings do)."""
    return any(abs(float(n) - p) <= 0.0051 or abs(float(n) - 100 * p) <= 0.51 for n in NUMBER.findall(sentence))


def classifier_supports(sentence: str, p: float | None) -> bool:
    """The classifier backs the sentence's mention of a disease it gives `p`: it favours the disease,
    or the sentence denies it of the photograph while the classifier disfavours it, or the sentence quotes p."""
    lowered = sentence.lower()
    denied_of_photo = bool(DENIAL.search(lowered) and ABOUT_THE_PHOTO.search(lowered))
    return p is not None and (_quotes_probability(sentence, p) or (p >= SUPPORTED_PROBABILITY) != denied_of_photo)


def named_diseases(sentence: str) -> list[str]:
    """The classes a sentence names (lower-cased matching on whole words)."""
    text = sentence.lower()
    return [d for d, names in DISEASE_NAMES.items() if any(re.search(rf"\b{re.escape(n)}\b", text) for n in names)]


def _disease_conflicts(sentence: str, probabilities: dict[str, float]) -> list[str]:
    """Claims about the photograph that the classifier's probabilities contradict."""
    text = sentence.lower()
    if not probabilities or not ABOUT_THE_PHOTO.search(text):
        return []
    denied = bool(DENIAL.search(text))
    problems = []
    for disease in named_diseases(text):
        if disease not in probabilities:
            continue
        p = probabilities[disease]
        if disease == "normal" and not denied and p < SUPPORTED_PROBABILITY:
            problems.append(f"the classifier does not support a healthy eye (normal {p:.2f})")
        elif disease != "normal" and denied and p >= SUPPORTED_PROBABILITY:
            problems.append(f"the classifier gives {disease.replace('_', ' ')} {p:.2f}, so it cannot be ruled out")
        elif disease != "normal" and not denied and p < SUPPORTED_PROBABILITY:
            problems.append(f"the classifier does not support {disease.replace('_', ' ')} ({p:.2f})")
    return problems


def named_signs(text: str) -> set[str]:
    lowered = text.lower()
    return {sign for sign, pattern in SIGN_PATTERNS.items() if pattern.search(lowered)}


def _discussing(term: str, passages: dict[str, str]) -> list[str]:
    """The passages that name a disease class or a sign."""
    if term in SIGN_PATTERNS:
        return [pid for pid, text in passages.items() if SIGN_PATTERNS[term].search(text.lower())]
    return [pid for pid, text in passages.items() if any(n in text.lower() for n in DISEASE_NAMES[term])]


def _knowledge_support(sentence: str, passages: dict[str, str], probabilities: dict[str, float],
                       signs_found: set[str]) -> tuple[str, list[str]]:
    """(the sentence, with a citation added where it needs one; diseases and signs nothing supports).

    A tool finding needs no passage: a disease the classifier favours, one whose probability
    the sentence quotes, one the sentence denies of the photograph while the classifier
    disfavours it, or a sign a tool result names (`signs_found`). Any other disease or sign
    must be discussed by a passage the sentence cites, or by one that was retrieved (its
    citation is then added).
    """
    cited = [c for c in CITATION.findall(sentence) if c in passages]
    needing_passage = [d for d in named_diseases(sentence) if d != "normal" and not classifier_supports(sentence, probabilities.get(d))]
    needing_passage += sorted(named_signs(sentence) - signs_found)
    unsupported, to_cite = [], []
    for term in needing_passage:
        discussing = _discussing(term, passages)
        if any(c in discussing for c in cited):
            continue
        if not discussing:
            unsupported.append(term.replace("_", " "))
        elif discussing[0] not in to_cite:
            to_cite.append(discussing[0])
    if to_cite and not unsupported:
        stripped = sentence.rstrip()
        end = stripped[-1] if stripped[-1:] in ".!?" else ""
        sentence = f"{stripped[: len(stripped) - len(end)]} {' '.join(f'[{c}]' for c in to_cite)}{end}"
    return sentence, unsupported


def _urgency_conflict(sentence: str, urgency: str | None) -> list[str]:
    """A sentence about the urgency that states one level other than the rule table's (listing the scale is no claim)."""
    text = sentence.lower()
    if not URGENCY_TOPIC.search(text):
        return []
    stated = [level for level, pattern in URGENCY_LEVEL.items() if re.search(pattern, text)]
    if len(stated) != 1 or stated[0] == urgency:
        return []
    return [f"the rule table gives the urgency {urgency}" if urgency else "no examined photograph has an urgency from the rule table"]


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def _copies_a_description(sentence: str, descriptions: list[list[str]]) -> bool:
    """Most of the sentence (at least COPIED_WORDS words in a row) is a tool's description (given as words)."""
    words = _words(sentence)
    for source in descriptions:
        run = SequenceMatcher(None, words, source, autojunk=False).find_longest_match(0, len(words), 0, len(source)).size
        if run >= COPIED_WORDS and run >= 0.6 * len(words):
            return True
    return False


def check_answer(answer: str, evidence: list[str], passages: dict[str, str], probabilities: dict[str, float] | None = None,
                 *, checks_urgency: bool = False, urgency: str | None = None, tool_descriptions: tuple[str, ...] = ()) -> GroundedAnswer:
    """Drop sentences with numbers, citations or disease claims that no tool result supports.

    `passages` maps each retrieved passage's id to its text. With `checks_urgency`, a stated
    urgency level must be `urgency`, the rule table's level (None: there is none). A sentence
    copied from one of `tool_descriptions` is dropped.
    """
    allowed = supported_numbers(evidence)
    signs_found = set().union(*(named_signs(text) for text in evidence))
    descriptions = [_words(d) for d in tool_descriptions]
    probabilities = probabilities or {}
    kept, removed = [], []
    sentences = SENTENCE.split(answer.strip())
    if len(sentences) > 1 and not sentences[-1].rstrip().endswith((".", "!", "?", ")", "]")):
        sentences.pop()  # cut off by the token limit: a half sentence can mislead
    for sentence in sentences:
        bad_numbers = unsupported_numbers(sentence, allowed)
        bad_citations = [c for c in CITATION.findall(sentence) if c not in passages]
        conflicts = _disease_conflicts(sentence, probabilities) + (_urgency_conflict(sentence, urgency) if checks_urgency else [])
        if _copies_a_description(sentence, descriptions):
            conflicts.append("it repeats a tool's description, not a finding")
        sentence, unsupported = _knowledge_support(sentence, passages, probabilities, signs_found)
        if bad_numbers or bad_citations or conflicts or unsupported:
            why = ", ".join(bad_numbers
                            + [f"citation [{c}] was not retrieved" for c in bad_citations] + conflicts
                            + [f"no tool result or retrieved passage discusses {d}" for d in unsupported])
            removed.append((sentence.strip(), why))
        elif sentence.strip():
            kept.append(sentence.strip())
    return GroundedAnswer(kept, removed)
