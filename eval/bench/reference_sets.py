"""The "new reference set" case of ``anomalyclaw bench``: items that each bring a reference set
never fitted before, as most real items do.

On CrossDomainVAD-12's test split 61% of items bring a new set while 73% of reference images
repeat (references are drawn from a pool of normal images per category; ``bench`` measures it
when the manifests are at hand). :func:`new_set_items` builds such items from the synthetic
domains: every item draws ``n_refs`` references (10 by default) from a per-domain pool of
``pool_size`` normal images, no two items with the same set. :func:`bench_new_sets` fits the
fusion's expert on each new set, with the current pool and with the pool as it was before the
per-image caches (features, pairwise neighbour distances) and the fast search, in the same run.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from anomalyclaw.imaging import save_image
from anomalyclaw.items import Item

#: Domains with a pool of references (bi-temporal S6 has one "before" image per item instead).
DOMAINS = ("S1", "S2", "S3", "S4", "S5", "S7")


def new_set_items(folder: str | Path, n_items: int, *, size: int = 512, n_refs: int = 10, pool_size: int = 16,
                  domains: Sequence[str] = DOMAINS, seed: int = 0) -> list[Item]:
    """``n_items`` test items (half anomalous), each with its own set of ``n_refs`` references
    drawn from a pool of ``pool_size`` normal images of its domain (images are written under
    ``folder``; sets never repeat)."""
    from anomalyclaw.eval.data.synth.table import DOMAINS as SYNTH

    if n_refs > pool_size:
        raise ValueError(f"n_refs ({n_refs}) cannot exceed pool_size ({pool_size})")
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    chosen = [SYNTH[code] for code in domains]
    pools: dict[str, list[Path]] = {}
    items: list[Item] = []
    seen: set[tuple[str, ...]] = set()
    for k in range(n_items):
        dom = chosen[k % len(chosen)]
        if dom.code not in pools:
            paths = []
            for i in range(pool_size):
                path = folder / dom.code / f"ref_{i:02d}.png"
                if not path.exists():
                    save_image(dom.sample(np.random.default_rng([seed, int(dom.code[1:]), 1000 + i]), size,
                                          False).image, path)
                paths.append(path)
            pools[dom.code] = paths
        while True:
            picks = tuple(sorted(int(i) for i in rng.choice(pool_size, n_refs, replace=False)))
            refs = tuple(pools[dom.code][i] for i in picks)
            if tuple(map(str, refs)) not in seen:
                seen.add(tuple(map(str, refs)))
                break
        label = k % 2
        query = folder / dom.code / f"query_{k:04d}.png"
        sample = dom.sample(np.random.default_rng([seed, int(dom.code[1:]), k]), size, bool(label))
        save_image(sample.image, query)
        items.append(Item(item_id=f"new_{dom.code}_{k:04d}", query_path=query, ref_paths=refs, domain=dom.name,
                          domain_code=dom.code, label=label, anomaly_type=sample.anomaly_type,
                          category=dom.category, split="test", card=dom.card))
    return items


#: The two ways the bench fits experts: the current pool, and the pool as it was before the
#: per-image caches and the shared leave-one-out parts (a refit per held-out image, every set's
#: images encoded again).
POOL_VARIANTS: dict[str, dict[str, Any]] = {
    "before": {"held_out": "direct", "max_feature_mb": 0.0, "max_held_out_mb": 0.0},
    "after": {},
}


def bench_new_sets(work: str | Path, *, n_sets: int = 24, size: int = 512, n_refs: int = 10,
                   pool_size: int = 16, domains: Sequence[str] = DOMAINS) -> dict[str, Any]:
    """Fit time per new reference set (``n_refs`` references at ``size`` px) with each pool
    variant of :data:`POOL_VARIANTS`, one fresh pool each, over the same ``n_sets`` items of
    :func:`new_set_items` (images decoded beforehand: decoding is not a fit). CPU time of the
    fitting thread (one intra-op thread, as in a run) and wall time, per expert."""
    from anomalyclaw.cache import clear_caches
    from anomalyclaw.experts.pool import DEFAULT_EXPERT, EXPERTS, ExpertPool, default_params
    from anomalyclaw.threads import limit_compute_threads
    from anomalyclaw.tools.item_context import ItemContext

    items = new_set_items(Path(work) / "new_sets", n_sets, size=size, n_refs=n_refs, pool_size=pool_size,
                          domains=[d for d in domains if d in DOMAINS] or DOMAINS)
    contexts = [ItemContext(item, work_side=size).preload() for item in items]
    out: dict[str, Any] = {"sets": n_sets, "references_per_set": n_refs, "image_side": size,
                           "images_per_domain": pool_size, "domains": len({it.domain_code for it in items}),
                           "variants": {}}
    for variant, kwargs in POOL_VARIANTS.items():
        clear_caches()
        pool = ExpertPool("classic", **kwargs)
        _ = pool.backbone
        row: dict[str, Any] = {}
        with limit_compute_threads(1):
            for name in (DEFAULT_EXPERT, *[n for n in EXPERTS if n != DEFAULT_EXPERT]):
                cpu, wall = [], []
                for item, ctx in zip(items, contexts):
                    c, w = time.thread_time(), time.perf_counter()
                    pool.expert(name, item.reference_set_key, lambda ctx=ctx: ctx.references,
                                **default_params(name, item.traits))
                    cpu.append(time.thread_time() - c)
                    wall.append(time.perf_counter() - w)
                # The first expert of a set also encodes its images (features); the second reuses them.
                row[name] = {"fit_cpu_ms_per_set": round(1000 * float(np.mean(cpu)), 1),
                             "fit_wall_ms_per_set": round(1000 * float(np.mean(wall)), 1),
                             "first_set_cpu_ms": round(1000 * cpu[0], 1),
                             "last_half_cpu_ms_per_set": round(1000 * float(np.mean(cpu[len(cpu) // 2:])), 1)}
        row["pool"] = pool.stats
        out["variants"][variant] = row
    before, after = out["variants"]["before"], out["variants"]["after"]
    out["speedup"] = {name: round(before[name]["fit_cpu_ms_per_set"] / max(after[name]["fit_cpu_ms_per_set"], 1e-9), 2)
                      for name in before if name != "pool"}
    return out


def format_new_sets(result: dict[str, Any]) -> str:
    lines = [f"New reference sets: {result['sets']} sets of {result['references_per_set']} references at "
             f"{result['image_side']} px, drawn from {result['images_per_domain']} normal images per domain "
             f"({result['domains']} domains); fit CPU ms per set (one thread), the fusion's expert first "
             "(it encodes the images)",
             f"{'expert':<14} {'variant':<8} {'cpu ms/set':>10} {'wall ms/set':>11} {'first set':>10} "
             f"{'2nd half':>9}"]
    for variant, row in result["variants"].items():
        for name, r in row.items():
            if name == "pool":
                continue
            lines.append(f"{name:<14} {variant:<8} {r['fit_cpu_ms_per_set']:>10.1f} {r['fit_wall_ms_per_set']:>11.1f} "
                         f"{r['first_set_cpu_ms']:>10.1f} {r['last_half_cpu_ms_per_set']:>9.1f}")
    lines.append("speedup (before / after, cpu ms per set): "
                 + ", ".join(f"{k} {v}x" for k, v in result["speedup"].items()))
    return "\n".join(lines)
