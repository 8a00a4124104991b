"""Triage benchmark: the rule table's level against each photograph's label, on unseen photographs.

    python benchmarks/triage.py --data ../shared/data                 # tools run, findings cached
    python benchmarks/triage.py --data ../shared/data --choose        # search the table's thresholds on the choosing part
    python benchmarks/triage.py --data ../shared/data --json

The triage level comes from the rule table over the vision tools' findings
(agent/triage.py), so its accuracy is the tools' accuracy seen through the rules; this
measures it without the LLM. Photographs: the validation split (no vision model was trained
on them; the classifier's early stopping and calibration used them), cut in two by a hash of
the file name: the table's thresholds are chosen on the "choose" part (`--choose` prints the
best), and the accuracy to quote is the "report" part's, which choosing never reads. Expected
level by label: normal -> none, cataract -> routine, glaucoma and pathologic myopia -> soon;
diabetic retinopathy photographs carry no grade, so they only count as "referred" (any level
but none) or not.

The tools' findings are cached per photograph, keyed by the gate tools' weights and their
source code (--cache), so a change to the rule table is re-measured in a second and a
change to a tool or its weights re-examines every photograph.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ophglm import tools as tools_package
from ophglm.agent import triage as rule_table
from ophglm.agent.examination import TRIAGE, examine
from ophglm.agent.triage import triage
from ophglm.finetune.datasets import classification_records, split_of
from ophglm.session import Session
from ophglm.settings import Settings, load_settings
from ophglm.tools.anatomy import DISC_CUP_FILE
from ophglm.tools.classify_fundus import CLASSIFIER_FILE
from ophglm.tools.registry import load_tools
from ophglm.tools.segment_lesions import SEGMENTER_FILE
from ophglm.tools.vision import weights_fingerprint, weights_path

TRIAGE_BY_LABEL = {"normal": "none", "cataract": "routine", "glaucoma": "soon", "pathologic_myopia": "soon"}
# The rule table's thresholds `--choose` searches (module constants of agent/triage.py), with the values tried.
THRESHOLDS = {"MACULAR_EXUDATES_MIN_DR": (0.3, 0.5, 0.7), "LARGE_CUP_MIN_GLAUCOMA": (0.2, 0.3, 0.4),
              "GLAUCOMA_MIN": (0.3, 0.4, 0.5, 0.6), "NORMAL_MIN_PROBABILITY": (0.1, 0.2, 0.3, 0.4),
              "NORMAL_MAX_LESION_AREA": (1.0, 2.0, 5.0, 10.0)}


def part_of(path: Path) -> str:
    """'choose' or 'report', fixed by the file name's hash (the same photograph always falls on the same side)."""
    return "choose" if hashlib.sha1(path.name.encode()).digest()[0] % 2 == 0 else "report"


def photographs(root: Path) -> list:
    return [r for r in classification_records(root) if split_of(r.group) == "val"]


def tools_version(settings: Settings) -> str:
    """What the cached findings depend on: the gate tools' weights files, the tools' source code and the lesion views setting."""
    weights = [weights_fingerprint(weights_path(f, settings.weights_dir)) for f in (CLASSIFIER_FILE, SEGMENTER_FILE, DISC_CUP_FILE)]
    source = hashlib.sha1(b"".join(p.read_bytes() for p in sorted(Path(tools_package.__file__).parent.glob("*.py"))))
    return "+".join(weights + [source.hexdigest()[:12], f"views{settings.lesion_views}"])


def examine_all(records: list, cache_path: Path, settings: Settings) -> dict[str, dict]:
    """Findings of the gate tools per photograph, from the cache where these weights and this code made them."""
    version = tools_version(settings)
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    if cache.get("version") != version:
        cache = {"version": version, "findings": {}}
    todo = [r for r in records if str(r.path) not in cache["findings"]]
    if todo:
        tools = load_tools(settings)
        for record in tqdm(todo, desc="examining photographs", unit="img"):
            session = Session()
            image_id = session.add_image(Image.open(record.path).convert("RGB"))
            # The agent's own pipeline; a tool that cannot measure this photograph (no disc found) leaves its finding out.
            found = {name: f for name, f in examine(session, image_id, tools).findings.items() if name != TRIAGE}
            cache["findings"][str(record.path)] = found
            if len(cache["findings"]) % 50 == 0:
                _save(cache_path, cache)
        _save(cache_path, cache)
    return {str(r.path): cache["findings"][str(r.path)] for r in records}


def _save(path: Path, cache: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cache))


def _lesion_area(found: dict) -> float | None:
    """% of the field the lesion segmenter marked (all four kinds), None where it did not run."""
    lesions = found.get("segment_lesions", {}).get("lesions")
    return sum(v["area"]["value"] for v in lesions.values()) if lesions else None


def score(records: list, findings: dict[str, dict]) -> dict:
    right, checked, confusion, rules, referred = Counter(), Counter(), Counter(), Counter(), Counter()
    areas: dict[str, list[float]] = {}
    for record in records:
        found = findings[str(record.path)]
        if (area := _lesion_area(found)) is not None:
            areas.setdefault(record.label, []).append(area)
        level = triage(found) if "classify_fundus" in found else None
        name = level.level if level else "rejected"
        rules[level.rule if level else "rejected"] += 1
        confusion[(record.label, name)] += 1
        if record.label in TRIAGE_BY_LABEL:
            checked[record.label] += 1
            right[record.label] += name == TRIAGE_BY_LABEL[record.label]
        else:
            referred[name not in ("none", "rejected")] += 1
    total = sum(checked.values())
    return {
        "photographs": len(records),
        "accuracy": round(sum(right.values()) / total, 4) if total else None,
        "accuracy_by_label": {label: round(right[label] / n, 4) for label, n in sorted(checked.items())},
        "checked": total,
        "diabetic_retinopathy_referred": round(referred[True] / sum(referred.values()), 4) if referred else None,
        "confusion": {label: {lvl: n for (lab, lvl), n in sorted(confusion.items()) if lab == label} for label in sorted({l for l, _ in confusion})},
        "rules_fired": dict(rules.most_common()),
        # How much the lesion segmenter marks per label: on normal photographs every mark is a false positive.
        "lesions_marked_share": {label: round(sum(a > 0 for a in values) / len(values), 4) for label, values in sorted(areas.items())},
        "lesion_area_median_percent": {label: round(float(np.median(values)), 4) for label, values in sorted(areas.items())},
    }


def choose_thresholds(records: list, findings: dict[str, dict]) -> dict:
    """The thresholds with the best accuracy on these photographs (ties: more DR photographs referred, then the fewest
    changes from the shipped values), and that accuracy."""
    import itertools

    shipped = {name: getattr(rule_table, name) for name in THRESHOLDS}
    best: tuple = (-1.0, -1.0, -len(shipped), shipped)
    try:
        for values in itertools.product(*THRESHOLDS.values()):
            candidate = dict(zip(THRESHOLDS, values))
            for name, value in candidate.items():
                setattr(rule_table, name, value)
            result = score(records, findings)
            changed = sum(candidate[name] != shipped[name] for name in THRESHOLDS)
            best = max(best, (result["accuracy"] or 0.0, result["diabetic_retinopathy_referred"] or 0.0, -changed, candidate), key=lambda b: b[:3])
    finally:
        for name, value in shipped.items():
            setattr(rule_table, name, value)
    return {"accuracy": best[0], "diabetic_retinopathy_referred": best[1], "thresholds": best[3], "shipped": shipped}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--choose", action="store_true", help="search the rule table's thresholds on the choosing part")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "ophglm" / "triage_findings.json"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    root = Path(args.data)
    records = photographs(root)
    if not records:
        print(f"no labelled validation photographs under {root}", file=sys.stderr)
        return 2
    findings = examine_all(records, Path(args.cache), load_settings())
    parts = {part: [r for r in records if part_of(r.path) == part] for part in ("choose", "report")}
    if args.choose:
        print(json.dumps(choose_thresholds(parts["choose"], findings), indent=2))
        return 0
    reports = {part: score(part_records, findings) for part, part_records in parts.items()}
    if args.json:
        print(json.dumps(reports, indent=2))
        return 0
    print(f"choosing part: accuracy {reports['choose']['accuracy']} over {reports['choose']['checked']} photographs (the thresholds were chosen here)")
    report = reports["report"]
    print("report part (never read while choosing):")
    print(f"triage accuracy {report['accuracy']} over {report['checked']} photographs with an expected level "
          f"({report['photographs']} examined); DR photographs referred: {report['diabetic_retinopathy_referred']}")
    for label, value in report["accuracy_by_label"].items():
        print(f"  {label:18s} {value:.3f}   levels: {report['confusion'][label]}")
    print(f"  {'DR (not checked)':18s}          levels: {report['confusion'].get('diabetic_retinopathy', {})}")
    print("rules fired: " + ", ".join(f"{k} {v}" for k, v in report["rules_fired"].items()))
    print("lesion segmenter, share of photographs with a lesion marked / median % of field marked: " + ", ".join(
        f"{label} {share:.2f} / {report['lesion_area_median_percent'][label]:.2f}" for label, share in report["lesions_marked_share"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
