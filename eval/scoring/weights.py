"""The expert term's weight: a sweep over weights (how flat the optimum is, and how much of the
gain is tie breaking), and the choice of a weight on a calibration run (never on test)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from anomalyclaw.eval.running.records import Record
from anomalyclaw.eval.scoring.metrics import evaluate

#: The weights the README's sweep shows and calibration chooses from: 0 (the paper's blend) to 0.5.
SWEEP = tuple(round(0.05 * k, 2) for k in range(11))
DEFAULT_GRID = SWEEP
#: A vanishing weight: the expert only breaks the blend's ties (VLM scores are coarse, 0.05 or
#: 0.95 for many items), so the gain at this weight is the tie-breaking part of the gain.
TIE_BREAK_WEIGHT = 1e-6


def sweep(records: Sequence[Record], *, alpha: float = 0.5, grid: Sequence[float] = SWEEP,
          expert: dict[str, float] | None = None, require_expert: bool = False) -> dict[float, float]:
    """Macro fused AUROC at every weight of ``grid`` (same rows, same expert term)."""
    return {float(w): evaluate(records, alpha=alpha, expert_weight=float(w), expert=expert,
                               require_expert=require_expert, columns=("fused",))["macro_auroc"]["fused"]
            for w in grid}


def tie_breaking_share(records: Sequence[Record], weight: float, *, alpha: float = 0.5,
                       expert: dict[str, float] | None = None, require_expert: bool = False) -> dict[str, float]:
    """``{"blend", "tie_break", "fused", "gain", "tie_break_gain", "share"}``: macro AUROC of the
    blend, of the fusion at :data:`TIE_BREAK_WEIGHT` and at ``weight``, the gains over the blend,
    and the tie-breaking share of the gain (NaN when there is no gain)."""
    at = sweep(records, alpha=alpha, grid=(0.0, TIE_BREAK_WEIGHT, weight), expert=expert,
               require_expert=require_expert)
    blend, tie, fused = at[0.0], at[TIE_BREAK_WEIGHT], at[float(weight)]
    gain = fused - blend
    return {"blend": blend, "tie_break": tie, "fused": fused, "gain": gain, "tie_break_gain": tie - blend,
            "share": (tie - blend) / gain if gain > 0 else float("nan")}


def choose_expert_weight(calibration: Sequence[Record], *, alpha: float = 0.5,
                         grid: Sequence[float] = DEFAULT_GRID) -> tuple[float, dict[float, float]]:
    """The expert weight in ``grid`` with the best macro fused AUROC on ``calibration`` records
    (ties go to the smaller weight), and the AUROC of every weight tried."""
    usable = [r for r in calibration if r.expert_score is not None]
    if not usable:
        raise ValueError("the calibration records carry no expert_score: run them with the expert "
                         "score on (the default) before choosing its weight")
    scores = sweep(usable, alpha=alpha, grid=grid)
    finite = {w: s for w, s in scores.items() if np.isfinite(s)}
    if not finite:
        raise ValueError("no calibration domain has both labels; cannot choose a weight")
    best = max(finite.values())
    return min(w for w, s in finite.items() if s >= best - 1e-12), scores
