"""One knob for intra-operation threads (BLAS, OpenMP, torch) while items run in parallel.

The runner parallelises across items (threads for tools and experts); letting every small
matrix product also fan out over all cores oversubscribes the machine: under load a small PCA
fit becomes several times slower with the default BLAS threads than with one
(``anomalyclaw bench`` measures the runner with this setting).
"""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator

from threadpoolctl import threadpool_limits


@contextlib.contextmanager
def limit_compute_threads(n: int | None = 1) -> Iterator[None]:
    """Within the block, BLAS/OpenMP pools and torch use at most ``n`` threads (None: as is)."""
    if n is None:
        yield
        return
    torch = sys.modules.get("torch")
    if torch is None:
        try:
            import torch  # noqa: PLC0415 (experts use it; set it before they do)
        except ImportError:
            torch = None
    before = torch.get_num_threads() if torch is not None else None
    with threadpool_limits(limits=n):
        if torch is not None:
            torch.set_num_threads(n)
        try:
            yield
        finally:
            if torch is not None and before is not None:
                torch.set_num_threads(before)
