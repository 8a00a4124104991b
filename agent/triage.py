"""The triage level comes from a rule table over the findings, not from the LLM.

Levels: urgent (same day / within days), soon (within weeks), routine (next planned
review), none (no referable finding). The first matching rule decides; each rule carries
its reason, which the reply shows. Rules only read findings the tools produced, so a level
is always traceable. Signs the current tools cannot see (neovascularisation, retinal
detachment) cannot raise a level: the "uncertain" reason says so when nothing matches.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable

from ophglm.session import Session
from ophglm.tools.base import ImageInput, Tool, ToolError, ToolResult
from ophglm.tools.classify_fundus import probabilities_of

LEVELS = ("urgent", "soon", "routine", "none")


@dataclass(frozen=True)
class Triage:
    level: str
    reason: str
    rule: str


# The lesion and disc measurements need the classifier's corroboration: the segmenters learned
# from IDRiD and Drishti-GS alone, and on photographs from other cameras they find "lesions" on
# most healthy retinas and cup-to-disc ratios of 0.7 or more on a fifth of them. The values
# below were chosen by `python benchmarks/triage.py --choose` on the "choose" half of the
# validation photographs only; the accuracy to quote is the other half's (README).
MACULAR_EXUDATES_MIN_DR = 0.5  # p(diabetic retinopathy) for exudates at the fovea to make it urgent
LARGE_CUP_MIN_GLAUCOMA = 0.3  # p(glaucoma) for a large cup to refer
GLAUCOMA_MIN = 0.6  # p(glaucoma) for a glaucoma-suspect referral
# "No referable disease": no rule above matched (no disease reached its threshold), the classifier
# gives "normal" at least this, and the lesion map holds no large area (a safety margin).
NORMAL_MIN_PROBABILITY = 0.4
NORMAL_MAX_LESION_AREA = 5.0  # % of field of view, haemorrhages + hard exudates + cotton-wool spots


def _p(findings: dict, name: str) -> float:
    return findings.get("classify_fundus", {}).get("probabilities", {}).get(name, {}).get("value", 0.0)


def _lesion(findings: dict, code: str, measure: str) -> float:
    return findings.get("segment_lesions", {}).get("lesions", {}).get(code, {}).get(measure, {}).get("value", 0)


def _count(findings: dict, code: str) -> int:
    return _lesion(findings, code, "count")


def _macular_exudates(findings: dict) -> bool:
    return (bool(findings.get("segment_lesions", {}).get("macular_exudates", {}).get("value")) and _count(findings, "EX") > 0
            and _p(findings, "diabetic_retinopathy") >= MACULAR_EXUDATES_MIN_DR)


def _looks_normal(findings: dict) -> bool:
    lesion_area = sum(_lesion(findings, code, "area") for code in ("HE", "EX", "SE"))
    counted = sum(_count(findings, code) for code in ("HE", "EX", "SE"))
    return _p(findings, "normal") >= NORMAL_MIN_PROBABILITY and (counted == 0 or lesion_area <= NORMAL_MAX_LESION_AREA)


def _cdr(findings: dict) -> float:
    disc = findings.get("measure_optic_disc", {})
    return disc.get("vertical_cdr", {}).get("value", 0.0) if disc.get("reliable") else 0.0


# (rule id, level, condition over findings, reason). A reason that rests on the classifier quotes
# its probability, so the sentence is traceable (and checkable) wherever it is repeated.
RULES: list[tuple[str, str, Callable[[dict], bool], str]] = [
    ("macular-exudates", "urgent", _macular_exudates,
     "hard exudates lie within one disc diameter of the fovea (possible macular oedema, sight-threatening): refer urgently"),
    ("dr-moderate-signs", "soon", lambda f: _p(f, "diabetic_retinopathy") >= 0.5 and (_count(f, "HE") >= 5 or _count(f, "SE") >= 1),
     "diabetic retinopathy is likely (classifier {diabetic_retinopathy:.2f}) and there are several haemorrhages or cotton-wool spots: refer to an eye clinic within weeks"),
    ("glaucoma-suspect", "soon", lambda f: _p(f, "glaucoma") >= GLAUCOMA_MIN,
     "the classifier gives glaucoma {glaucoma:.2f}, a glaucoma suspect: refer for eye pressure, optic nerve and visual field tests within weeks"),
    ("large-cup", "soon", lambda f: _cdr(f) >= 0.7 and _p(f, "glaucoma") >= LARGE_CUP_MIN_GLAUCOMA,
     "the vertical cup-to-disc ratio is 0.7 or more: refer for an optic nerve assessment (eye pressure, visual field) within weeks"),
    ("pathologic-myopia", "soon", lambda f: _p(f, "pathologic_myopia") >= 0.5,
     "signs of pathologic myopia (classifier {pathologic_myopia:.2f}): refer for a retinal examination (OCT) within weeks"),
    ("dr-mild", "routine", lambda f: _p(f, "diabetic_retinopathy") >= 0.5,
     "diabetic retinopathy is likely (classifier {diabetic_retinopathy:.2f}) with few lesions: review at the next screening or as the eye service advises"),
    ("cataract", "routine", lambda f: _p(f, "cataract") >= 0.5,
     "the view is hazy as with cataract (classifier {cataract:.2f}): routine referral if vision is affected"),
    ("normal", "none", _looks_normal,
     "no referable disease was found: keep to the usual screening interval"),
]


def triage(findings: dict[str, Any]) -> Triage | None:
    """Apply the table to one turn's findings (keyed by tool name); None if no image was examined."""
    if "classify_fundus" not in findings:
        return None
    for rule, level, condition, reason in RULES:
        if condition(findings):
            return Triage(level, reason.format_map(defaultdict(float, probabilities_of(findings["classify_fundus"]))), rule)
    return Triage("routine", "the findings are uncertain: have the photograph reviewed by an eye-care professional", "uncertain")


class TriageFindings(Tool):
    """The rule table as a tool, so the LLM reads the level it must explain (it never decides it)."""

    name = "triage_findings"
    description = (
        "The referral urgency (urgent, soon, routine or none) that OphGLM's rule table gives for what the "
        "tools found in one photograph, with the rule's reason."
    )
    inputs = ImageInput

    def run(self, inputs: ImageInput, session: Session) -> ToolResult:
        found = {name: f for name, f in session.findings.items() if isinstance(f, dict) and f.get("image_id") == inputs.image_id}
        level = triage(found)
        if level is None:
            raise ToolError(f"{self.name}: {inputs.image_id} has no classifier result to triage; examine it first")
        summary = f"Triage for {inputs.image_id}: {level.level}. Reason: {level.reason}."
        return ToolResult(summary=summary, findings={"image_id": inputs.image_id, "level": level.level, "reason": level.reason, "rule": level.rule})
