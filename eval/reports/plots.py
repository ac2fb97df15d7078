"""Plots of an evaluation: ROC curves per domain and per-domain AUROC bars, as PNG files."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from anomalyclaw.eval.scoring.metrics import auroc, by_domain, column, scored  # noqa: E402
from anomalyclaw.eval.running.records import Record  # noqa: E402

COLOURS = {"direct": "#1f77b4", "refute": "#d62728", "fused": "#2ca02c", "expert": "#9467bd"}


def plot_roc_curves(records: Sequence[Record], path: str | Path, *, alpha: float = 0.5,
                    columns: Sequence[str] = ("direct", "refute", "fused"), expert_weight: float = 0.0,
                    expert: dict[str, float] | None = None, require_expert: bool = False) -> Path:
    """One panel per domain with a ROC curve per score column, each labelled with its AUROC in
    the panel's legend (``fused`` at ``expert_weight``, with ``expert`` scores by item id in
    place of the records' own when given). Curves are drawn widest first and not clipped at the
    axes, so that equal curves and a perfect one (which runs along the axes) stay visible."""
    groups = by_domain(scored(records, expert=expert, require_expert=require_expert))
    n = max(1, len(groups))
    ncols = min(4, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.0 * nrows), squeeze=False)
    for ax, (code, group) in zip(axes.flat, groups.items()):
        y = np.array([r.label_gt for r in group])
        drawn = 0
        for k, col in enumerate(columns):
            s = [column(r, col, alpha, expert_weight, expert) for r in group]
            if np.unique(y).size < 2 or any(v is None for v in s):
                continue
            fpr, tpr, _ = roc_curve(y, s)
            ax.plot(fpr, tpr, color=COLOURS.get(col), lw=3.2 - 0.9 * k, clip_on=False, zorder=3 + k,
                    label=f"{col} AUROC {auroc(y, s):.3f}")
            drawn += 1
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
        ax.set_title(f"{_short(code)} (n={len(group)})", fontsize=9)
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.tick_params(labelsize=7)
        if drawn:
            ax.legend(fontsize=6.5, loc="lower right")
        else:
            ax.text(0.5, 0.5, "one class only:\nno ROC curve", ha="center", va="center", fontsize=7, color="0.4")
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.supxlabel("false positive rate", fontsize=9)
    fig.supylabel("true positive rate", fontsize=9)
    return _save(fig, path)


def plot_domain_bars(result: dict, path: str | Path,
                     columns: Sequence[str] = ("direct", "refute", "fused")) -> Path:
    """Grouped bars of per-domain AUROC (the dict :func:`metrics.evaluate` returns)."""
    codes = list(result["per_domain"]) + ["macro"]
    cols = [c for c in columns if c in result["macro_auroc"]]
    x = np.arange(len(codes))
    width = 0.8 / max(1, len(cols))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(codes) + 2), 3.4))
    for k, col in enumerate(cols):
        vals = [result["per_domain"][c][col] for c in codes[:-1]] + [result["macro_auroc"][col]]
        ax.bar(x + (k - (len(cols) - 1) / 2) * width, vals, width, label=col, color=COLOURS.get(col))
    ax.axhline(0.5, color="0.6", lw=0.8, ls="--")
    ax.set_xticks(x, [_short(c) for c in codes], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("AUROC")
    ax.legend(fontsize=8, ncols=len(cols), loc="lower left")
    return _save(fig, path)


def _short(label: str, limit: int = 24) -> str:
    """A domain label cut to ``limit`` characters for a panel title or tick (a 10,000-character
    domain name must not push the axes off the figure)."""
    label = str(label)
    return label if len(label) <= limit else label[: limit - 1] + "\u2026"


def _save(fig: "plt.Figure", path: str | Path) -> Path:
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
