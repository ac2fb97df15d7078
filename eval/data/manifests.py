"""Manifests: JSON lists of items, validated at the boundary, ``{DATA_ROOT}`` resolved.

A manifest is a JSON array of item objects (the CrossDomainVAD-12 schema), or an object with an
``items`` array. Paths are ``{DATA_ROOT}/...`` (resolved from ``ANOMALYCLAW_DATA``), absolute, or
relative to the manifest's own folder (as the synthetic benchmark writes them).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from anomalyclaw.domains import DomainCard
from anomalyclaw.errors import ManifestError, SelectionError
from anomalyclaw.items import Item
from anomalyclaw.paths import DATA_ROOT_PLACEHOLDER, portable_path, write_atomic

PLACEHOLDER = DATA_ROOT_PLACEHOLDER
REQUIRED = ("item_id", "query_path", "ref_paths", "label")
KNOWN = set(REQUIRED) | {"domain", "domain_code", "anomaly_type", "source_dataset", "category",
                         "split", "mask_path", "domain_card"}
SPLITS = ("calibration", "dev", "test")


@dataclass
class ManifestContents:
    """What a manifest holds: the valid items and, for the rest, every problem found.

    ``rejected`` maps the id of each invalid item to its problems (items without a usable id
    are only in ``problems``). A runner judges ``items`` and writes an error record per
    ``rejected`` id; :func:`load_manifest` raises instead.
    """

    source: str
    items: list[Item] = field(default_factory=list)
    problems: list[tuple[str, str, str]] = field(default_factory=list)
    rejected: dict[str, list[str]] = field(default_factory=dict)
    raw_rejected: dict[str, dict[str, Any]] = field(default_factory=dict)
    n_duplicates: int = 0
    """Entries skipped because an earlier entry has the same id (each is also in ``problems``)."""


def data_root_from_env() -> Path | None:
    raw = os.environ.get("ANOMALYCLAW_DATA")
    return Path(raw).expanduser() if raw else None


def resolve_manifest_path(path: str | os.PathLike) -> Path:
    """A manifest file, or a folder holding ``manifest.json`` or ``full_manifest.json``."""
    p = Path(path).expanduser()
    if p.is_dir():
        for name in ("manifest.json", "full_manifest.json"):
            if (p / name).is_file():
                return p / name
        raise ManifestError(str(p), [(str(p), "path", "folder holds no manifest.json or full_manifest.json")])
    if not p.is_file():
        raise ManifestError(str(p), [(str(p), "path", "manifest file does not exist")])
    return p


def _resolve_path(value: Any, base: Path, data_root: Path | None) -> tuple[Path | None, str | None]:
    """(resolved path, problem) for one path field."""
    if not isinstance(value, str) or not value.strip():
        return None, f"expected a non-empty path string, got {value!r}"
    if PLACEHOLDER in value:
        if not value.startswith(PLACEHOLDER):
            return None, f"{PLACEHOLDER} may only start a path: {value!r}"
        if data_root is None:
            return None, (f"{value!r} uses {PLACEHOLDER} but ANOMALYCLAW_DATA is not set; set it "
                          "to the folder that holds the data sets")
        root = data_root.resolve()
        resolved = (root / value[len(PLACEHOLDER):].lstrip("/\\")).resolve()
        if resolved != root and root not in resolved.parents:
            return None, f"{value!r} escapes ANOMALYCLAW_DATA ({root}) via '..' or a symbolic link (to {resolved})"
        return resolved, None
    p = Path(value).expanduser()
    return (p if p.is_absolute() else (base / p)).resolve(), None


def _parse_item(raw: Any, where: str, base: Path, data_root: Path | None
                ) -> tuple[Item | None, list[tuple[str, str]]]:
    """Validate one raw item; returns the item or the list of (field, problem)."""
    if not isinstance(raw, dict):
        return None, [("(item)", f"expected an object, got {type(raw).__name__}")]
    problems: list[tuple[str, str]] = []
    for name in REQUIRED:
        if name not in raw:
            problems.append((name, "missing"))
    item_id = raw.get("item_id")
    if "item_id" in raw and (not isinstance(item_id, str) or not item_id.strip()):
        problems.append(("item_id", f"expected a non-empty string, got {item_id!r}"))
    label = raw.get("label")
    if "label" in raw and not (label is None or (isinstance(label, (int, bool)) and int(label) in (0, 1))):
        problems.append(("label", f"must be 0 (normal), 1 (anomalous) or null, got {label!r}"))
    split = raw.get("split")
    if split is not None and not isinstance(split, str):
        problems.append(("split", f"expected a string, got {split!r}"))
    for name in ("domain", "domain_code", "category", "anomaly_type", "source_dataset"):
        value = raw.get(name)
        if value is not None and not isinstance(value, (str, int, float)) or isinstance(value, bool):
            problems.append((name, f"expected a string or null, got {type(value).__name__} {str(value)[:60]!r}"))
    query = refs = mask = None
    if "query_path" in raw:
        query, why = _resolve_path(raw["query_path"], base, data_root)
        if why:
            problems.append(("query_path", why))
    if "ref_paths" in raw:
        raw_refs = raw["ref_paths"]
        if not isinstance(raw_refs, list):
            problems.append(("ref_paths", f"expected a list of paths, got {type(raw_refs).__name__}"))
        elif not raw_refs:
            problems.append(("ref_paths", "is empty: at least one normal reference image is needed"))
        else:
            refs = []
            for i, value in enumerate(raw_refs):
                p, why = _resolve_path(value, base, data_root)
                if why:
                    problems.append((f"ref_paths[{i}]", why))
                refs.append(p)
    if raw.get("mask_path") is not None:
        mask, why = _resolve_path(raw["mask_path"], base, data_root)
        if why:
            problems.append(("mask_path", why))
    card = None
    if raw.get("domain_card") is not None:
        try:
            card = DomainCard.from_json(raw["domain_card"])
        except (ValueError, TypeError) as exc:
            problems.append(("domain_card", str(exc)))
    if problems:
        return None, problems
    text = {name: None if raw.get(name) is None else str(raw[name])  # a number as a name: its digits
            for name in ("domain", "domain_code", "category", "anomaly_type", "source_dataset")}
    domain_code = text["domain_code"] or text["domain"] or "generic"
    extra = {k: v for k, v in raw.items() if k not in KNOWN}
    return Item(
        item_id=item_id, query_path=query, ref_paths=tuple(refs), domain=text["domain"] or domain_code,
        domain_code=domain_code, label=None if label is None else int(label),
        anomaly_type=text["anomaly_type"], source_dataset=text["source_dataset"],
        category=text["category"], split=split, mask_path=mask, card=card, extra=extra,
    ), []


def _require_data_root(source: str, data: list[Any], root: Path | None, *, from_env: bool) -> None:
    """One clear error, instead of one per path, when {DATA_ROOT} cannot be resolved at all:
    the data root is not set, or is not a folder."""
    if root is not None and root.is_dir():
        return
    users = [(i, raw.get("item_id"), key) for i, raw in enumerate(data) if isinstance(raw, dict)
             for key in ("query_path", "ref_paths", "mask_path")
             if PLACEHOLDER in json.dumps(raw.get(key))]
    if users:
        index, rid, key = users[0]
        n_items = len({u[0] for u in users})
        if root is None:
            why = "ANOMALYCLAW_DATA is not set"
        else:
            name = f"ANOMALYCLAW_DATA={root}" if from_env else f"the data root {root}"
            why = f"{name} is {'not a folder' if root.exists() else 'a folder that does not exist'}"
        raise ManifestError(source, [(f"item {rid!r} (#{index})", key,
                                      f"uses {PLACEHOLDER} but {why} ({n_items} items need it): set it to the "
                                      "folder that holds the data sets")])


def _domain_summary(counts: Counter) -> str:
    """``D1 (industrial, 120 items), D7 (...)`` for (code, name) counts."""
    parts = []
    for (code, name), n in sorted(counts.items(), key=lambda kv: (len(kv[0][0]), kv[0][0])):
        label = f"{code} ({name}, {n} items)" if name and name != code else f"{code} ({n} items)"
        parts.append(label)
    return ", ".join(parts) or "none"


def check_files(items: Sequence[Item], n: int = 5) -> list[tuple[Item, str, Path]]:
    """(item, field, path) for each image file that does not exist among the first ``n`` items
    (query and references): what a run checks before its first request, so that a wrong data
    root is one clear error and not one error record per item."""
    missing = []
    for item in items[:n]:
        for name, path in [("query_path", item.query_path),
                           *((f"ref_paths[{k}]", p) for k, p in enumerate(item.ref_paths))]:
            if not Path(path).is_file():
                missing.append((item, name, Path(path)))
    return missing


def read_manifest(path: str | os.PathLike, *, split: str | Sequence[str] | None = None,
                  domains: Iterable[str] | None = None, data_root: str | os.PathLike | None = None
                  ) -> ManifestContents:
    """Parse and validate a manifest, keeping valid items and recording every problem.

    ``split`` and ``domains`` (codes such as ``D1`` or names such as ``industrial``, in any
    letter case) filter the items; a split or domain that matches no item raises
    :class:`SelectionError` listing the manifest's splits or domains. ``data_root`` overrides
    ``ANOMALYCLAW_DATA``.
    """
    src = resolve_manifest_path(path)
    try:
        data = json.loads(src.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ManifestError(str(src), [(str(src), "(file)", f"not UTF-8 text: {exc}")]) from None
    except json.JSONDecodeError as exc:
        raise ManifestError(str(src), [(str(src), "(file)", f"not valid JSON: {exc}")]) from None
    if isinstance(data, dict) and isinstance(data.get("items"), list):
        data = data["items"]
    if not isinstance(data, list):
        raise ManifestError(str(src), [(str(src), "(file)", "expected a JSON array of items or {\"items\": [...]}")])
    root = Path(data_root).expanduser() if data_root is not None else data_root_from_env()
    _require_data_root(str(src), data, root, from_env=data_root is None)
    splits = None if split is None else ({split} if isinstance(split, str) else set(split))
    splits = {s.strip().lower() for s in splits} if splits else None
    if splits and not splits <= set(SPLITS):
        # A mistake in what was asked (--split), not in the manifest.
        unknown = ", ".join(repr(s) for s in sorted(splits - set(SPLITS)))
        raise SelectionError(f"no split named {unknown}: a split is one of {', '.join(SPLITS)}")
    wanted = None if domains is None else [d.strip() for d in domains if d.strip()]
    wanted_keys = {w.lower() for w in wanted} if wanted else set()
    matched: set[str] = set()
    split_counts: Counter = Counter()
    domain_counts: Counter = Counter()
    out = ManifestContents(source=str(src))
    seen: dict[str, int] = {}
    base = src.parent
    for index, raw in enumerate(data):
        if isinstance(raw, dict):
            raw_split = raw.get("split")
            split_counts[str(raw_split).lower() if raw_split is not None else None] += 1
            if splits and (not isinstance(raw_split, str) or raw_split.lower() not in splits):
                continue
            code, name = raw.get("domain_code"), raw.get("domain")
            domain_counts[(str(code or name or "generic"), str(name or ""))] += 1
            keys = {str(k).lower() for k in (code, name) if k is not None}
            if wanted_keys and not (keys & wanted_keys):
                continue
            matched |= keys & wanted_keys
        rid = raw.get("item_id") if isinstance(raw, dict) else None
        where = f"item {rid!r} (#{index})" if isinstance(rid, str) else f"item #{index}"
        if isinstance(rid, str) and rid in seen:
            out.problems.append((where, "item_id", f"duplicate: the same id is item #{seen[rid]}; "
                                 "this later item is skipped"))
            out.n_duplicates += 1
            continue
        item, problems = _parse_item(raw, where, base, root)
        if isinstance(rid, str) and rid.strip():
            seen[rid] = index
        if item is not None:
            out.items.append(item)
            continue
        out.problems.extend((where, f, m) for f, m in problems)
        if isinstance(rid, str) and rid.strip():
            out.rejected[rid] = [f"{f}: {m}" for f, m in problems]
            out.raw_rejected[rid] = raw
    if splits and not any(k in splits for k in split_counts):
        have = ", ".join(f"{k} ({n} items)" for k, n in split_counts.most_common() if k is not None)
        unsplit = split_counts.get(None, 0)
        raise SelectionError(f"no item of {src} has split {', '.join(sorted(splits))}; "
                             + (f"its splits: {have}" if have else "its items have no 'split' field")
                             + (f" ({unsplit} items without one)" if have and unsplit else ""))
    unmatched = [w for w in (wanted or []) if w.lower() not in matched]
    if unmatched:
        where = f" with split {', '.join(sorted(splits))}" if splits else ""
        raise SelectionError(f"no items in domain(s) {', '.join(unmatched)} in {src}{where} (codes or names, any "
                             f"letter case); its domains: {_domain_summary(domain_counts)}")
    return out


def load_manifest(path: str | os.PathLike, *, split: str | Sequence[str] | None = None,
                  domains: Iterable[str] | None = None,
                  data_root: str | os.PathLike | None = None) -> list[Item]:
    """Load a manifest's items, raising :class:`ManifestError` listing every problem found."""
    contents = read_manifest(path, split=split, domains=domains, data_root=data_root)
    if contents.problems:
        raise ManifestError(contents.source, contents.problems)
    return contents.items


def write_manifest(items: Iterable[Item | dict[str, Any]], path: str | os.PathLike,
                   *, relative_to: str | os.PathLike | None = None,
                   data_root: str | os.PathLike | None = None) -> Path:
    """Write items as a manifest (:func:`~anomalyclaw.paths.portable_path`): paths under
    ``relative_to`` (default: the manifest's folder) are written relative to it so the folder
    can be moved as a whole, paths under ``data_root`` as ``{DATA_ROOT}/...``."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    base = Path(relative_to or out.parent).resolve()
    rows = []
    for it in items:
        row = it.to_json() if isinstance(it, Item) else dict(it)
        for key in ("query_path", "mask_path"):
            if row.get(key):
                row[key] = portable_path(row[key], base=base, data_root=data_root)
        row["ref_paths"] = [portable_path(p, base=base, data_root=data_root) for p in row.get("ref_paths", [])]
        rows.append(row)
    return write_atomic(out, json.dumps(rows, indent=1))
