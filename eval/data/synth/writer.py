"""Writing the benchmark: references, items, masks and the manifest, deterministic in the seed."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
from anomalyclaw.eval.data.manifests import write_manifest

from anomalyclaw.errors import ConfigError
from anomalyclaw.imaging import save_image
from anomalyclaw.items import Item

from .base import (
    DEFECT_FAMILIES,
    N_REFERENCES,
    REFERENCE_POOL_SIZE,
    SOURCE_DATASET,
    SynthDomain,
)
from .table import _choose_domains


def _split_plan(rng: np.random.Generator, counts: dict[str, int]) -> list[tuple[str, int]]:
    """(split, label) per item: each split about half anomalous, in shuffled order."""
    plan = []
    for split, n in counts.items():
        labels = np.array([1] * (n // 2) + [0] * (n - n // 2))
        rng.shuffle(labels)
        plan.extend((split, int(label)) for label in labels)
    return plan


def _domain_folder(out_dir: Path, dom: SynthDomain) -> Path:
    return out_dir / f"{dom.code}_{dom.name}"


def _reference_path(out_dir: Path, dom: SynthDomain, i: int) -> Path:
    return _domain_folder(out_dir, dom) / "references" / f"{dom.code}_ref_{i:02d}.png"


def _write_reference(dom: SynthDomain, out_dir: Path, seed: int, i: int, size: int) -> None:
    """Render and write normal reference ``i`` of the domain's pool."""
    ref = dom.sample(np.random.default_rng([seed, int(dom.code[1:]), 1_000_000 + i]), size, False)
    save_image(ref.image, _reference_path(out_dir, dom, i))


def _write_item(dom: SynthDomain, out_dir: Path, seed: int, index: int, split: str, label: int, size: int) -> Item:
    """Render and write item ``index`` of the domain (its own random stream, so items can be
    made in any order or in parallel) and return it."""
    rng = np.random.default_rng([seed, int(dom.code[1:]), index])
    folder = _domain_folder(out_dir, dom)
    item_id = f"{dom.code}_{index:04d}"
    if dom.bi_temporal:
        sample = dom.sample(rng, size, bool(label))
        refs = (folder / "before" / f"{item_id}_before.png",)
        save_image(sample.reference, refs[0])
    else:
        picks = sorted(int(i) for i in rng.choice(REFERENCE_POOL_SIZE, N_REFERENCES, replace=False))
        refs = tuple(_reference_path(out_dir, dom, i) for i in picks)
        sample = dom.sample(rng, size, bool(label))
    query = folder / "queries" / f"{item_id}.png"
    save_image(sample.image, query)
    mask_path = None
    if sample.mask is not None:
        mask_path = folder / "masks" / f"{item_id}_mask.png"
        save_image(sample.mask.astype(np.uint8) * 255, mask_path)
    return Item(item_id=item_id, query_path=query, ref_paths=refs, domain=dom.name, domain_code=dom.code,
                label=label, anomaly_type=sample.anomaly_type, source_dataset=SOURCE_DATASET,
                category=dom.category, split=split, mask_path=mask_path, card=dom.card,
                extra={"defect_family": DEFECT_FAMILIES.get(sample.anomaly_type or ""),
                       "defect_severity": sample.severity})


def generate_benchmark(out_dir: str | Path, seed: int = 0, *, n_test_per_domain: int = 24, n_calibration: int = 8,
                       n_dev: int = 8, size: int = 256, domains: Sequence[str] | None = None,
                       workers: int | None = None) -> Path:
    """Write the synthetic benchmark to ``out_dir`` and return the path of its ``manifest.json``.

    Per domain: ``n_calibration``, ``n_dev`` and ``n_test_per_domain`` items (about half of each
    anomalous), images of ``size`` x ``size`` px, a pool of :data:`REFERENCE_POOL_SIZE` normal
    reference images from which each item draws :data:`N_REFERENCES` (a bi-temporal item gets its
    own "before" image instead), and a uint8 PNG mask (255 = anomalous) per anomalous item.
    ``domains`` picks codes (``S1``) or names (``texture_surface``); each domain's images depend
    only on ``seed`` and the domain, so a subset reproduces the same files. ``workers`` threads
    render in parallel (default: one per CPU core, at most 8); the output does not depend on it.
    Existing files are overwritten; manifest paths are relative, so the folder can be moved.
    """
    if not isinstance(size, (int, np.integer)) or not 64 <= size <= 1024:
        raise ConfigError(f"size must be an integer from 64 to 1024 px, got {size!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    counts = {"calibration": n_calibration, "dev": n_dev, "test": n_test_per_domain}
    for split, n in counts.items():
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise ConfigError(f"the number of {split} items per domain must be a non-negative integer, got {n!r}")
    if n_test_per_domain < 2:
        raise ConfigError(f"n_test_per_domain must be at least 2 (one normal, one anomalous), got {n_test_per_domain}")
    if workers is not None and (not isinstance(workers, (int, np.integer)) or workers < 1):
        raise ConfigError(f"workers must be a positive integer or None, got {workers!r}")
    chosen = _choose_domains(domains)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    seed, size = int(seed), int(size)
    reference_jobs = [(dom, i) for dom in chosen if not dom.bi_temporal for i in range(REFERENCE_POOL_SIZE)]
    item_jobs = [(dom, index, split, label) for dom in chosen
                 for index, (split, label) in enumerate(_split_plan(np.random.default_rng([seed, int(dom.code[1:])]),
                                                                    counts))]
    # OpenCV and NumPy release the GIL in their loops, so threads render and encode in parallel.
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(lambda job: _write_reference(job[0], out, seed, job[1], size), reference_jobs))
        items = list(pool.map(lambda job: _write_item(job[0], out, seed, job[1], job[2], job[3], size), item_jobs))
    return write_manifest(items, out / "manifest.json")
