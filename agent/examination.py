"""The examination: one fixed pipeline per photograph, run by the code, never chosen by the LLM.

Every gradable photograph goes through the same steps, once: the quality gate, the
classifier, the lesion segmenter, the disc measurement and the triage rule table. This is
a screening policy, not a decision a small model should guess, so the steps are reported as
pipeline steps (`by="pipeline"`), apart from the tool calls the model chooses itself.
`ophglm analyze`, the agent, the server, the triage benchmark and the instruction data all
examine a photograph through `examine`. Findings are typed here; JSON appears only at the
edges (`Examination.findings`, the records).
"""

from __future__ import annotations

import contextvars
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from ophglm.agent.triage import Triage, TriageFindings
from ophglm.session import Session
from ophglm.tools.base import Tool, ToolError
from ophglm.tools.classify_fundus import LABELS, probabilities_of
from ophglm.tools.segment_lesions import LESION_NAMES

QUALITY_GATE = "assess_quality"
EXAMINE = ("classify_fundus", "segment_lesions", "measure_optic_disc")
TRIAGE = "triage_findings"
PIPELINE = "pipeline"
PLURAL_S = re.compile(r"(?<=[a-z])s\b")  # "haemorrhages" -> "1 haemorrhage"
MODEL = "model"


@dataclass
class Step:
    """One tool run, by the pipeline or by the model."""
    name: str
    args: dict
    ok: bool
    summary: str
    findings: dict[str, Any] = field(default_factory=dict)
    citations: list[dict] = field(default_factory=list)
    artifacts: list[str] = field(default_factory=list)
    seconds: float = 0.0
    by: str = PIPELINE


# A step runner: (tool name, arguments) -> Step. The agent's runner adds timeouts and the audit log.
Runner = Callable[[str, dict], Step]


@dataclass
class QualityFindings:
    is_fundus: bool
    gradable: bool
    verdict: str

    @property
    def accepted(self) -> bool:
        return self.is_fundus and self.gradable


@dataclass
class ClassifierFindings:
    probabilities: dict[str, float]
    most_likely: str
    confident: bool

    @property
    def most_likely_name(self) -> str:
        return LABELS.get(self.most_likely, self.most_likely)


@dataclass
class LesionFindings:
    counts: dict[str, int]          # by code: MA, HE, EX, SE
    areas: dict[str, float]         # % of field of view
    macular_exudates: bool | None   # None: no fovea located

    def seen(self) -> list[str]:
        """'3 microaneurysms', '1 haemorrhage', ... for each kind with a count above 0."""
        names = {code: LESION_NAMES.get(code, code) for code in self.counts}
        return [f"{n} {names[code] if n > 1 else PLURAL_S.sub('', names[code])}" for code, n in self.counts.items() if n]


@dataclass
class DiscFindings:
    vertical_cdr: float | None
    reliable: bool


@dataclass
class Examination:
    image_id: str
    steps: list[Step]
    quality: QualityFindings | None
    classifier: ClassifierFindings | None = None
    lesions: LesionFindings | None = None
    disc: DiscFindings | None = None
    triage: Triage | None = None

    @property
    def accepted(self) -> bool:
        """The gate passed it and the classifier examined it."""
        return self.quality is not None and self.quality.accepted and self.classifier is not None

    @property
    def refusal(self) -> str:
        """The refusal for a photograph the quality gate rejected, else '' (a gate that failed refuses nothing: the tools still report)."""
        if self.quality is None or self.quality.accepted:
            return ""
        return (f"I cannot assess this image: it is {self.quality.verdict}. "
                "Please send a clear colour photograph of the back of the eye (a fundus photograph).")

    @property
    def findings(self) -> dict[str, dict]:
        """The steps' findings as JSON, keyed by tool name (what the rule table and the records read)."""
        return {s.name: s.findings for s in self.steps if s.ok and s.findings}

    def statement(self) -> str:
        """The examination in plain words, for the reader (the code's own sentences, never the model's)."""
        if self.classifier is None:
            return ""
        c = self.classifier
        p = c.probabilities.get(c.most_likely, 0.0)
        text = (f"The classifier's most likely finding is {c.most_likely_name} (probability {p:.2f})." if c.confident else
                f"The classifier is unsure: its most likely finding, {c.most_likely_name}, has a probability of only {p:.2f}.")
        if self.lesions is not None:
            seen = self.lesions.seen()
            text += (" The lesion segmenter found " + (", ".join(seen[:-1]) + " and " + seen[-1] if len(seen) > 1 else seen[0]) + "."
                     if seen else " The lesion segmenter found no microaneurysms, haemorrhages or exudates.")
        if self.disc is not None and self.disc.vertical_cdr is not None and self.disc.reliable:
            text += f" The vertical cup-to-disc ratio is {self.disc.vertical_cdr:.2f}."
        return text


def _typed(examination: Examination) -> Examination:
    found = examination.findings
    if q := found.get(QUALITY_GATE):
        examination.quality = QualityFindings(bool(q["is_fundus"]), bool(q["gradable"]), q.get("verdict", ""))
    if c := found.get("classify_fundus"):
        examination.classifier = ClassifierFindings(probabilities_of(c), c.get("most_likely", ""), bool(c.get("confident")))
    if lesion := found.get("segment_lesions"):
        lesions = lesion.get("lesions", {})
        macular = lesion.get("macular_exudates")
        examination.lesions = LesionFindings({k: int(v["count"]["value"]) for k, v in lesions.items()},
                                             {k: float(v["area"]["value"]) for k, v in lesions.items()},
                                             bool(macular["value"]) if macular else None)
    if disc := found.get("measure_optic_disc"):
        cdr = disc.get("vertical_cdr", {}).get("value")
        examination.disc = DiscFindings(float(cdr) if cdr is not None else None, bool(disc.get("reliable")))
    if t := found.get(TRIAGE):
        examination.triage = Triage(t["level"], t["reason"], t["rule"])
    return examination


def from_findings(findings: dict[str, dict]) -> Examination | None:
    """The examination of the photograph the classifier last examined, rebuilt from a session's findings."""
    image_id = findings.get("classify_fundus", {}).get("image_id")
    if image_id is None:
        return None
    steps = [Step(name, {"image_id": image_id}, True, "", f) for name, f in findings.items()
             if name != QUALITY_GATE and isinstance(f, dict) and f.get("image_id") == image_id]
    return _typed(Examination(image_id, steps, QualityFindings(True, True, "a gradable colour fundus photograph")))


def direct_runner(tools: dict[str, Tool], session: Session) -> Runner:
    """Run tools in this thread (the CLI and benchmarks); a ToolError becomes a failed step."""
    def run(name: str, args: dict) -> Step:
        start = time.perf_counter()
        try:
            result = tools[name](session, **args)
        except ToolError as err:
            return Step(name, args, False, str(err), seconds=round(time.perf_counter() - start, 3))
        session.artifacts.update(result.artifacts)
        if result.findings:
            session.findings[name] = result.findings
        return Step(name, args, True, result.summary, result.findings, result.citations, list(result.artifacts),
                    round(time.perf_counter() - start, 3))
    return run


def examine(session: Session, image_id: str, tools: dict[str, Tool], run: Runner | None = None) -> Examination:
    """Quality gate, then (if accepted) classifier, lesions and disc side by side, then the rule table; each once."""
    if "classify_fundus" in tools and TRIAGE not in tools:
        tools = {**tools, TRIAGE: TriageFindings()}
    run = run or direct_runner(tools, session)
    steps = [run(QUALITY_GATE, {"image_id": image_id})] if QUALITY_GATE in tools else []
    examination = _typed(Examination(image_id, steps, None))
    if examination.refusal:
        return examination
    names = [name for name in EXAMINE if name in tools]
    # Side by side, as each in its own context (a caller's callbacks, the server's tool events, see them).
    with ThreadPoolExecutor(max_workers=len(names) or 1, thread_name_prefix="ophglm-examine") as pool:
        futures = [pool.submit(contextvars.copy_context().run, run, name, {"image_id": image_id}) for name in names]
        steps += [f.result() for f in futures]
    if any(s.ok and s.name == "classify_fundus" for s in steps):
        steps.append(run(TRIAGE, {"image_id": image_id}))
    return _typed(examination)
