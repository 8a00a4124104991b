"""JSON-lines files (question sets, scenarios, labelled sentences): one record a line.

Every evaluation reads its set this way, so a damaged line is reported the same way
everywhere: the file, the line number and what a record must hold.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, TypeVar

Record = TypeVar("Record")


def read_json_lines(path: str | Path, record: Callable[[dict], Record], expected: str, what: str) -> list[Record]:
    """Each non-blank line of `path` through `record` (which raises KeyError, IndexError or TypeError on a bad shape);
    `expected` shows a record's shape and `what` names the records in the errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(record(json.loads(line)))
        except (json.JSONDecodeError, KeyError, IndexError, TypeError) as error:
            raise ValueError(f"{path}:{number}: expected {expected} ({error})") from None
    if not records:
        raise ValueError(f"{path}: no {what}")
    return records
