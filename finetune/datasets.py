"""Labelled records from a data folder laid out like ../shared/data, and a fixed split.

The split is decided by a hash of each record's *group* (one patient's two eyes, the
augmented copies of one source photograph, byte-identical files), so near-copies never
straddle train and validation and the split never changes between runs.
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

CLASSIFIER_CLASSES = ("normal", "diabetic_retinopathy", "glaucoma", "cataract", "pathologic_myopia")
SEGMENTER_CLASSES = ("MA", "HE", "EX", "SE", "OD")
DISC_CUP_CLASSES = ("disc", "cup")
VESSEL_CLASSES = ("vessel",)
VALIDATION_PERCENT = 15
EXACT_MASK_VALIDATION_PERCENT = 30  # of the photographs with exact full-resolution masks: 5 of IDRiD's 14


@dataclass(frozen=True)
class Record:
    path: Path
    label: str
    group: str
    source: str  # camera / dataset source, for per-source figures (shortcut check)


def split_of(group: str, percent: int = VALIDATION_PERCENT) -> str:
    bucket = int(hashlib.sha1(group.encode()).hexdigest(), 16) % 100
    return "val" if bucket < percent else "train"


def _checksums(root: Path) -> dict[str, str]:
    manifest = root / "MANIFEST.csv"
    if not manifest.is_file():
        return {}
    with manifest.open() as f:
        return {row["path"]: row["sha256"] for row in csv.DictReader(f)}


def _group_4class(label: str, name: str) -> tuple[str, str]:
    stem = Path(name).stem
    if m := re.fullmatch(r"(\d+)_(left|right)", stem):  # both eyes of one patient
        source = "eyepacs" if name.endswith(".jpeg") else "odir"
        return f"{source}:{m[1]}", source
    if m := re.fullmatch(r"_(\d+)_\d+", stem):  # augmented copies of one source image
        return f"{label}:aug{m[1]}", "odir-augmented"
    return f"{label}:{stem}", "odir-png"


def classification_records(root: Path) -> list[Record]:
    """Every fundus photograph with one of CLASSIFIER_CLASSES as its label."""
    records: list[Record] = []
    folder = root / "classify_4class"
    for label in ("normal", "diabetic_retinopathy", "glaucoma", "cataract"):
        for path in sorted((folder / label).glob("*")) if (folder / label).is_dir() else []:
            group, source = _group_4class(label, path.name)
            records.append(Record(path, label, group, source))
    palm = root / "palm"
    if (palm / "labels.csv").is_file():
        with (palm / "labels.csv").open() as f:
            for row in csv.DictReader(f):
                # High (non-pathologic) myopia is neither normal nor PM: leave it out.
                if row["label"] in ("normal", "pathologic_myopia"):
                    records.append(Record(palm / "images" / row["file"], row["label"], f"palm:{row['file']}", "palm"))
    idrid = root / "idrid_512"
    for path in sorted((idrid / "normals").glob("*.jpg")):
        records.append(Record(path, "normal", f"idrid:{path.stem}", "idrid"))
    for path in sorted((idrid / "images").glob("*.jpg")):
        records.append(Record(path, "diabetic_retinopathy", f"idrid:{path.stem}", "idrid"))
    return _merge_identical(root, records)


def _merge_identical(root: Path, records: list[Record]) -> list[Record]:
    """Byte-identical files share a group; identical files filed under two labels are dropped."""
    sums = _checksums(root)
    by_sum: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        key = sums.get(record.path.relative_to(root).as_posix(), str(record.path))
        by_sum[key].append(record)
    merged: list[Record] = []
    for same in by_sum.values():
        if len({r.label for r in same}) > 1:
            continue
        merged.extend(Record(r.path, r.label, same[0].group, r.source) for r in same)
    return merged


@dataclass(frozen=True)
class MaskedImage:
    image: Path
    masks: dict[str, Path]  # class -> binary mask PNG
    group: str
    fov: Path | None = None  # camera-aperture mask, where the dataset gives one (DRIVE)
    exact: bool = False  # a whole full-resolution photograph with exact masks (crop to the aperture, area-resample the masks)


def _idrid_records(base: Path, exact: bool) -> dict[str, MaskedImage]:
    records = {}
    for image in sorted((base / "images").glob("*.jpg")):
        masks = {c: base / "masks" / f"{image.stem}_{c}.png" for c in SEGMENTER_CLASSES}
        if all(p.is_file() for p in masks.values()):
            records[image.stem] = MaskedImage(image, masks, f"idrid:{image.stem}", exact=exact)
    return records


def lesion_records(root: Path) -> list[MaskedImage]:
    """IDRiD photographs with lesion masks: the exact full-resolution ones where present, else the 512 px approximations."""
    return list((_idrid_records(root / "idrid_512", False) | _idrid_records(root / "idrid_fullres", True)).values())


def lesion_split(record: MaskedImage, exact_percent: int = EXACT_MASK_VALIDATION_PERCENT) -> str:
    """The hashed split, plus more of the rare exact-mask photographs held out: they are the only exact yardstick.

    Weights record the `exact_percent` they were trained with (0: weights from before it existed).
    """
    if exact_percent and record.exact and split_of(record.group, exact_percent) == "val":
        return "val"
    return split_of(record.group)


def disc_cup_records(root: Path) -> list[MaskedImage]:
    """Drishti-GS optic-disc crops with disc (cup included) and cup masks."""
    base = root / "drishti_gs"
    records = []
    for image in sorted((base / "images").glob("*.png")):
        masks = {c: base / "masks" / f"{image.stem}_{c}.png" for c in DISC_CUP_CLASSES}
        if all(p.is_file() for p in masks.values()):
            records.append(MaskedImage(image, masks, f"drishti:{image.stem}"))
    return records


def vessel_records(root: Path) -> list[MaskedImage]:
    """DRIVE photographs with their manual vessel masks and aperture masks."""
    base = root / "drive"
    records = []
    for image in sorted((base / "images").glob("*_training.png")):
        number = image.stem.split("_")[0]
        vessel, fov = base / "vessels" / f"{number}_manual1.png", base / "fov" / f"{image.stem}_mask.png"
        if vessel.is_file():
            records.append(MaskedImage(image, {"vessel": vessel}, f"drive:{number}", fov if fov.is_file() else None))
    return records
