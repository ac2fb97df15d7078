"""Turn an MVTec-style data folder (the layout anomalib users have on disk) into a manifest.

Expected layout, one folder per category::

    ROOT/<category>/train/good/*.png              normal images: the reference pool
    ROOT/<category>/test/good/*.png               normal test images       (label 0)
    ROOT/<category>/test/<defect>/*.png           anomalous test images    (label 1)
    ROOT/<category>/ground_truth/<defect>/<stem>_mask.png   optional pixel masks (or <stem>.png)

ROOT may also be a single category folder. Image files are ``.png .jpg .jpeg .bmp .tif .tiff``
in any letter case. Choices made here, so that no folder surprises anyone:

* Every test item of a category gets the same ``n_refs`` references, drawn from train/good
  with ``seed``: the k-shot protocol of few-shot anomaly detection, and each category's
  reference features are computed once.
* A category with fewer than ``n_refs`` normal training images uses all of them (warning).
* Files that are not images (``notes.txt``, ``Thumbs.db``) are skipped with a warning naming
  them; hidden files (``.DS_Store``) are skipped silently.
* Item ids are ``<category>_<defect>_<stem>``, readable, where that names one file of the whole
  import; the files whose readable ids would clash (category ``a_b`` + defect ``c`` beside ``a``
  + ``b_c``; ``001.png`` beside ``001.jpg``; ``y.PNG`` beside ``y.Png``) get
  ``<category>/<defect>/<file name>`` instead, their path under ROOT: no readable id holds a
  ``/``, and no two files share a path, so ids are unique by construction.
"""
from __future__ import annotations

import logging
import os
import zlib
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from anomalyclaw.domains import TRAITS, DomainCard
from anomalyclaw.errors import AnomalyClawError
from anomalyclaw.eval.data.manifests import data_root_from_env, write_manifest
from anomalyclaw.items import Item

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
#: The MVTec-AD texture categories: homogeneous surfaces with no fixed layout.
TEXTURE_CATEGORIES = frozenset({"carpet", "grid", "leather", "tile", "wood"})
NORMAL_FOLDER = "good"


class FolderLayoutError(AnomalyClawError):
    """A data folder does not have the MVTec layout; the message names the path and the fix."""


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _images_in(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, sorted by name; anything else is skipped."""
    images = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir():
            log.warning("skipping folder %s: images are expected directly in %s", path, folder)
        elif _is_image(path):
            images.append(path)
        else:
            log.warning("skipping %s: not an image file (expected one of %s)", path,
                        " ".join(sorted(IMAGE_EXTENSIONS)))
    return images


def _is_category(folder: Path) -> bool:
    return (folder / "train").is_dir() or (folder / "test").is_dir()


def _find_categories(root: Path, wanted: Sequence[str] | None) -> list[Path]:
    if _is_category(root):
        found = [root]  # the root is itself one category folder
    else:
        found = [p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".") and _is_category(p)]
    if not found:
        raise FolderLayoutError(
            f"{root}: no category folders found. Expected <root>/<category>/train/good and "
            f"<root>/<category>/test/<defect or good> (the MVTec-AD layout); point at the folder that "
            f"holds the category folders")
    if wanted is None:
        return found
    by_name = {p.name: p for p in found}
    missing = [name for name in wanted if name not in by_name]
    if missing:
        raise FolderLayoutError(f"{root}: no category folder named {', '.join(map(repr, missing))}; "
                                f"found: {', '.join(sorted(by_name))}")
    return [by_name[name] for name in dict.fromkeys(wanted)]


def _mask_for(ground_truth: Path, defect: str, image: Path) -> Path | None:
    """``ground_truth/<defect>/<stem>_mask.<ext>`` (MVTec) or ``<stem>.<ext>``, any image ext."""
    folder = ground_truth / defect
    if not folder.is_dir():
        return None
    for stem in (f"{image.stem}_mask", image.stem):
        for candidate in sorted(folder.glob(f"{stem}.*")):
            if _is_image(candidate) and candidate.stem == stem:
                return candidate
    return None


def default_traits(category: str) -> frozenset[str]:
    """``texture`` for the MVTec texture names, else ``object`` + ``aligned``."""
    return frozenset({"texture"}) if category.lower() in TEXTURE_CATEGORIES else frozenset({"object", "aligned"})


def category_card(category: str, traits: Iterable[str] | None = None) -> DomainCard:
    """A generic card for an MVTec-style category with ``traits`` (default
    :func:`default_traits`). A texture card (``texture`` among the traits) describes a surface
    and is never ``aligned`` unless asked for: a surface has no fixed layout. Pass traits, or
    edit ``domain_card`` in the written manifest, when a category differs (an object that
    rotates: ``rotating``; a part count that matters: ``counting``; a fabric: ``texture``)."""
    chosen = default_traits(category) if traits is None else frozenset(traits)
    bad = sorted(chosen - set(TRAITS))
    if bad:
        raise FolderLayoutError(f"unknown trait(s) {', '.join(bad)} for category '{category}'; known: "
                                f"{', '.join(sorted(TRAITS))}")
    name = category.replace("_", " ")
    if "texture" in chosen:
        return DomainCard(category, name, "RGB", f"a defect-free {name} surface like the references",
                          "scratches, cuts, holes, stains, contamination, colour or texture deviations",
                          traits=chosen)
    return DomainCard(category, name, "RGB",
                      f"a defect-free {name} like the references, with the same shape, colour and markings",
                      "scratches, dents, cracks, holes, contamination, missing or misplaced parts, "
                      "colour deviations", traits=chosen)


def _category_items(folder: Path, n_refs: int, seed: int, source: str,
                    traits: Iterable[str] | None = None) -> list[tuple[Item, str]]:
    """The category's test items, each with its path id ``<category>/<defect>/<file name>``."""
    category = folder.name
    train_good, test = folder / "train" / NORMAL_FOLDER, folder / "test"
    if not train_good.is_dir():
        raise FolderLayoutError(f"category '{category}': no normal training folder {train_good}; every category "
                                f"needs train/{NORMAL_FOLDER}/ with defect-free images to use as references")
    if not test.is_dir():
        raise FolderLayoutError(f"category '{category}': no test folder {test}; put the images to judge in "
                                f"test/{NORMAL_FOLDER}/ and test/<defect name>/")
    pool = _images_in(train_good)
    if not pool:
        raise FolderLayoutError(f"category '{category}': {train_good} holds no images "
                                f"({', '.join(sorted(IMAGE_EXTENSIONS))}); add defect-free reference images")
    if len(pool) < n_refs:
        log.warning("category '%s': only %d normal training image(s) in %s, fewer than n_refs=%d; "
                    "using all of them", category, len(pool), train_good, n_refs)
    # The category name enters the seed so categories draw independently but reproducibly.
    rng = np.random.default_rng([seed, zlib.crc32(category.encode("utf-8"))])
    picks = sorted(rng.choice(len(pool), size=min(n_refs, len(pool)), replace=False))
    refs = tuple(pool[int(i)].resolve() for i in picks)
    card = category_card(category, traits)
    ground_truth = folder / "ground_truth"
    items: list[tuple[Item, str]] = []
    for path in sorted(test.iterdir()):
        if path.name.startswith("."):
            continue
        if not path.is_dir():
            log.warning("skipping %s: test images are expected in test/<defect or %s>/ folders", path, NORMAL_FOLDER)
            continue
        defect = path.name
        label = 0 if defect == NORMAL_FOLDER else 1
        for image in _images_in(path):
            item_id = f"{category}_{defect}_{image.stem}"  # made unique across the import later
            mask = _mask_for(ground_truth, defect, image) if label else None
            items.append((Item(item_id=item_id, query_path=image.resolve(), ref_paths=refs, domain=category,
                               domain_code=category, label=label, anomaly_type=None if label == 0 else defect,
                               source_dataset=source, category=category, split="test",
                               mask_path=mask.resolve() if mask else None, card=card),
                          f"{category}/{defect}/{image.name}"))
    if not items:
        raise FolderLayoutError(f"category '{category}': {test} holds no test images; expected "
                                f"test/{NORMAL_FOLDER}/*.png and test/<defect name>/*.png")
    return items


def _unique_ids(items: list[tuple[Item, str]]) -> list[Item]:
    """Readable ids where they are unique across the import, else the path ids (see the module
    docstring): no readable id holds a ``/``, so the two kinds never meet."""
    counts = Counter(it.item_id for it, _ in items)
    out = [replace(it, item_id=path_id) if counts[it.item_id] > 1 else it for it, path_id in items]
    clashes = [i for i, n in Counter(it.item_id for it in out).items() if n > 1]
    if clashes:  # two files with one path: only a case-blind view of one folder could do that
        raise FolderLayoutError(f"image files that differ only in letter case: {', '.join(clashes[:5])}; "
                                "rename one of each pair")
    return out


def _traits_by_category(traits: Mapping[str, Iterable[str]] | Iterable[str] | None,
                        found: Sequence[str]) -> dict[str, frozenset[str] | None]:
    """Each found category's traits: ``traits`` is one list for every category, or a mapping
    from category name (``"*"``: every other one) to a list."""
    if traits is None:
        return {c: None for c in found}
    if isinstance(traits, str):
        raise FolderLayoutError(f"traits must be a list of trait names or a mapping, got the string {traits!r}")
    if not isinstance(traits, Mapping):
        chosen = frozenset(traits)
        return {c: chosen for c in found}
    unknown = sorted(set(traits) - set(found) - {"*"})
    if unknown:
        raise FolderLayoutError(f"traits given for category {', '.join(map(repr, unknown))}, which is not imported; "
                                f"categories: {', '.join(found)}")
    default = traits.get("*")
    return {c: frozenset(traits[c]) if c in traits else (frozenset(default) if default is not None else None)
            for c in found}


def import_mvtec_folder(root: str | os.PathLike, out: str | os.PathLike, *, n_refs: int = 5, seed: int = 0,
                        categories: Iterable[str] | str | None = None,
                        traits: Mapping[str, Iterable[str]] | Iterable[str] | None = None) -> Path:
    """Write a manifest for an MVTec-style folder and return its path.

    ``out`` is the manifest file (``*.json``) or a folder to write ``manifest.json`` into. One
    item per test image, ``split`` "test", ``label`` 0 for test/good and 1 otherwise,
    ``anomaly_type`` the defect folder's name, ``mask_path`` when ground_truth has the mask, item
    ids ``<category>_<defect>_<stem>``, domain and domain code the category name, and a
    ``domain_card`` from :func:`category_card`. Each category's items share ``n_refs`` references
    drawn from train/good with ``seed``. ``categories`` (names, or one comma-separated string)
    restricts the import. ``traits`` sets the cards' traits: one list for every category, or a
    mapping ``{category: [traits]}`` (``"*"`` for the rest); default :func:`default_traits`. Paths under the manifest's folder are written relative to it, paths
    under ``ANOMALYCLAW_DATA`` as ``{DATA_ROOT}/...``, others absolute.
    Raises :class:`FolderLayoutError` naming the folder that does not fit the layout.
    """
    if isinstance(n_refs, bool) or not isinstance(n_refs, (int, np.integer)) or n_refs < 1:
        raise FolderLayoutError(f"n_refs must be a whole number of at least 1 (references per item), got {n_refs!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise FolderLayoutError(f"seed must be a non-negative integer, got {seed!r}")
    base = Path(root).expanduser()
    if not base.exists():
        raise FolderLayoutError(f"{base}: folder does not exist; pass the folder that holds the category folders")
    if not base.is_dir():
        raise FolderLayoutError(f"{base}: not a folder; pass the folder that holds the category folders")
    if isinstance(categories, str):
        categories = [c.strip() for c in categories.split(",") if c.strip()]
    wanted = None if categories is None else list(categories)
    if wanted is not None and not wanted:
        raise FolderLayoutError("categories is empty: pass None for every category or name at least one")
    base = base.resolve()
    source = base.name
    folders = _find_categories(base, wanted)
    chosen = _traits_by_category(traits, [f.name for f in folders])
    items = _unique_ids([item for folder in folders
                         for item in _category_items(folder, int(n_refs), int(seed), source, chosen[folder.name])])
    target = Path(out).expanduser()
    if target.suffix.lower() != ".json":
        target = target / "manifest.json"
    target = target.resolve()
    data_root = data_root_from_env()
    data_root = data_root.resolve() if data_root is not None else None
    return write_manifest(items, target, data_root=data_root)
