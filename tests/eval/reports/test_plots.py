"""ROC plots say their AUROC: each curve's legend entry carries it, and a perfect curve, which
runs along the axes, is still drawn inside the visible area (issue 15)."""
from __future__ import annotations

from anomalyclaw.eval.reports import plots
from anomalyclaw.eval.running.records import Record


def _records() -> list[Record]:
    # S1: both branches perfect (a curve along the axes); S2: direct 0.75, refute perfect; S3: one class.
    rows = [("S1", 1, 0.9, 0.8), ("S1", 0, 0.1, 0.2), ("S1", 1, 0.8, 0.9), ("S1", 0, 0.2, 0.1),
            ("S2", 1, 0.9, 0.9), ("S2", 0, 0.6, 0.2), ("S2", 1, 0.5, 0.8), ("S2", 0, 0.4, 0.1),
            ("S3", 0, 0.3, 0.3)]
    return [Record(item_id=f"{d}_{k}", domain_code=d, label_gt=y, direct_score=a, refute_score=b)
            for k, (d, y, a, b) in enumerate(rows)]


def test_roc_legends_carry_the_auroc_and_perfect_curves_stay_visible(tmp_path, monkeypatch):
    figures = []
    real_save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (figures.append(fig), real_save(fig, path))[1])
    path = plots.plot_roc_curves(_records(), tmp_path / "roc.png", columns=("direct", "refute"))
    assert path.is_file() and path.stat().st_size > 1000
    axes = [ax for ax in figures[0].axes if ax.get_title()]
    legends = {ax.get_title(): [t.get_text() for t in ax.get_legend().get_texts()] if ax.get_legend() else []
               for ax in axes}
    assert legends["S1 (n=4)"] == ["direct AUROC 1.000", "refute AUROC 1.000"]
    assert legends["S2 (n=4)"] == ["direct AUROC 0.750", "refute AUROC 1.000"]
    assert legends["S3 (n=1)"] == [] and "one class only" in [t.get_text() for t in axes[2].texts][0]
    s1 = axes[0]
    xmin, xmax = s1.get_xlim()
    ymin, ymax = s1.get_ylim()
    assert xmin < 0 and xmax > 1 and ymin < 0 and ymax > 1  # the axes' own lines do not hide the curve
    curves = [line for line in s1.get_lines() if line.get_label().endswith("1.000")]
    assert len(curves) == 2 and curves[0].get_linewidth() > curves[1].get_linewidth()  # equal curves both show
