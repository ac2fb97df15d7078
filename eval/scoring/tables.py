"""Text and JSON forms of an evaluation, as the command line prints them."""
from __future__ import annotations

import math
from typing import Any

DIGITS = 4


def rounded(obj: Any, digits: int = DIGITS) -> Any:
    """A JSON-safe copy: floats rounded, NaN and infinities as null."""
    if isinstance(obj, float):
        return round(obj, digits) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, digits) for v in obj]
    return obj


def format_table(result: dict) -> str:
    """The per-domain AUROC table of :func:`metrics.evaluate`'s result."""
    cols = list(result["macro_auroc"])
    names = [d.get("name") for d in result["per_domain"].values()]
    head = f"{'domain':<10}{'n':>6}{'anom':>6}" + "".join(f"{c:>9}" for c in cols) + ("   name" if any(names) else "")
    width = len(head) + max((len(n) - 4 for n in names if n), default=0)
    lines = [head, "-" * width]

    def fmt(v: float) -> str:
        return f"{v:>9.4f}" if isinstance(v, float) and math.isfinite(v) else f"{'n/a':>9}"

    for code, d in result["per_domain"].items():
        name = f"   {d['name']}" if d.get("name") else ""
        lines.append(f"{code:<10}{d['n']:>6}{d['n_anomalous']:>6}" + "".join(fmt(d[c]) for c in cols) + name)
    lines.append("-" * width)
    lines.append(f"{'macro':<10}{result['kept']:>6}{'':>6}" + "".join(fmt(result['macro_auroc'][c]) for c in cols))
    if result["kept"] != result["rows"]:
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(result.get("left_out", {}).items(), key=lambda kv: -kv[1]))
        lines.append(f"({result['rows'] - result['kept']} of {result['rows']} rows left out: {reasons})")
    return "\n".join(lines)
