"""Choosing the fusion's optional expert weight on the calibration split (never on test)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from anomalyclaw.eval.scoring.metrics import evaluate
from anomalyclaw.eval.running.records import Record

DEFAULT_GRID = tuple(np.round(np.arange(0.0, 0.91, 0.1), 2))


def choose_expert_weight(calibration: Sequence[Record], *, alpha: float = 0.5,
                         grid: Sequence[float] = DEFAULT_GRID) -> tuple[float, dict[float, float]]:
    """The expert weight in ``grid`` with the best macro fused AUROC on ``calibration`` records
    (ties go to the smaller weight), and the AUROC of every weight tried."""
    usable = [r for r in calibration if r.expert_score is not None]
    if not usable:
        raise ValueError("the calibration records carry no expert_score: run them with the expert "
                         "score on (the default) before choosing its weight")
    scores = {float(w): evaluate(usable, alpha=alpha, expert_weight=float(w))["macro_auroc"]["fused"]
              for w in grid}
    finite = {w: s for w, s in scores.items() if np.isfinite(s)}
    if not finite:
        raise ValueError("no calibration domain has both labels; cannot choose a weight")
    best = max(finite.values())
    return min(w for w, s in finite.items() if s >= best - 1e-12), scores
