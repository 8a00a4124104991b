"""`ophglm eval vision --data DIR`: every vision tool measured on photographs it was not trained on.

DIR has the layout of ../shared/data; each dataset present is evaluated, each absent one
is skipped and named. Only the fixed validation split (the same hashed split training
used) counts, so a figure here is on unseen photographs. The quality gate is measured on
generated and packaged non-fundus images (a seed different from the one its thresholds
were chosen on) and on every fundus photograph in DIR. The lesion segmenter is also run on
unseen normal photographs of every camera source: whatever it marks there is a false
positive that would reach the triage table. The disc/cup tool is also run end to end on
unseen normal and glaucoma photographs of other cameras. Speed: images/second of each tool
called as the agent calls it, and its ratio to the bare model forward measured in the same
run, so preprocessing and post-processing costs are visible.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ophglm.finetune.datasets import (CLASSIFIER_CLASSES, classification_records, disc_cup_records, lesion_records, lesion_split, split_of,
                                      vessel_records)
from ophglm.finetune.metrics import aupr, auroc_per_class, classwise_calibration_error, dice, expected_calibration_error, macro, pixel_auroc
from ophglm.finetune.train_segmenter import SegmenterConfig, normal_photographs
from ophglm.session import Session
from ophglm.settings import Settings, load_settings
from ophglm.tools.anatomy import MeasureOpticDisc, MeasureVessels
from ophglm.tools.assess_quality import assess
from ophglm.tools.base import ToolError
from ophglm.tools.classify_fundus import ClassifyFundus
from ophglm.tools.measurements import vertical_cdr
from ophglm.tools.non_fundus import non_fundus_images
from ophglm.tools.registry import vision_tools
from ophglm.tools.segment_lesions import LESION_NAMES, SegmentLesions
from ophglm.tools.synthetic_fundus import make_synthetic_fundus
from ophglm.tools.vision import as_photo, flip_averaged, fov_mask, fundus_box, fundus_square, square_crop, to_tensor

GATE_SEED = 1  # the thresholds were chosen on seed 0


def _rgb(path: Path) -> Image.Image:
    return Image.open(path).convert("RGB")


def _mask(path: Path, size: tuple[int, int], box=None) -> np.ndarray:
    mask = Image.open(path).convert("L")
    if box is not None:
        mask = square_crop(mask, box)
    return np.asarray(mask.resize(size, Image.NEAREST)) > 127


def eval_classifier(root: Path, tool: ClassifyFundus) -> dict | None:
    records = [r for r in classification_records(root) if split_of(r.group) == "val"]
    if not records:
        return None
    probs = []
    for start in tqdm(range(0, len(records), 16), desc="classifier", unit="batch"):
        batch = tool.predict([_rgb(r.path) for r in records[start:start + 16]])
        probs += [[p.get(c, 0.0) for c in CLASSIFIER_CLASSES] for p in batch]
    probs, labels = np.array(probs), np.array([CLASSIFIER_CLASSES.index(r.label) for r in records])
    by_source = {}
    for source in sorted({r.source for r in records}):
        picked = np.array([r.source == source for r in records])
        scores = auroc_per_class(probs[picked], labels[picked], CLASSIFIER_CLASSES)
        by_source[source] = {"images": int(picked.sum()), "macro_auroc": round(macro(scores), 4)}
    scores = auroc_per_class(probs, labels, CLASSIFIER_CLASSES)
    return {"images": len(records), "auroc": {k: round(v, 4) for k, v in scores.items()}, "macro_auroc": round(macro(scores), 4),
            # The calibration was fitted on this split: the model card's cross-fitted ECE is the unbiased one.
            "ece_classwise": round(classwise_calibration_error(probs, labels), 4), "ece_top_label": round(expected_calibration_error(probs, labels), 4),
            "accuracy": round(float((probs.argmax(1) == labels).mean()), 4),
            "macro_auroc_by_source": by_source}


def _lesion_scores(pixels: list[tuple[np.ndarray, np.ndarray, np.ndarray]], tool: SegmentLesions) -> dict:
    """AUPR and Dice per class over every photograph's (probabilities, truths, field) pixels together.

    Pooled, as the IDRiD challenge scored, one photograph with a vast lesion weighs most (of
    the 5 held-out exact-mask photographs, IDRiD_17 holds 93% of the haemorrhage pixels), so
    the median of each photograph's own AUPR (over those that have the lesion) is given beside it.
    """
    report = {"images": len(pixels), "aupr": {}, "dice": {}, "aupr_per_photograph_median": {}}
    for k, c in enumerate(tool.config["classes"]):
        p = np.concatenate([probs[k][field] for probs, _, field in pixels])
        t = np.concatenate([truths[k][field] for _, truths, field in pixels])
        report["aupr"][c] = round(aupr(p, t), 4)
        report["dice"][c] = round(dice(p > tool.config["thresholds"][c], t), 4)
        own = [aupr(probs[k][field], truths[k][field]) for probs, truths, field in pixels if truths[k][field].any()]
        report["aupr_per_photograph_median"][c] = round(float(np.median(own)), 4) if own else None
    return report


def _resampled(probs: np.ndarray, side: int) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(p.astype(np.float32), "F").resize((side, side), Image.BILINEAR)) for p in probs])


def eval_lesions(root: Path, tool: SegmentLesions) -> dict | None:
    """AUPR and Dice per class on unseen IDRiD photographs, through the tool's own preprocessing.

    Exact masks (idrid_fullres) are compared at the photograph's full resolution, the
    probabilities upsampled to it, as the IDRiD challenge scored; the approximate 512 px
    masks of the other unseen photographs at 512 px. Unseen by these weights: the split
    their training used (older weights held out fewer exact-mask photographs).
    """
    exact_percent = tool.config.get("exact_mask_validation_percent", 0)
    unseen = [r for r in lesion_records(root) if lesion_split(r, exact_percent) == "val"]
    if not unseen:
        return None
    size, exact, approximate = tool.config["image_size"], [], []
    for r in tqdm(unseen, desc="lesions (unseen IDRiD)", unit="img"):
        image = _rgb(r.image)
        box = fundus_box(image)
        probs = tool.probabilities([fundus_square(image, size, box)])[0]
        if r.exact:
            square = square_crop(image, box)
            truths = np.stack([np.asarray(square_crop(Image.open(r.masks[c]).convert("L"), box)) > 127 for c in tool.config["classes"]])
            exact.append((_resampled(probs, square.width), truths, fov_mask(square)))
        else:
            square = square_crop(image, box).resize((512, 512), Image.BILINEAR)
            truths = np.stack([_mask(r.masks[c], (512, 512), box) for c in tool.config["classes"]])
            approximate.append((_resampled(probs, 512), truths, fov_mask(square)))
    report = {}
    if exact:
        report["exact_masks_full_resolution"] = _lesion_scores(exact, tool)
    if approximate:
        report["approximate_masks_512px"] = _lesion_scores(approximate, tool)
    return report


def eval_lesions_on_normals(root: Path, tool: SegmentLesions) -> dict | None:
    """What the lesion tool marks on unseen normal photographs of every camera source: each mark is a false positive.

    The held-out normals the segmenter's training chose its epoch and thresholds on are left out.
    """
    chosen_on = set(normal_photographs(root, "val", SegmenterConfig.validation_normals))
    records = [r for r in classification_records(root) if r.label == "normal" and split_of(r.group) == "val" and r.path not in chosen_on]
    if not records:
        return None
    by_source: dict[str, list[float]] = {}
    for r in tqdm(records, desc="lesions (normal photographs)", unit="img"):
        found = tool.masks_batch([_rgb(r.path)])[0]
        marked = np.any([found.masks[c] for c in LESION_NAMES], axis=0).sum()
        by_source.setdefault(r.source, []).append(100.0 * float(marked) / max(int(found.field.sum()), 1))
    every = [a for areas in by_source.values() for a in areas]
    summary = lambda areas: {"images": len(areas), "marked_share": round(float(np.mean([a > 0 for a in areas])), 4),
                             "marked_field_percent_median": round(float(np.median(areas)), 4)}
    return summary(every) | {"by_source": {source: summary(areas) for source, areas in sorted(by_source.items())}}


def eval_disc_cup(root: Path, tool: MeasureOpticDisc) -> dict | None:
    records = [r for r in disc_cup_records(root) if split_of(r.group) == "val"]
    if not records:
        return None
    dices, errors = {"disc": [], "cup": []}, []
    for r in tqdm(records, desc="disc/cup", unit="img"):
        masks = tool.unet.masks([_rgb(r.image)])[0]
        size = masks["disc"].shape[::-1]
        truth = {c: _mask(r.masks[c], size) for c in ("disc", "cup")}
        for c in dices:
            dices[c].append(dice(masks[c], truth[c]))
        predicted = vertical_cdr(masks["disc"], masks["cup"])
        errors.append(abs((predicted or 0.0) - vertical_cdr(truth["disc"], truth["cup"])))
    return {"images": len(records), "dice": {c: round(float(np.mean(v)), 4) for c, v in dices.items()},
            "vertical_cdr_mae": round(float(np.mean(errors)), 4)}


def eval_disc_on_labelled_photographs(root: Path, tool: MeasureOpticDisc) -> dict | None:
    """measure_optic_disc end to end on unseen normal and glaucoma photographs of other cameras than Drishti-GS's.

    No cup is annotated there, so the yardsticks are indirect: how often the tool measures
    at all (per label), the median ratio per label, and how well the ratio separates the
    glaucoma label from the normal one (AUROC over the photographs measured).
    """
    records = [r for r in classification_records(root) if split_of(r.group) == "val" and r.label in ("normal", "glaucoma")]
    if not records:
        return None
    ratios: dict[str, list[float]] = {"normal": [], "glaucoma": []}
    refused: dict[str, int] = {"normal": 0, "glaucoma": 0}
    for r in tqdm(records, desc="disc/cup (labelled photographs)", unit="img"):
        photo = as_photo(_rgb(r.path))
        try:
            result = tool._result(r.path.name, tool.disc_masks_batch([photo], tool.locator.masks_batch([photo]))[0])
            ratios[r.label].append(result.findings["vertical_cdr"]["value"])
        except ToolError:
            refused[r.label] += 1
    report = {label: {"images": len(values) + refused[label], "measured_share": round(len(values) / max(len(values) + refused[label], 1), 4),
                      "vertical_cdr_median": round(float(np.median(values)), 2) if values else None} for label, values in ratios.items()}
    if ratios["normal"] and ratios["glaucoma"]:
        scores = np.array(ratios["normal"] + ratios["glaucoma"])
        report["glaucoma_vs_normal_auroc"] = round(pixel_auroc(scores, np.arange(len(scores)) >= len(ratios["normal"])), 4)
    return report


def eval_vessels(root: Path, tool: MeasureVessels) -> dict | None:
    records = [r for r in vessel_records(root) if split_of(r.group, 25) == "val"]
    if not records:
        return None
    probs, truths = [], []
    size = tool.unet.config["image_size"]
    for r in tqdm(records, desc="vessels", unit="img"):
        image = _rgb(r.image)
        box = fundus_box(image)
        square = square_crop(image, box).resize((size, size), Image.BILINEAR)
        inside = _mask(r.fov, (size, size), box) if r.fov else fov_mask(square)
        probs.append(tool.unet.probabilities([square])[0, 0][inside])
        truths.append(_mask(r.masks["vessel"], (size, size), box)[inside])
    return {"images": len(records), "auroc": round(pixel_auroc(np.concatenate(probs), np.concatenate(truths)), 4),
            "aupr": round(aupr(np.concatenate(probs), np.concatenate(truths)), 4)}


def eval_quality_gate(root: Path, non_fundus: int) -> dict:
    kinds: dict[str, list[int]] = {}
    for kind, image in tqdm(non_fundus_images(non_fundus, seed=GATE_SEED), total=non_fundus, desc="gate: non-fundus", unit="img"):
        kinds.setdefault(kind, []).append(int(not assess(image).is_fundus))
    report = {"non_fundus_images": non_fundus, "non_fundus_rejected": round(float(np.mean(sum(kinds.values(), []))), 4),
              "rejected_by_kind": {k: round(float(np.mean(v)), 4) for k, v in kinds.items()}}
    fundus = [r.path for r in classification_records(root)] + [r.image for r in vessel_records(root)]
    if fundus:
        rejected = [p for p in tqdm(fundus, desc="gate: fundus", unit="img") if not assess(Image.open(p)).usable]
        report |= {"fundus_images": len(fundus), "fundus_wrongly_rejected": round(len(rejected) / len(fundus), 4),
                   "wrongly_rejected_examples": [str(p.relative_to(root)) for p in rejected[:10]]}
    return report


SPEED_IMAGE_SIDE = 2048  # camera photographs are 4-12 megapixels: shrinking one to the network's input is part of a tool's cost


def _median_seconds(calls: list, repeats: int) -> list[float]:
    """Median seconds per call of each function, the calls interleaved (a, b, a, b, ...).

    Interleaving puts a drifting clock or a burst of background load on a tool and its
    bare forward alike, and the median ignores the odd stalled call. Over four runs of 20
    calls, the ratios' spread (classifier, lesions, vessels) was 0.01, 0.06, 0.06 this way
    against 0.22, 0.21, 0.03 as two separate means.
    """
    for call in calls:
        call()  # warm-up: lazy set-up and first-call allocations are not steady-state speed
    seconds: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for call, times in zip(calls, seconds):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    return [statistics.median(times) for times in seconds]


@torch.inference_mode()
def eval_speed(tools: dict, image: Image.Image, repeats: int) -> dict:
    """Tool calls (as the agent makes them) against the bare forward pass of each tool's network."""
    session = Session()
    image_id = session.add_image(image)
    square, lesions = fundus_square(image), tools["segment_lesions"]
    bare = {  # network work, input side, precision context: the tool's own (segment_lesions: every flip view it averages)
        "classify_fundus": (tools["classify_fundus"].model, tools["classify_fundus"].config["image_size"], contextlib.nullcontext),
        "segment_lesions": (lambda batch: flip_averaged(lesions.forward, batch, lesions.views), lesions.config["image_size"], lesions.autocast),
        "measure_vessels": (tools["measure_vessels"].unet.model, tools["measure_vessels"].unet.config["image_size"], contextlib.nullcontext),
    }
    report = {}
    for name, tool in tools.items():
        if name == "assess_quality":
            def call():  # what a photograph costs once
                assess(image), as_photo(image)
        else:  # the gate's verdict and the Photo (aperture box, pixels) stay cached, as in a session (made once per photograph); nothing else does
            def call(tool=tool):
                session.derived = {key: value for key, value in session.derived.items() if key[0] in ("quality", "photo")}
                tool(session, image_id=image_id)
        calls = [call]
        if name in bare:
            network, size, precision = bare[name]
            tensor = to_tensor(square, size)[None]

            def forward(network=network, tensor=tensor, precision=precision):
                with precision():
                    network(tensor)
            calls.append(forward)
        seconds = _median_seconds(calls, repeats)
        report[name] = {"tool_images_per_second": round(1 / seconds[0], 2)} | ({"views": lesions.views} if name == "segment_lesions" else {})
        if name in bare:
            report[name] |= {"forward_images_per_second": round(1 / seconds[1], 2), "tool_over_forward_time": round(seconds[0] / seconds[1], 3),
                             "tool_minus_forward_ms": round(1000 * (seconds[0] - seconds[1]), 1)}  # what the ratio hides when the forward grows
    return report


def evaluate_vision(root: Path, non_fundus: int = 300, speed_repeats: int = 20, settings: Settings | None = None) -> dict:
    """Every section whose dataset is in `root`, with the tools as `settings` configure them (weights folder, lesion views)."""
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    tools = {tool.name: tool for tool in vision_tools(settings or load_settings(), "cpu")}
    for tool in tools.values():
        tool.setup()
    sections = {"classifier": lambda: eval_classifier(root, tools["classify_fundus"]),
                "lesions_idrid_fullres": lambda: eval_lesions(root, tools["segment_lesions"]),
                "lesions_on_normal_photographs": lambda: eval_lesions_on_normals(root, tools["segment_lesions"]),
                "disc_cup_drishti_gs": lambda: eval_disc_cup(root, tools["measure_optic_disc"]),
                "disc_cup_on_labelled_photographs": lambda: eval_disc_on_labelled_photographs(root, tools["measure_optic_disc"]),
                "vessels_drive": lambda: eval_vessels(root, tools["measure_vessels"])}
    report: dict = {"data": str(root), "skipped": []}
    for name, run in sections.items():
        result = run()
        if result is None:
            report["skipped"].append(name)
        else:
            report[name] = result
    report["quality_gate"] = eval_quality_gate(root, non_fundus)
    report["speed"] = {"threads": torch.get_num_threads(), "image": f"synthetic fundus, {SPEED_IMAGE_SIDE} px",
                       "tools": eval_speed(tools, make_synthetic_fundus(SPEED_IMAGE_SIDE, seed=0).image, speed_repeats)}
    return report


def format_report(report: dict, indent: int = 0) -> str:
    """Nested sections as indented `key: value` lines."""
    lines = []
    for key, value in report.items():
        if isinstance(value, dict):
            lines += [" " * indent + f"{key}:", format_report(value, indent + 2)]
        else:
            lines.append(" " * indent + f"{key}: {', '.join(map(str, value)) if isinstance(value, list) else value}")
    return "\n".join(lines)


def _without_nan(value):
    """NaN (a class absent from a subset) is not JSON: it becomes null."""
    if isinstance(value, dict):
        return {k: _without_nan(v) for k, v in value.items()}
    return None if isinstance(value, float) and np.isnan(value) else value


def cmd_eval_vision(args) -> None:
    report = _without_nan(evaluate_vision(Path(args.data), args.non_fundus, args.repeats))
    print(json.dumps(report, indent=2) if args.json else format_report(report))


def add_eval_vision_parser(eval_subparsers) -> None:
    p = eval_subparsers.add_parser("vision", help="vision tools on unseen photographs: AUROC, AUPR, Dice, CDR error, gate rates, speed")
    p.add_argument("--data", default="../shared/data", help="a folder laid out like ../shared/data (absent datasets are skipped)")
    p.add_argument("--non-fundus", type=int, default=300, help="generated non-fundus images for the quality gate")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per tool")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_eval_vision)
