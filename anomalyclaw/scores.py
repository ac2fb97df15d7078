"""Score arithmetic every part shares: clamping to [0, 1], the logistic and its inverse, and the
one fusion formula (used by the pipeline's ``fuse`` node and by evaluation)."""
from __future__ import annotations

import math

#: The logistic's argument is clipped to this magnitude: beyond it the result is 0 or 1 to
#: double precision anyway, and ``math.exp`` would overflow.
_MAX_LOGIT = 30.0
#: Probabilities are kept this far from 0 and 1 before taking a logit, so that an update in
#: log-odds can still move them.
_MIN_PROBABILITY = 1e-4


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


def fuse(direct: float | None, refute: float | None, alpha: float = 0.5,
         expert: float | None = None, expert_weight: float = 0.0) -> float | None:
    """``alpha*direct + (1-alpha)*refute``, optionally mixed with an expert term.

    With ``expert_weight`` w > 0 the result is ``(1-w)*(branch blend) + w*expert``. When one
    branch is missing the other stands alone (the record says which failed); None when both are.
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
    e = clamp01(expert)
    if expert_weight > 0 and e is not None:
        return e if blend is None else (1.0 - expert_weight) * blend + expert_weight * e
    return blend
