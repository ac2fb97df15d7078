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


def _torch():
    """torch, imported if it is installed (experts use it: set its threads before they do)."""
    torch = sys.modules.get("torch")
    if torch is None:
        try:
            import torch  # noqa: PLC0415
        except ImportError:
            return None
    return torch


def set_compute_threads(n: int) -> None:
    """For the rest of the process (a worker's lifetime): BLAS/OpenMP pools and torch use at most
    ``n`` threads."""
    threadpool_limits(limits=n)
    torch = _torch()
    if torch is not None:
        torch.set_num_threads(n)


@contextlib.contextmanager
def limit_compute_threads(n: int | None = 1) -> Iterator[None]:
    """Within the block, BLAS/OpenMP pools and torch use at most ``n`` threads (None: as is)."""
    if n is None:
        yield
        return
    torch = _torch()
    before = torch.get_num_threads() if torch is not None else None
    with threadpool_limits(limits=n):
        if torch is not None:
            torch.set_num_threads(n)
        try:
            yield
        finally:
            if torch is not None and before is not None:
                torch.set_num_threads(before)
