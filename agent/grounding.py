"""Check an answer against the conversation's tool results and retrieved passages before anyone reads it.

A small LLM invents numbers, findings and citations, and copies its prompt. Each sentence is
read for what it claims (claims.py: subject and polarity, in English, Chinese, Spanish, German
and Hindi) and removed, with why, when:
- a number is not a figure of the quantity its clause names in a tool result ("vessel density
  is 5" needs a 5 about vessels); a measurement of this eye cannot come from a passage;
- a `[doc#section]` citation names no retrieved passage;
- a claim about this photograph disagrees with the classifier, read with its polarity: asserting
  or hedging a disease it gives under 0.5, denying one it gives 0.5 or more, certainty ("no
  doubt") under 0.9, a healthy eye against a likely disease, or any of these with no examined
  photograph; quoting the classifier's own probability is always fine;
- it states an urgency, by level or by time frame, other than the rule table's (a rule stated
  for anyone, "a sudden curtain needs urgent referral", is knowledge);
- it gives a disease as a measurement's value ("the blood supply is diabetic retinopathy");
- it claims of this photograph a sign no tool looks for, or a lesion against the segmenter's
  count; a general statement about a disease or sign needs a retrieved passage that discusses
  it (its citation is added) and whose neighbouring sentences hold most of its words;
- it repeats a tool's description instead of a finding.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from difflib import SequenceMatcher

from ophglm.agent import claims
from ophglm.agent.vocabulary import (DISEASE_NAMES, QUANTITIES, QUANTITY_PATTERNS, SIGN_PATTERNS, disease_names)

# Digits next to CJK or Devanagari letters are numbers too ("血管密度为3%"); next to Latin letters they are ids.
NUMBER = re.compile(r"(?<![A-Za-z0-9_.])\d+(?:\.\d+)?(?![A-Za-z0-9_])")
DECIMAL_COMMA = re.compile(r"(?<=\d),(?=\d{1,2}\b)")  # "0,95" in Spanish and German
CITATION = re.compile(r"\[([a-z0-9_]+#[a-z0-9-]+)\]")
SENTENCE = re.compile(r"(?<=[.!?])\s+")
SUPPORTED_PROBABILITY = 0.5
CERTAIN_PROBABILITY = 0.9  # "there is no doubt this is glaucoma" needs more than a favoured class
CLAUSE = re.compile(r";\s+|,\s+(?![^(]*\))")  # commas inside parentheses stay with their clause
COPIED_WORDS = 8
URGENCY_TOPIC = re.compile(r"\b(urgency|triage)\b")
KNOWLEDGE_COVERAGE = 0.65  # share of a general statement's content words two neighbouring passage sentences must hold
# Conditions and treatments beyond the classifier's classes and the signs, which knowledge statements are about.
TREATMENT_TERMS = re.compile(r"\b(myopia|occlusions?|implants?|injections?|drops|surgery|laser|vitamins?|atropine|steroids?)\b")
ABSOLUTE = re.compile(r"\b(only|always|never|all|whole|every|permanently|completely|cured?|guaranteed?|no side effects)\b")
# Sentences about the tools or the sources, not knowledge claims of their own.
TOOL_TALK = re.compile(r"\b(classifier|segmenter|tools?|triage|rule table|probabilit\w*|measured|measurement|findings?|found|lesions|"
                       r"knowledge base|described|passages?|sources?|reason)\b")
# The coverage rule reads English statements against English passages; these words mark Spanish and German.
NOT_ENGLISH = re.compile(r"\b(el|la|los|las|del|una|con|es|der|die|das|und|ist|ein|eine|mit)\b")


@dataclass
class GroundedAnswer:
    verdicts: list[tuple[str, str]] = field(default_factory=list)  # (sentence, why removed; "" = kept), in the answer's order

    @property
    def kept(self) -> list[str]:
        return [s for s, why in self.verdicts if not why]

    @property
    def removed_with_why(self) -> list[tuple[str, str]]:
        return [(s, why) for s, why in self.verdicts if why]

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
    problems = []
    for clause in CLAUSE.split(sentence):
        quantities = quantities_named(clause)  # a clause naming no quantity may quote any tool's number
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
    denied_of_photo = claims.stance(lowered) == "deny" and claims.is_about_the_photo(lowered)
    return p is not None and (_quotes_probability(sentence, p) or (p >= SUPPORTED_PROBABILITY) != denied_of_photo)


def named_diseases(sentence: str) -> list[str]:
    """The classes a sentence names, in any user language or by abbreviation; 'healthy' words name 'normal'."""
    text = sentence.lower()
    named = [d for d in DISEASE_NAMES if any(claims.name_matches(n, text) for n in disease_names(d))]
    named += [d for d in claims.abbreviated_diseases(sentence) if d not in named]
    if "normal" not in named and claims.HEALTHY.search(text):
        named.append("normal")
    return named


def _disease_conflicts(sentence: str, probabilities: dict[str, float]) -> list[str]:
    """Claims about the photograph (or the person's eye) that the classifier contradicts, read with their polarity."""
    text = sentence.lower()
    named = named_diseases(sentence)
    complement = claims.measurement_complement(text)
    if complement and (named_diseases(complement) or named_signs(complement)):
        return ["it gives a disease as the value of a measurement"]
    if not probabilities:  # no examined photograph: nothing backs a claim that the eye is healthy, or has a disease
        healthy = "normal" in named and claims.about_the_person(text) and _normal_stance(text) != "deny"
        diseased = [d for d in named if d != "normal"] and claims.PHOTO_DEIXIS.search(text) and claims.stance(text) != "deny"
        return ["no examined photograph shows a healthy eye"] if healthy else ["no photograph was examined"] if diseased else []
    if not claims.is_about_the_photo(text):
        return []
    problems = []
    for disease in named:
        p = probabilities.get(disease)
        if p is None or _quotes_probability(sentence, p):
            continue
        stance = _normal_stance(text) if disease == "normal" else claims.stance(text)
        name = "a healthy eye" if disease == "normal" else disease.replace("_", " ")
        if stance == "deny" and disease != "normal" and p >= SUPPORTED_PROBABILITY:
            problems.append(f"the classifier gives {name} {p:.2f}, so it cannot be ruled out")
        elif stance != "deny" and p < SUPPORTED_PROBABILITY:
            problems.append(f"the classifier does not support {name} ({p:.2f})")
        elif stance == "certain" and p < CERTAIN_PROBABILITY:
            problems.append(f"the classifier gives {name} {p:.2f}, not a certainty")
    if "normal" in named and _normal_stance(text) != "deny" and not _quotes_probability(sentence, probabilities.get("normal", -1)):
        problems += [f"the classifier gives {d.replace('_', ' ')} {p:.2f}, so the eye is not shown healthy"
                     for d, p in probabilities.items() if d != "normal" and p >= SUPPORTED_PROBABILITY]
    return problems


def _normal_stance(text: str) -> str:
    """How the clause that calls the eye healthy holds it ("nothing wrong with this eye, so no further checks": affirmed)."""
    clauses = [c for c in re.split(r"[;,]|\bso\b|，|；", text) if claims.HEALTHY.search(c) or any(n in c for n in disease_names("normal"))]
    stances = {claims.stance(_without_normal_names(c)) for c in clauses or [text]}
    return "deny" if "deny" in stances else stances.pop()


def _without_normal_names(text: str) -> str:
    """'no referable disease' and 'nothing wrong' name a healthy eye; their 'no' denies nothing."""
    for name in sorted((*disease_names("normal"), "no referable disease"), key=len, reverse=True):
        text = text.replace(name, " ")
    return claims.HEALTHY.sub(" ", text)


def named_signs(text: str) -> set[str]:
    lowered = text.lower()
    return {sign for sign, pattern in SIGN_PATTERNS.items() if pattern.search(lowered)}


def _discussing(term: str, passages: dict[str, str]) -> list[str]:
    """The passages that name a disease class or a sign."""
    if term in SIGN_PATTERNS:
        return [pid for pid, text in passages.items() if SIGN_PATTERNS[term].search(text.lower())]
    return [pid for pid, text in passages.items() if any(n in text.lower() for n in disease_names(term))]


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
    signs = sorted(named_signs(sentence) - signs_found)
    if signs and claims.PHOTO_DEIXIS.search(sentence.lower()):  # a passage tells what a sign is, not whether this eye has it
        return sentence, [f"{sign} in this photograph (no tool looks for it)" for sign in signs]
    needing_passage += signs
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
    """A sentence stating an urgency (by level or time frame) other than the rule table's; with no examined
    photograph, any urgency stated for this person (a general rule like 'CRVO needs urgent referral' is knowledge)."""
    stated = claims.stated_urgency(sentence)
    if not stated or len(stated) >= 3 or (claims.GENERAL_RULE.search(sentence) and not claims.about_the_person(sentence)):
        return []  # no level, the scale listed, or a rule for anyone
    if urgency is None:
        own = claims.about_the_person(sentence) or (len(stated) == 1 and URGENCY_TOPIC.search(sentence.lower()))
        return ["no examined photograph has an urgency from the rule table"] if own else []
    if urgency in stated:
        return []
    return [f"the rule table gives the urgency {urgency}"]


# How a sentence names each kind the segmenter counts (its codes: MA, HE, EX, SE).
LESION_WORDS = {"MA": QUANTITIES["microaneurysms"], "HE": QUANTITIES["haemorrhages"],
                "EX": QUANTITIES["hard exudates"], "SE": QUANTITIES["soft exudates"]}
LESION_KINDS = {"MA": "microaneurysms", "HE": "haemorrhages", "EX": "hard exudates", "SE": "soft exudates"}


def _lesion_conflicts(sentence: str, counts: dict[str, int], examined: bool) -> list[str]:
    """A lesion said to be in (or absent from) this photograph against the segmenter's count, clause by clause
    (a clause that states a number is the number check's)."""
    text = sentence.lower()
    if not claims.PHOTO_DEIXIS.search(text):
        return []
    problems = []
    # Clauses with their own subject ("... and there are ..."); a list ("no X, Y or Z") keeps its negation.
    for clause in re.split(r";\s+|,?\s+(?:and|but|while)\s+(?=(?:there|the|it|this|these|they|its?)\b)", text):
        kinds = [kind for kind, pattern in LESION_WORDS.items() if re.search(pattern, clause)]
        if not kinds or NUMBER.search(clause):
            continue
        if not examined:
            return ["no photograph was examined"]
        denied = claims.stance(clause) == "deny"
        for kind in kinds:
            if kind in counts and denied and counts[kind] > 0:
                problems.append(f"the segmenter counted {counts[kind]} {LESION_KINDS[kind]}")
            elif kind in counts and not denied and counts[kind] == 0:
                problems.append(f"the segmenter found no {LESION_KINDS[kind]}")
    return problems


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def _copies_a_description(sentence: str, descriptions: list[list[str]]) -> bool:
    """Most of the sentence is a tool's description (given as words): a long run copied, or a sentence about
    what a tool does ("This tool measures the blood vessels...") that follows its description."""
    words = _words(sentence)
    for source in descriptions:
        matcher = SequenceMatcher(None, words, source, autojunk=False)
        run = matcher.find_longest_match(0, len(words), 0, len(source)).size
        if run >= COPIED_WORDS and run >= 0.6 * len(words):
            return True
        if ("tool" in words[:3] and not NUMBER.search(sentence)
                and sum(b.size for b in matcher.get_matching_blocks()) >= 0.5 * len(words)):
            return True
    return False


def _unbacked_knowledge(sentence: str, passages: dict[str, str], found: EvidenceNumbers) -> bool:
    """A general statement about a disease or sign (not about this photograph, not a tool's finding) whose
    words no retrieved passage mostly holds: "Cataract can be dissolved with eye drops" is no passage's claim."""
    text = CITATION.sub(" ", sentence)
    if any(n in found.anywhere for n in NUMBER.findall(text)):  # it quotes a tool's figure: a finding, not knowledge
        return False
    if (claims.NON_LATIN.search(text) or NOT_ENGLISH.search(text.lower()) or not passages or claims.is_about_the_photo(text.lower())
            or TOOL_TALK.search(text.lower())):
        return False
    words = claims.content_words(text)
    # Only a statement about a disease or sign is knowledge to check (advice and courtesy are not), from three content words on.
    names_a_subject = ([d for d in named_diseases(text) if d != "normal"] or named_signs(text) or claims.abbreviated_diseases(text)
                       or TREATMENT_TERMS.search(text.lower()))
    if not names_a_subject or len(words) < 3:
        return False
    stems = [w[:5] for w in words]
    # A claim is held where a passage states it: within two neighbouring sentences, not scattered over the passage.
    spans = [" ".join(sentences[i:i + 2]).lower() for passage in passages.values()
             for sentences in [SENTENCE.split(passage)] for i in range(len(sentences))]
    # "Only", "always", "permanently", "no side effects": an absolute claim needs a passage sentence that says it too.
    absolutes = ABSOLUTE.findall(text.lower())
    spans = [span for span in spans if all(word in span for word in absolutes)]
    return max((sum(stem in held for stem in stems) / len(stems)
                for held in ({w[:5] for w in claims.content_words(span)} for span in spans)), default=0.0) < KNOWLEDGE_COVERAGE


def check_answer(answer: str, evidence: list[str], passages: dict[str, str], probabilities: dict[str, float] | None = None,
                 *, checks_urgency: bool = False, urgency: str | None = None, tool_descriptions: tuple[str, ...] = (),
                 lesion_counts: dict[str, int] | None = None) -> GroundedAnswer:
    """Drop sentences with numbers, citations or disease claims that no tool result supports.

    `passages` maps each retrieved passage's id to its text. With `checks_urgency`, a stated
    urgency level must be `urgency`, the rule table's level (None: there is none). A sentence
    copied from one of `tool_descriptions` is dropped. `lesion_counts` is the segmenter's count
    per lesion code (MA, HE, EX, SE) for the examined photograph: a lesion's claimed presence
    must agree with it.
    """
    probabilities = probabilities or {}
    # A knowledge search's result lists passages ("[doc#section] Title - Section: ..."): it says what a passage holds,
    # not what a tool found in this photograph.
    tool_results = [text for text in evidence if not text.startswith("[")]
    classifier_figures = [f"{d.replace('_', ' ')} {p}" for d, p in probabilities.items()]
    found_numbers = supported_numbers([*tool_results, *classifier_figures])
    # Numbers a passage gives are figures of what it discusses, for general statements.
    allowed = supported_numbers([*evidence, *passages.values(), *classifier_figures])
    signs_found = set().union(*(named_signs(text) for text in tool_results))
    descriptions = [_words(d) for d in tool_descriptions]
    verdicts = []
    sentences = SENTENCE.split(answer.strip())
    if len(sentences) > 1 and not sentences[-1].rstrip().endswith((".", "!", "?", ")", "]")):
        sentences.pop()  # cut off by the token limit: a half sentence can mislead
    for sentence in sentences:
        sentence = DECIMAL_COMMA.sub(".", sentence)
        bad_numbers = unsupported_numbers(sentence, found_numbers if claims.PHOTO_DEIXIS.search(sentence.lower()) else allowed)
        bad_citations = [c for c in CITATION.findall(sentence) if c not in passages]
        conflicts = (_disease_conflicts(sentence, probabilities) + (_urgency_conflict(sentence, urgency) if checks_urgency else [])
                     + _lesion_conflicts(sentence, lesion_counts or {}, bool(probabilities)))
        if _copies_a_description(sentence, descriptions):
            conflicts.append("it repeats a tool's description, not a finding")
        elif _unbacked_knowledge(sentence, passages, found_numbers):
            conflicts.append("no retrieved passage says this")
        sentence, unsupported = _knowledge_support(sentence, passages, probabilities, signs_found)
        if bad_numbers or bad_citations or conflicts or unsupported:
            why = ", ".join(bad_numbers
                            + [f"citation [{c}] was not retrieved" for c in bad_citations] + conflicts
                            + [f"no tool result or retrieved passage discusses {d}" for d in unsupported])
            verdicts.append((sentence.strip(), why))
        elif sentence.strip():
            verdicts.append((sentence.strip(), ""))
    return GroundedAnswer(verdicts)
