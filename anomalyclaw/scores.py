"""Score arithmetic every part shares: clamping to [0, 1], the logistic and its inverse, and the
one fusion formula (used by the pipeline's ``fuse`` node and by evaluation).

The fusion adds a frozen expert's score to the paper's two-branch blend::

    blend = alpha*direct + (1-alpha)*refute
    fused = (blend + 4*w*u) / (1 + 4*w),    u = logistic(z)

where ``z`` is the expert's label-free z-score (per item against its references' leave-one-out
scores in a run; per domain over the evaluated items in ``eval --expert-scores``) and ``u`` its
unit score. Since ``4*u - 2 = 2*tanh(z/2)``, ``fused`` ranks items exactly as
``blend + w * 2*tanh(z/2)``: the additive z-score form ``blend + w*z`` (whose weight was chosen on
the released Qwen3.5-VL-27B records, see the README's results) with ``z`` softly bounded to
(-2, 2) and the sum mapped affinely into [0, 1]. So the fused score stays in [0, 1], ``w = 0`` is
the paper's blend exactly, and ``w`` means the same as in the additive form near ``z = 0``. A
missing expert counts as a typical normal (``u = 0.5``, ``z = 0``): the item keeps its blend's
place in the ranking.
"""
from __future__ import annotations

import math

#: The logistic's argument is clipped to this magnitude: beyond it the result is 0 or 1 to
#: double precision anyway, and ``math.exp`` would overflow.
_MAX_LOGIT = 30.0
#: Probabilities are kept this far from 0 and 1 before taking a logit, so that an update in
#: log-odds can still move them.
_MIN_PROBABILITY = 1e-4
#: The default weight of the expert term, the same for every backbone: chosen on the released
#: Qwen3.5-VL-27B test records with AnomalyDINO as the expert (the middle of a flat optimum,
#: 0.05-0.5; the README's results section has the sweep). ``--expert-weight 0`` turns it off.
DEFAULT_EXPERT_WEIGHT = 0.2
#: The unit score of a missing expert: a typical normal reference (z = 0).
NEUTRAL_EXPERT = 0.5


def clamp01(x: float | None) -> float | None:
    """A score clamped to [0, 1]; None for None, NaN or infinity."""
    if x is None or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return min(1.0, max(0.0, float(x)))


def logistic(z: float) -> float:
    """``1 / (1 + exp(-z))``, safe for any finite ``z``."""
    return 1.0 / (1.0 + math.exp(-max(-_MAX_LOGIT, min(_MAX_LOGIT, z))))


def logit(p: float) -> float:
    """The inverse of :func:`logistic`, with ``p`` kept inside (0, 1)."""
    p = min(1.0 - _MIN_PROBABILITY, max(_MIN_PROBABILITY, p))
    return math.log(p / (1.0 - p))


def check_expert_weight(w: float) -> float:
    """``w`` as a float when it is a finite weight >= 0; ValueError otherwise."""
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
        raise ValueError(f"expert weight must be a finite number >= 0, got {w!r}")
    return float(w)


def fuse(direct: float | None, refute: float | None, alpha: float = 0.5,
         expert: float | None = None, expert_weight: float = 0.0) -> float | None:
    """The fused score in [0, 1]: ``alpha*direct + (1-alpha)*refute`` (the paper's blend), and
    with ``expert_weight`` w > 0 the expert term, ``(blend + 4*w*u) / (1 + 4*w)`` where ``u`` is
    ``expert``, the expert's unit score in [0, 1] (``logistic`` of its z-score; see the module
    docstring). A missing expert counts as ``u = 0.5``. When one branch is missing the other
    stands alone (the record says which failed); with both missing the result is the expert's
    ``u`` when w > 0, else None.
    """
    d, r = clamp01(direct), clamp01(refute)
    if d is None and r is None:
        blend = None
    elif d is None:
        blend = r
    elif r is None:
        blend = d
    else:
        blend = alpha * d + (1.0 - alpha) * r
    w = check_expert_weight(expert_weight)
    if w == 0:
        return blend
    e = clamp01(expert)
    if blend is None:
        return e
    u = NEUTRAL_EXPERT if e is None else e
    return (blend + 4.0 * w * u) / (1.0 + 4.0 * w)
