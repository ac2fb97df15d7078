"""Data and evaluation: manifests, the synthetic benchmark, MVTec folders, the batch runner,
records, metrics (AUROC, bootstrap), plots, reports and benchmarks."""
