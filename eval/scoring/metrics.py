"""Metrics: the paper's row filter, per-domain and macro AUROC per branch, paired bootstrap CIs.

AUROC is scikit-learn's ``roc_auc_score``; macro AUROC is the unweighted mean over domains. The
``blend`` column is the paper's two-branch fusion re-computed from the branch scores at
``alpha`` (as the paper does); ``fused`` adds the expert term at ``expert_weight``
(``anomalyclaw.scores.fuse``; equal to ``blend`` at weight 0), from the records' own
``expert_score`` or from external expert scores joined by item id. One set of records can so be
evaluated at any fusion weight.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

from anomalyclaw.domains import BUILTIN_CARDS
from anomalyclaw.scores import DEFAULT_EXPERT_WEIGHT, NEUTRAL_EXPERT, check_expert_weight, fuse

from anomalyclaw.eval.running.records import Record

COLUMNS = ("direct", "refute", "blend", "fused")
NO_EXPERT = "no expert score"


def kept(records: Iterable[Record]) -> list[Record]:
    """The paper's filter: anomaly-detection mode, both branch scores, no error, a label."""
    return [r for r in records if left_out_reason(r) is None]


def left_out_reason(r: Record) -> str | None:
    """Why the paper's filter leaves ``r`` out (the first reason that applies), None if kept."""
    if r.mode != "anomaly_detection":
        return f"mode {r.mode!r}"
    if r.error:
        return "error"
    if r.label_gt is None:
        return "no label"
    if r.direct_score is None:
        return "no direct_score"
    if r.refute_score is None:
        return "no refute_score"
    return None


def left_out_counts(records: Iterable[Record]) -> dict[str, int]:
    """How many records each reason leaves out (reasons that apply to none are omitted)."""
    counts: dict[str, int] = defaultdict(int)
    for r in records:
        reason = left_out_reason(r)
        if reason is not None:
            counts[reason] += 1
    return dict(counts)


def column(r: Record, name: str, alpha: float = 0.5, expert_weight: float = 0.0,
           expert: dict[str, float] | None = None) -> float | None:
    """Score column ``name`` of ``r``; ``expert`` (item id -> unit score) replaces the records'
    own ``expert_score`` when given."""
    e = r.expert_score if expert is None else expert.get(r.item_id)
    if name == "direct":
        return r.direct_score
    if name == "refute":
        return r.refute_score
    if name == "blend":
        return fuse(r.direct_score, r.refute_score, alpha)
    if name == "expert":
        return NEUTRAL_EXPERT if e is None else e
    if name == "fused":
        return fuse(r.direct_score, r.refute_score, alpha, e, expert_weight)
    raise ValueError(f"unknown score column {name!r}; choose from {COLUMNS + ('expert',)}")


def scored(records: Iterable[Record], *, expert: dict[str, float] | None = None,
           require_expert: bool = False) -> list[Record]:
    """The rows evaluation scores: :func:`kept`, and with ``require_expert`` only those that
    have an expert score (in ``expert`` when given, else their own)."""
    rows = kept(records)
    if require_expert:
        rows = [r for r in rows if (r.expert_score if expert is None else expert.get(r.item_id)) is not None]
    return rows


def records_expert_weight(records: Iterable[Record]) -> float | None:
    """The expert weight the records were fused with (``w_expert``), when every kept record with
    an expert score agrees on it; None otherwise (or when none has an expert score)."""
    weights = {float(r.w_expert) for r in kept(records) if r.expert_score is not None}
    return weights.pop() if len(weights) == 1 else None


def auroc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """scikit-learn AUROC; NaN when only one class is present."""
    y = np.asarray(labels)
    if y.size == 0 or np.unique(y).size < 2:
        return float("nan")
    return float(roc_auc_score(y, np.asarray(scores, dtype=float)))


def by_domain(records: Iterable[Record]) -> dict[str, list[Record]]:
    groups: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        groups[r.domain_code or r.domain or "?"].append(r)
    return dict(sorted(groups.items(), key=lambda kv: domain_order(kv[0])))


def domain_name(code: str, records: Iterable[Record] = ()) -> str | None:
    """A domain's name for tables: the records' most common ``domain`` (when it is not just the
    code again), else the built-in card's name (released records carry codes only)."""
    names = Counter(r.domain for r in records if r.domain and r.domain != code)
    if names:
        return names.most_common(1)[0][0]
    card = BUILTIN_CARDS.get(code)
    return card.name if card else None


def domain_order(code: str) -> tuple:
    digits = "".join(c for c in code if c.isdigit())
    return (code.rstrip("0123456789"), int(digits) if digits else 0, code)


def _nanmean(values: Iterable[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def expert_weight_choice(records: Sequence[Record], expert_weight: float | None,
                         expert: dict[str, float] | None = None) -> tuple[float, str]:
    """(weight, why): ``expert_weight`` when given; else the records' own ``w_expert`` when they
    agree on one (and no external ``expert`` replaces their scores); else the default weight
    when there is an expert score; else 0."""
    if expert_weight is not None:
        return check_expert_weight(expert_weight), "given"
    if expert is None and (own := records_expert_weight(records)) is not None:
        return own, "the records' own w_expert"
    if has_expert_scores(records, expert):
        return DEFAULT_EXPERT_WEIGHT, "the default"
    return 0.0, "no expert scores"


def has_expert_scores(records: Sequence[Record], expert: dict[str, float] | None = None) -> bool:
    """Whether an expert term exists: external scores joined, or a kept record's own."""
    return expert is not None or any(r.expert_score is not None for r in kept(records))


def resolve_expert_weight(records: Sequence[Record], expert_weight: float | None,
                          expert: dict[str, float] | None = None) -> float:
    """The weight of :func:`expert_weight_choice`."""
    return expert_weight_choice(records, expert_weight, expert)[0]


def evaluate(records: Sequence[Record], *, alpha: float = 0.5, expert_weight: float | None = None,
             expert: dict[str, float] | None = None, require_expert: bool = False,
             columns: Sequence[str] | None = None) -> dict:
    """Per-domain and macro AUROC of the direct, refutation, blend and fused scores.

    Returns ``{"rows", "kept", "left_out": {reason: n}, "alpha", "expert_weight", "macro_auroc":
    {col: x}, "per_domain": {code: {col: x, "n": n, "n_anomalous": k, "name": domain name or
    None}}}``. An ``expert`` column
    (the expert's unit score alone; a missing one counts as 0.5) is added when any kept row has an
    expert score. ``expert`` (item id -> unit score) replaces the records' own ``expert_score``;
    ``require_expert`` leaves out rows without one ("no expert score"). ``expert_weight`` None
    is :func:`resolve_expert_weight`'s choice (the records' own). ``columns`` limits the
    columns scored (a sweep needs only ``fused``). Domains with a single class get NaN and are
    left out of the macro mean.
    """
    expert_weight = resolve_expert_weight(records, expert_weight, expert)
    rows = scored(records, expert=expert, require_expert=require_expert)
    left_out = left_out_counts(records)
    if require_expert and len(kept(records)) > len(rows):
        left_out[NO_EXPERT] = len(kept(records)) - len(rows)
    cols = list(COLUMNS)
    if any((r.expert_score if expert is None else expert.get(r.item_id)) is not None for r in rows):
        cols.insert(3, "expert")
    if columns is not None:
        cols = [c for c in cols if c in columns]
    per_domain: dict[str, dict] = {}
    for code, group in by_domain(rows).items():
        labels = [r.label_gt for r in group]
        entry = {c: auroc(labels, [column(r, c, alpha, expert_weight, expert) for r in group]) for c in cols}
        entry.update(n=len(group), n_anomalous=int(sum(labels)), name=domain_name(code, group))
        per_domain[code] = entry
    macro = {c: _nanmean(d[c] for d in per_domain.values()) for c in cols}
    return {"rows": len(records), "kept": len(rows), "left_out": left_out, "alpha": alpha,
            "expert_weight": expert_weight, "macro_auroc": macro, "per_domain": per_domain}


def _auroc_rows(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUROC of each row of ``scores`` [B, n] against ``labels`` [B, n] (Mann-Whitney U with
    average ranks for ties: the same value as ``roc_auc_score``, vectorised for the bootstrap).
    Rows with a single class give NaN."""
    ranks = rankdata(scores, axis=1)
    pos = labels == 1
    n1 = pos.sum(axis=1).astype(float)
    n0 = labels.shape[1] - n1
    u = (ranks * pos).sum(axis=1) - n1 * (n1 + 1) / 2.0
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n1 > 0) & (n0 > 0), u / (n1 * n0), np.nan)


@dataclass
class BootstrapResult:
    """Macro-AUROC difference ``a - b`` with a percentile confidence interval."""

    a: str
    b: str
    diff: float
    ci_low: float
    ci_high: float
    p_le_zero: float
    """Fraction of bootstrap replicates with a difference <= 0 (one-sided)."""
    n_items: int
    n_boot: int
    level: float

    def to_json(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def paired_bootstrap(scores_a: dict[str, float], scores_b: dict[str, float],
                     labels: dict[str, int], domains: dict[str, str], *, n_boot: int = 1000,
                     level: float = 0.95, seed: int = 0, names: tuple[str, str] = ("a", "b")
                     ) -> BootstrapResult:
    """Paired, domain-stratified bootstrap of macro AUROC(a) - macro AUROC(b).

    Items (the ids present in both score maps) are resampled with replacement within each
    domain, the same draw for both columns, so the interval reflects the paired difference.
    """
    ids = sorted(set(scores_a) & set(scores_b) & set(labels))
    groups: dict[str, list[str]] = defaultdict(list)
    for i in ids:
        groups[domains.get(i, "?")].append(i)
    arrays = []
    for code in sorted(groups):
        g = groups[code]
        y = np.array([labels[i] for i in g])
        if np.unique(y).size < 2:
            continue
        arrays.append((y, np.array([scores_a[i] for i in g], float), np.array([scores_b[i] for i in g], float)))
    if not arrays:
        raise ValueError("no domain has both labels among the shared items; cannot bootstrap")

    rng = np.random.default_rng(seed)
    point = float(np.mean([roc_auc_score(y, a) - roc_auc_score(y, b) for y, a, b in arrays]))
    per_domain = []
    for y, a, b in arrays:
        draws = rng.integers(0, len(y), size=(n_boot, len(y)))
        per_domain.append(_auroc_rows(y[draws], a[draws]) - _auroc_rows(y[draws], b[draws]))
    # A replicate that drew one class only in some domain averages over the other domains.
    boots = np.nanmean(np.vstack(per_domain), axis=0)
    boots = boots[~np.isnan(boots)]
    tail = (1.0 - level) / 2.0
    return BootstrapResult(a=names[0], b=names[1], diff=point,
                           ci_low=float(np.quantile(boots, tail)), ci_high=float(np.quantile(boots, 1 - tail)),
                           p_le_zero=float(np.mean(boots <= 0)), n_items=len(ids), n_boot=int(boots.size),
                           level=level)


def bootstrap_columns(records: Sequence[Record], col_a: str, col_b: str, *, alpha: float = 0.5,
                      n_boot: int = 1000, seed: int = 0, other: Sequence[Record] | None = None,
                      expert_weight: float | None = None, expert: dict[str, float] | None = None,
                      require_expert: bool = False) -> BootstrapResult:
    """Bootstrap ``col_a`` of ``records`` against ``col_b`` of ``other`` (or of the same run).
    The expert term (``expert_weight``, ``expert``) is held fixed across resamples: its
    per-domain normalisation is computed once, on all evaluated items. ``expert_weight`` None
    is :func:`resolve_expert_weight`'s choice for ``records``."""
    expert_weight = resolve_expert_weight(records, expert_weight, expert)
    rows_a = scored(records, expert=expert, require_expert=require_expert)
    rows_b = kept(other) if other is not None else rows_a
    sa = {r.item_id: column(r, col_a, alpha, expert_weight, expert) for r in rows_a}
    # The other run is fused at the same weight, with its own records' expert scores.
    sb = {r.item_id: column(r, col_b, alpha, expert_weight, expert if other is None else None) for r in rows_b}
    labels = {r.item_id: int(r.label_gt) for r in rows_a}
    domains = {r.item_id: r.domain_code or r.domain or "?" for r in rows_a}
    names = (col_a, col_b) if other is None else (f"{col_a} (this run)", f"{col_b} (other run)")
    return paired_bootstrap(sa, sb, labels, domains, n_boot=n_boot, seed=seed, names=names)
