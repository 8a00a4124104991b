"""How an answer names a finding, in the languages the scenarios are written in: the evaluation's own words.

Kept apart from the grounding check's vocabulary on purpose (an evaluation never reuses the
code it judges): `ophglm eval agent` decides here whether the model's sentences name the
classifier's finding, the urgency level or "nothing found", quote a number, and are written
in the scenario's language.
"""

from __future__ import annotations

import re

FINDING_WORDS: dict[str, tuple[str, ...]] = {
    "diabetic_retinopathy": ("diabetic retinopathy", "diabetic eye disease", "糖尿病视网膜病变", "糖尿病性视网膜病变", "糖网",
                             "retinopatía diabética", "diabetische retinopathie", "डायबिटिक रेटिनोपैथी", "मधुमेह"),
    "glaucoma": ("glaucoma", "glaukom", "青光眼", "ग्लूकोमा", "काला मोतिया"),
    "cataract": ("cataract", "catarata", "katarakt", "grauer star", "白内障", "मोतियाबिंद"),
    "pathologic_myopia": ("myopia", "myopic", "miopía", "myopie", "近视", "मायोपिया", "निकट दृष्टि"),
    "normal": ("no referable disease", "normal", "healthy", "no disease", "正常", "健康", "未见", "sano", "gesund", "unauffällig",
               "सामान्य", "स्वस्थ"),
    "urgency:urgent": ("urgent", "immediately", "same day", "紧急", "立即", "urgente", "dringend", "sofort", "तुरंत", "आपातकालीन"),
    "urgency:soon": ("soon", "within weeks", "within a few weeks", "尽快", "几周内", "pronto", "semanas", "bald", "wochen",
                     "जल्द", "सप्ताह"),
    "urgency:routine": ("routine", "next screening", "常规", "例行", "rutina", "routine", "routinemäßig", "नियमित"),
    "urgency:none": ("no referral", "none", "usual screening", "不需要转诊", "无需", "ninguna", "keine überweisung", "कोई आवश्यकता नहीं"),
    "none_found": ("no microaneurysms", "no lesions", "no haemorrhages", "found no", "none", "没有", "未发现", "ningún", "ninguna",
                   "keine", "कोई नहीं"),
}
STOPWORDS = {
    "en": {"the", "is", "and", "of", "this", "in", "a", "to", "with", "are"},
    "es": {"el", "la", "de", "que", "es", "en", "los", "las", "una", "con", "del", "por"},
    "de": {"der", "die", "das", "und", "ist", "nicht", "ein", "eine", "mit", "auf", "den", "im"},
}
NUMBER = re.compile(r"(?<![\w.,])\d+(?:[.,]\d+)?")
CJK = re.compile(r"[\u4e00-\u9fff]")
DEVANAGARI = re.compile(r"[\u0900-\u097f]")


def names_finding(text: str, key: str) -> bool:
    lowered = text.lower()
    return any(word in lowered for word in FINDING_WORDS[key])


def numbers_in(text: str) -> list[float]:
    return [float(n.replace(",", ".")) for n in NUMBER.findall(text)]


def quotes_number(text: str, value: float) -> bool:
    """The text gives `value` as written or rounded (two decimals, one, whole), or as a percentage of a share."""
    return any(abs(n - value) <= 0.0051 or abs(n - round(value, 1)) < 1e-9 or abs(n - round(value)) < 1e-9 and value >= 10
               or (0 <= value <= 1 and abs(n - 100 * value) <= 0.51) for n in numbers_in(text))


def in_language(text: str, lang: str) -> bool:
    """A rough script and function-word test: enough to tell an English answer to a Chinese question."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return False
    if lang == "zh":
        return len(CJK.findall(text)) >= 0.3 * len(letters)
    if lang == "hi":
        return len(DEVANAGARI.findall(text)) >= 0.3 * len(letters)
    words = re.findall(r"[a-záéíóúñüäöß]+", text.lower())
    if not words or lang not in STOPWORDS:
        return False
    hits = {code: sum(w in stop for w in words) for code, stop in STOPWORDS.items()}
    return hits[lang] > 0 and hits[lang] == max(hits.values())
