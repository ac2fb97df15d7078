"""The benchmark item: one query image, its normal references, its label and its domain card."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .domains import DomainCard, find_card
from .paths import portable_path


@dataclass(frozen=True)
class Item:
    """One anomaly-detection question.

    ``label`` is 1 for anomalous, 0 for normal, ``None`` when unknown (a deployment item).
    Paths are absolute once a manifest is loaded. ``mask_path`` is the pixel ground truth when
    the data set has one (anomalous items only).
    """

    item_id: str
    query_path: Path
    ref_paths: tuple[Path, ...]
    domain: str = "generic"
    domain_code: str = "generic"
    label: int | None = None
    anomaly_type: str | None = None
    source_dataset: str | None = None
    category: str | None = None
    split: str | None = None
    mask_path: Path | None = None
    card: DomainCard | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def domain_card(self) -> DomainCard:
        return self.card or find_card(self.domain_code, self.domain)

    @property
    def traits(self) -> frozenset[str]:
        return self.domain_card.traits_for(self.category)

    @property
    def reference_set_key(self) -> tuple[str, ...]:
        """Identifies the reference set, so that features computed on it are shared."""
        return tuple(str(p) for p in self.ref_paths)

    def to_json(self, data_root: Path | None = None) -> dict[str, Any]:
        """The manifest form of the item; paths under ``data_root`` become ``{DATA_ROOT}/...``."""

        def portable(p: Path | None) -> str | None:
            return None if p is None else portable_path(p, data_root=data_root)

        out: dict[str, Any] = {
            "item_id": self.item_id, "domain": self.domain, "domain_code": self.domain_code,
            "query_path": portable(self.query_path),
            "ref_paths": [portable(p) for p in self.ref_paths],
            "label": self.label, "anomaly_type": self.anomaly_type,
            "source_dataset": self.source_dataset, "category": self.category, "split": self.split,
        }
        if self.mask_path is not None:
            out["mask_path"] = portable(self.mask_path)
        if self.card is not None:
            out["domain_card"] = self.card.to_json()
        out.update(self.extra)
        return out


@dataclass(frozen=True)
class Question:
    """One multiple-choice question about an item's query image, as the model sees it.

    ``options`` are ``(letter, text)`` pairs in the order shown. The correct answer is not
    here on purpose: it stays with the data loader and the record, so nothing the graphs build
    can show it to a model.
    """

    question_id: str
    text: str
    options: tuple[tuple[str, str], ...]

    @property
    def letters(self) -> tuple[str, ...]:
        return tuple(letter for letter, _ in self.options)

    @property
    def option_map(self) -> Mapping[str, str]:
        return dict(self.options)

    def render_options(self) -> str:
        """One ``"A. text"`` line per option."""
        return "\n".join(f"{letter}. {text}" for letter, text in self.options)
