"""Model cards written by the training run itself, so a card always matches its weights.

The card states the data, the recipe, the command that reproduces it and the validation
figures that run measured; nothing in it is typed by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

INTENDED_USE = (
    "Research and demonstration of tool-grounded ophthalmic assistance. Not a medical device; "
    "not validated for clinical use. The training data's licences are research-use only."
)


def _table(rows: dict[str, object]) -> str:
    lines = ["| | |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in rows.items()]
    return "\n".join(lines)


def write_model_card(weights: Path, title: str, what: str, data: str, recipe: dict, report: dict, command: str, notes: str = "") -> Path:
    card = weights.with_suffix(".md")
    scalars = {k: v for k, v in report.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in report.items() if isinstance(v, dict)}
    parts = [
        f"# {title}",
        what,
        "## Intended use",
        INTENDED_USE,
        "## Training data",
        data,
        "## Recipe",
        _table(recipe),
        "## Reproduce",
        f"```bash\n{command}\n```",
        "## Validation (measured by the run that wrote these weights)",
        _table(scalars),
    ]
    for name, values in tables.items():
        parts += [f"### {name}", "```json\n" + json.dumps(values, indent=2) + "\n```"]
    if notes:
        parts += ["## Notes", notes]
    card.write_text("\n\n".join(parts) + "\n")
    return card
