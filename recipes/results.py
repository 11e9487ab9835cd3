"""Print the README's results table from the reports the recipes wrote.

    python recipes/results.py [runs/recipes]

Each recipe leaves ``base.json`` (the model before fine-tuning) and ``tuned.json`` in its
output directory; this reads every pair found and prints one Markdown row per metric.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(root: Path) -> list[str]:
    out = []
    for recipe in sorted(p for p in root.iterdir() if (p / "tuned.json").is_file()):
        base_file = recipe / "base.json"
        tuned = json.loads((recipe / "tuned.json").read_text())
        base = json.loads(base_file.read_text()) if base_file.is_file() else {"metrics": {}}
        for name, value in tuned["metrics"].items():
            before = base["metrics"].get(name)
            shown = "–" if before is None else f"{before:.3f}"
            out.append(f"| {recipe.name} | {name} | {tuned.get('n', '')} | {shown} | {value:.3f} |")
    return out


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/recipes")
    print("| recipe | metric | examples | base | fine-tuned |")
    print("|---|---|---:|---:|---:|")
    print("\n".join(rows(root)))
