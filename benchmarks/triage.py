"""Triage benchmark: the rule table's level against each photograph's label, on unseen photographs.

    python benchmarks/triage.py --data ../shared/data                 # tools run, findings cached
    python benchmarks/triage.py --data ../shared/data --json

The triage level comes from the rule table over the vision tools' findings
(agent/triage.py), so its accuracy is the tools' accuracy seen through the rules; this
measures it without the LLM. Photographs: the validation split (no vision model was trained
on them; the classifier's early stopping and calibration used them), less the ones `benchmarks/agent_scenarios.jsonl` asks about, so the rule table can
be tuned here while the agent evaluation's triage figure stays a held-out check. Expected
level by label as in finetune/scenarios.py: normal -> none, cataract -> routine, glaucoma and
pathologic myopia -> soon; diabetic retinopathy photographs carry no grade, so they only
count as "referred" (any level but none) or not.

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
from ophglm.agent.triage import triage
from ophglm.finetune.datasets import classification_records, split_of
from ophglm.finetune.scenarios import TRIAGE_BY_LABEL
from ophglm.session import Session
from ophglm.settings import Settings, load_settings
from ophglm.tools.anatomy import DISC_CUP_FILE
from ophglm.tools.base import ToolError
from ophglm.tools.classify_fundus import CLASSIFIER_FILE
from ophglm.tools.registry import load_tools
from ophglm.tools.segment_lesions import SEGMENTER_FILE
from ophglm.tools.vision import weights_fingerprint, weights_path

GATES = ("assess_quality", "classify_fundus", "segment_lesions", "measure_optic_disc")


def photographs(root: Path, scenarios: Path | None) -> list:
    asked = set()
    if scenarios and scenarios.is_file():
        asked = {t["image"] for line in scenarios.read_text().splitlines() if line.strip() for t in json.loads(line)["turns"] if t["image"]}
    return [r for r in classification_records(root)
            if split_of(r.group) == "val" and str(r.path.relative_to(root)) not in asked]


def tools_version(settings: Settings) -> str:
    """What the cached findings depend on: the gate tools' weights files, the tools' source code and the lesion views setting."""
    weights = [weights_fingerprint(weights_path(f, settings.weights_dir)) for f in (CLASSIFIER_FILE, SEGMENTER_FILE, DISC_CUP_FILE)]
    source = hashlib.sha1(b"".join(p.read_bytes() for p in sorted(Path(tools_package.__file__).parent.glob("*.py"))))
    return "+".join(weights + [source.hexdigest()[:12], f"views{settings.lesion_views}"])


def examine(records: list, cache_path: Path, settings: Settings) -> dict[str, dict]:
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
            found = {}
            for name in GATES:
                try:  # a tool that cannot measure this photograph (no disc found) leaves its finding out, as in the agent
                    result = tools[name](session, image_id=image_id)
                except ToolError:
                    continue
                found[name] = result.findings
                if name == "assess_quality" and not (result.findings["is_fundus"] and result.findings["gradable"]):
                    break
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--scenarios", default="benchmarks/agent_scenarios.jsonl", help="photographs asked about there are left out")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "ophglm" / "triage_findings.json"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    root = Path(args.data)
    records = photographs(root, Path(args.scenarios))
    if not records:
        print(f"no labelled validation photographs under {root}", file=sys.stderr)
        return 2
    report = score(records, examine(records, Path(args.cache), load_settings()))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
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
