"""Data, runs and evaluation, one subpackage per concern:

- :mod:`.data`: manifests, MVTec-style folders, the synthetic benchmark;
- :mod:`.running`: the batch runner and the run records;
- :mod:`.scoring`: metrics (AUROC, bootstrap), the fusion weight, result tables;
- :mod:`.reports`: the HTML report, plots, traces;
- :mod:`.bench`: the benchmarks behind ``anomalyclaw bench``.

    from anomalyclaw.eval import load_manifest, Runner, load_records, evaluate
"""
import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach(__name__, submod_attrs={
    "data.manifests": ["load_manifest", "read_manifest", "write_manifest"],
    "data.folders": ["import_mvtec_folder"],
    "data.synth": ["generate_benchmark"],
    "running.runner": ["Runner", "RunSummary", "run_items", "run_sync"],
    "running.records": ["Record", "load_records", "write_records"],
    "scoring.metrics": ["bootstrap_columns", "evaluate", "paired_bootstrap"],
    "scoring.weights": ["choose_expert_weight"],
    "scoring.tables": ["format_table"],
    "reports.html": ["build_report"],
    "reports.plots": ["plot_domain_bars", "plot_roc_curves"],
    "reports.trace": ["format_trace"],
})
