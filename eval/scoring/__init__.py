"""Scoring records: AUROC per domain and branch, paired bootstrap intervals, the fusion's expert
weight chosen on calibration, the image threshold and F1 at it, pixel AUROC / AUPRO / box hits
of the anomaly maps, multiple-choice accuracy as MMAD scores it, and the tables the command
line prints."""
import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach(__name__, submod_attrs={
    "metrics": ["BootstrapResult", "auroc", "bootstrap_columns", "evaluate", "kept", "paired_bootstrap"],
    "weights": ["choose_expert_weight"],
    "tables": ["format_table", "rounded"],
    "pixels": ["aupro", "evaluate_pixels", "format_pixel_table", "pixel_auroc", "pro_curve"],
    "thresholds": ["choose_threshold", "decision_metrics", "f1_max_threshold", "format_decision_table"],
    "mcqa": ["bootstrap_mcqa", "evaluate_mcqa", "format_mcqa_table", "split_records"],
})
