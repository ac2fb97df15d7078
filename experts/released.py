"""Readers for the released CrossDomainVAD-12 expert outputs and DINOv2 retrieval indexes.

``expert_cache/{subspacead,anomalyvfm}_{split}.json`` hold per-item frozen-expert outputs of
the paper's run; ``retrieval_index/D*_index.npz`` hold CLS embeddings of each domain's
reference pool. The score files are keyed by an older revision of the item ids (domain codes
such as D3b): only some ids match the current manifests, and no mapping is guessed here; use
:meth:`ReleasedScoreCache.ids` to measure coverage.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

#: Cache file stem per expert; the tool-facing names are accepted as aliases.
RELEASED_EXPERTS = ("subspacead", "anomalyvfm")
_ALIASES = {"subspacead": "subspacead", "subspace_ad": "subspacead",
            "anomalyvfm": "anomalyvfm", "anomaly_vfm": "anomalyvfm"}
THRESHOLDS_FILE = "subspacead_thresholds.json"


def _canonical(expert: str) -> str:
    key = _ALIASES.get(expert.strip().lower())
    if key is None:
        raise ValueError(f"unknown released expert {expert!r}; choose one of {sorted(_ALIASES)}")
    return key


@dataclass
class ReleasedScoreCache:
    """Released per-item expert outputs, looked up by item id and expert.

    ``entries[expert][item_id]`` is the raw row; ``sources`` lists the files read and
    ``missing`` the expert/split files that were asked for but are not in the folder (the
    release has no ``anomalyvfm_dev.json``, for one).
    """

    folder: Path
    entries: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    sources: list[Path] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, folder: str | os.PathLike, experts: Iterable[str] = RELEASED_EXPERTS,
             splits: Iterable[str] = ("calibration", "dev", "test")) -> "ReleasedScoreCache":
        """Read every ``{expert}_{split}.json`` present in ``folder`` (and the SubspaceAD
        thresholds). Raises FileNotFoundError when the folder is absent or holds none of them,
        ValueError naming the file when one is not a JSON array of records with ``item_id``."""
        root = Path(folder).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"expert cache folder {root} does not exist; it is "
                                    "crossdomainvad12/expert_cache in the reference data")
        cache = cls(folder=root)
        for expert in experts:
            name = _canonical(expert)
            table = cache.entries.setdefault(name, {})
            for split in splits:
                path = root / f"{name}_{split}.json"
                if not path.is_file():
                    cache.missing.append(path.name)
                    continue
                for row in _read_rows(path):
                    # An id in two splits would be a data error; the first split read wins.
                    table.setdefault(row["item_id"], row)
                cache.sources.append(path)
        if not cache.sources:
            raise FileNotFoundError(f"no expert cache files in {root}: expected names such as "
                                    f"subspacead_test.json; missing {cache.missing}")
        threshold_path = root / THRESHOLDS_FILE
        if threshold_path.is_file():
            raw = json.loads(threshold_path.read_text(encoding="utf-8"))
            if not isinstance(raw, dict):
                raise ValueError(f"{threshold_path}: expected an object of domain code -> threshold")
            cache.thresholds = {str(k): float(v) for k, v in raw.items()}
        return cache

    def get(self, item_id: str, expert: str) -> dict[str, Any] | None:
        """The released output for ``item_id``, or None when the cache does not have it.

        ``{"score", "score_norm" (None when the file has none), "top_patches", "label_pred",
        "threshold" (SubspaceAD's per-domain threshold, else None), "domain_code", "split",
        "error"}``.
        """
        name = _canonical(expert)
        row = self.entries.get(name, {}).get(item_id)
        if row is None:
            return None
        threshold = self.thresholds.get(row.get("domain_code", "")) if name == "subspacead" else None
        return {"score": row.get("anomaly_score"), "score_norm": row.get("anomaly_score_norm"),
                "top_patches": row.get("top_patches") or [], "label_pred": row.get("label_pred"),
                "threshold": threshold, "domain_code": row.get("domain_code"),
                "split": row.get("split"), "error": row.get("error")}

    def for_item(self, item: Any, expert: str) -> dict[str, Any] | None:
        """``get`` for a manifest :class:`~anomalyclaw.items.Item`, but only when the cached
        row is the same question: its split, domain code and label agree with the item's.

        The cache predates the current ids, so an id can name a different image there; on
        the test split 678 of the 687 shared ids agree (measured on the released files). That
        agreement does not show the images are the same: ids are numbered normals first in every
        domain, so labels agree across revisions even where the dataset changed. Only D1 and D5
        keep their domain (``row["domain"]``); the README's results section has the figures.
        """
        row = self.entries.get(_canonical(expert), {}).get(item.item_id)
        if row is None:
            return None
        if (row.get("split") != item.split or row.get("domain_code") != item.domain_code
                or (item.label is not None and row.get("label_gt") != item.label)):
            return None
        return self.get(item.item_id, expert)

    def ids(self, expert: str) -> set[str]:
        """Every item id the cache holds for ``expert``."""
        return set(self.entries.get(_canonical(expert), {}))

    def __contains__(self, item_id: object) -> bool:
        return any(item_id in table for table in self.entries.values())


def _read_rows(path: Path) -> list[dict[str, Any]]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON array of per-item records")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("item_id"), str):
            raise ValueError(f"{path}: record #{i} has no string 'item_id'")
    return rows


@dataclass
class RetrievalIndex:
    """Embeddings of a reference pool: ``embeddings`` float32 ``[N, D]`` (L2-normalised on
    load) and the image ``paths`` ``[N]`` as the release wrote them."""

    embeddings: np.ndarray
    paths: np.ndarray
    source: Path | None = None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RetrievalIndex":
        """Read a ``D*_index.npz`` with arrays ``embeddings`` [N, D] and ``paths`` [N]."""
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"retrieval index {p} does not exist")
        with np.load(p, allow_pickle=False) as archive:
            absent = {"embeddings", "paths"} - set(archive.files)
            if absent:
                raise ValueError(f"{p}: missing array(s) {sorted(absent)}; found {archive.files}")
            embeddings = np.asarray(archive["embeddings"], dtype=np.float32)
            paths = np.asarray(archive["paths"]).astype(str)
        if embeddings.ndim != 2 or paths.shape != (embeddings.shape[0],):
            raise ValueError(f"{p}: expected embeddings [N, D] and paths [N], got "
                             f"{embeddings.shape} and {paths.shape}")
        norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
        return cls(embeddings=embeddings / np.maximum(norms, 1e-12), paths=paths, source=p)

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def nearest(self, embedding: np.ndarray, k: int = 5) -> list[tuple[int, float, str]]:
        """The ``k`` entries most similar to ``embedding`` [D]: ``(index, cosine similarity,
        path)``, most similar first."""
        query = np.asarray(embedding, dtype=np.float32).reshape(-1)
        if query.shape[0] != self.dim:
            raise ValueError(f"embedding has {query.shape[0]} dimensions but the index has {self.dim} "
                             f"({self.source}); embed with the same backbone (DINOv2 ViT-S/14 CLS "
                             "for the released indexes)")
        norm = float(np.linalg.norm(query))
        if norm == 0.0 or not np.isfinite(norm):
            raise ValueError("embedding is all zeros or not finite")
        similarity = self.embeddings @ (query / norm)
        k = max(0, min(int(k), len(self)))
        order = np.argsort(-similarity, kind="stable")[:k]
        return [(int(i), float(similarity[i]), str(self.paths[i])) for i in order]
