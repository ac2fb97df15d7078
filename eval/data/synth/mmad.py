"""An MMAD-format question file over the synthetic benchmark (``anomalyclaw synth --mmad``).

The file is what MMAD's own ``mmad.json`` is (see :mod:`anomalyclaw.eval.data.mmad`), over the
benchmark's test items, so that ``--task mcqa`` runs here with the offline backend and in tests:

* every query appears under MMAD's layout, ``<domain folder>/<category>/image/<good|kind>/<id>.png``
  (a hard link to the benchmark's file, a copy where links are not possible), so that MMAD's
  scoring conventions hold unchanged: the dataset is the first path component and a normal
  image's path contains ``good``; its mask is linked the same way under ``mask/``;
* ``random_templates``: the item's own references in a seeded order; ``similar_templates``: the
  domain's reference pool, most similar to the query first (coarse layout and colour); a
  bi-temporal item's only template is its "before" image;
* the questions: "is there a defect?" (yes/no) on every image; on anomalous ones "where?"
  among the four quadrants (the one holding most of the mask) and "which kind?" among the
  domain's seeded defect kinds; on the coin tray, "how many coins?" on every image (Object
  Structure, one of the two types MMAD scores as Object Analysis). Options are shuffled per
  question (seeded).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from anomalyclaw.imaging import load_image, load_mask
from anomalyclaw.items import Item
from anomalyclaw.paths import write_atomic
from anomalyclaw.tools.item_context import thumbnail_descriptor

from ..manifests import load_manifest
from .base import REFERENCE_POOL_SIZE
from .table import DOMAINS

#: Where each quadrant lies, as the options name it.
QUADRANTS = ("Top left.", "Top right.", "Bottom left.", "Bottom right.")
#: The coin tray's coins: 12 in a normal tray; one less or one more with a missing or extra coin.
COIN_COUNT = 12
COIN_OPTIONS = (10, 11, 12, 13)
MMAD_FILE = "mmad.json"


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(src, dst)


def kind_text(anomaly_type: str) -> str:
    """"missing_part" -> "Missing part."."""
    return anomaly_type.replace("_", " ").capitalize() + "."


def mask_quadrant(mask: np.ndarray) -> str:
    """The quadrant option that holds most of the mask's pixels."""
    h, w = mask.shape
    counts = [mask[:h // 2, :w // 2].sum(), mask[:h // 2, w // 2:].sum(),
              mask[h // 2:, :w // 2].sum(), mask[h // 2:, w // 2:].sum()]
    return QUADRANTS[int(np.argmax(counts))]


def coin_count(anomaly_type: str | None) -> int:
    return COIN_COUNT + {"missing_part": -1, "extra_part": 1}.get(anomaly_type or "", 0)


def _question(rng: np.random.Generator, text: str, options: list[str], answer: str, qtype: str) -> dict:
    order = rng.permutation(len(options))
    letters = "ABCDE"
    shown = {letters[k]: options[i] for k, i in enumerate(order)}
    correct = next(letter for letter, t in shown.items() if t == answer)
    return {"Question": text, "Options": shown, "Answer": correct, "type": qtype, "annotation": True}


def _similar(query: np.ndarray, pool: list[tuple[str, np.ndarray]]) -> list[str]:
    q = thumbnail_descriptor(query)
    sims = [float(thumbnail_descriptor(img) @ q) for _, img in pool]
    return [pool[i][0] for i in np.argsort(sims, kind="stable")[::-1]]


def write_mmad_questions(manifest: str | os.PathLike, *, seed: int = 0, split: str = "test") -> Path:
    """Write ``mmad.json`` beside the synthetic benchmark's ``manifest.json`` (and the linked
    image layout it names); returns its path."""
    manifest = Path(manifest)
    root = manifest.parent.resolve()
    items = load_manifest(manifest, split=split)
    pools: dict[str, list[tuple[str, np.ndarray]]] = {}
    entries: dict[str, dict] = {}
    for item in items:
        entries.update(_entry(item, root, seed, pools))
    return write_atomic(root / MMAD_FILE, json.dumps(entries, indent=1))


def _entry(item: Item, root: Path, seed: int, pools: dict[str, list[tuple[str, np.ndarray]]]) -> dict[str, dict]:
    dom = DOMAINS[item.domain_code]
    dataset = item.query_path.parent.parent.name  # the domain folder, e.g. S2_coin_count
    index = int(item.item_id.rsplit("_", 1)[1])
    rng = np.random.default_rng([seed, int(dom.code[1:]), index, 12])
    state = "good" if item.label == 0 else item.anomaly_type
    base = root / dataset / dom.category
    key = f"{dataset}/{dom.category}/image/{state}/{item.item_id}.png"
    _link(item.query_path, root / key)
    mask_rel = ""
    if item.mask_path is not None and item.label == 1:
        mask_rel = f"mask/{state}/{item.item_id}_mask.png"
        _link(item.mask_path, base / mask_rel)
    refs = [Path(p).resolve().relative_to(root).as_posix() for p in item.ref_paths]
    if dom.bi_temporal:
        random_templates = similar = refs
    else:
        random_templates = [refs[i] for i in rng.permutation(len(refs))]
        if dataset not in pools:
            folder = root / dataset / "references"
            pools[dataset] = [(f"{dataset}/references/{dom.code}_ref_{i:02d}.png",
                               load_image(folder / f"{dom.code}_ref_{i:02d}.png", max_side=256))
                              for i in range(REFERENCE_POOL_SIZE)]
        similar = _similar(load_image(item.query_path, max_side=256), pools[dataset])
    conversation = [_question(rng, "Is there any defect or anomaly in the query image?", ["Yes.", "No."],
                              "Yes." if item.label == 1 else "No.", "Anomaly Detection")]
    if item.label == 1:
        conversation.append(_question(rng, "There is an anomaly in the query image. Where is it?", list(QUADRANTS),
                                      mask_quadrant(load_mask(item.mask_path)), "Defect Localization"))
        kinds = [kind_text(t) for t in dom.anomaly_types]
        conversation.append(_question(rng, "There is an anomaly in the query image. What kind of anomaly is it?",
                                      kinds, kind_text(item.anomaly_type), "Defect Classification"))
    if dom.code == "S2":
        conversation.append(_question(rng, "How many coins are in the tray?", [f"{n}." for n in COIN_OPTIONS],
                                      f"{coin_count(item.anomaly_type)}.", "Object Structure"))
    return {key: {"image_path": f"image/{state}/{item.item_id}.png", "conversation": conversation,
                  "mask_path": mask_rel, "random_templates": random_templates, "similar_templates": similar}}
