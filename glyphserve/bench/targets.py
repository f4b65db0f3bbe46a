"""``docs/benchmarks/targets.json``: the project's ledger of named targets, one entry a line."""

from __future__ import annotations

import json
from pathlib import Path


def record_targets(path: Path, entries: dict[str, dict]) -> None:
    """Add or replace ``entries`` (name -> {"measured", "target", "met", "card", "date", "source"}), keeping the
    others."""
    kept = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    kept.update(entries)
    body = ",\n".join(f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in sorted(kept.items()))
    path.write_text("{\n" + body + "\n}\n", encoding="utf-8")
