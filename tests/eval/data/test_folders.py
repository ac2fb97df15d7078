"""The MVTec-style folder importer: layout, labels, masks, references, paths, errors."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from anomalyclaw.domains import DomainCard
from anomalyclaw.errors import AnomalyClawError
from anomalyclaw.cli import main
from anomalyclaw.eval.data.folders import FolderLayoutError, import_mvtec_folder
from anomalyclaw.eval.data.manifests import load_manifest
from anomalyclaw.imaging import save_image


def _png(path: Path, value: int = 128) -> Path:
    save_image(np.full((16, 16, 3), value, np.uint8), path)
    return path


def _category(root: Path, name: str, *, n_train: int = 8, defects: dict[str, int] | None = None,
              n_good: int = 2, masks: bool = True) -> Path:
    """A tiny MVTec-style category: train/good, test/good, test/<defect>, ground_truth/<defect>."""
    folder = root / name
    for i in range(n_train):
        _png(folder / "train" / "good" / f"{i:03d}.png")
    for i in range(n_good):
        _png(folder / "test" / "good" / f"{i:03d}.png")
    for defect, n in (defects if defects is not None else {"crack": 2}).items():
        for i in range(n):
            _png(folder / "test" / defect / f"{i:03d}.png", 40)
            if masks:
                _png(folder / "ground_truth" / defect / f"{i:03d}_mask.png", 255)
    return folder


@pytest.fixture()
def mvtec(tmp_path) -> Path:
    root = tmp_path / "mvtec"
    _category(root, "bottle", defects={"broken_large": 2, "contamination": 1})
    _category(root, "carpet", defects={"hole": 2})
    return root


def test_one_item_per_test_image_with_labels_types_and_ids(mvtec, tmp_path):
    manifest = import_mvtec_folder(mvtec, tmp_path / "out")
    assert manifest == (tmp_path / "out" / "manifest.json").resolve()
    items = {i.item_id: i for i in load_manifest(manifest)}
    assert set(items) == {
        "bottle_good_000", "bottle_good_001", "bottle_broken_large_000", "bottle_broken_large_001",
        "bottle_contamination_000", "carpet_good_000", "carpet_good_001", "carpet_hole_000", "carpet_hole_001"}
    good, broken = items["bottle_good_000"], items["bottle_broken_large_001"]
    assert (good.label, good.anomaly_type, good.mask_path) == (0, None, None)
    assert (broken.label, broken.anomaly_type) == (1, "broken_large")
    assert broken.mask_path == (mvtec / "bottle" / "ground_truth" / "broken_large" / "001_mask.png").resolve()
    assert broken.query_path == (mvtec / "bottle" / "test" / "broken_large" / "001.png").resolve()
    for item in items.values():
        assert item.split == "test" and item.domain == item.domain_code == item.category
        assert item.source_dataset == "mvtec"


def test_references_are_a_seeded_k_shot_draw_from_train_good(mvtec, tmp_path):
    items = load_manifest(import_mvtec_folder(mvtec, tmp_path / "a.json", n_refs=3, seed=7))
    for category in ("bottle", "carpet"):
        ref_sets = {i.ref_paths for i in items if i.category == category}
        assert len(ref_sets) == 1  # one k-shot set per category
        refs = ref_sets.pop()
        assert len(set(refs)) == 3
        assert all(p.parent == (mvtec / category / "train" / "good").resolve() for p in refs)
    again = load_manifest(import_mvtec_folder(mvtec, tmp_path / "b.json", n_refs=3, seed=7))
    assert [i.ref_paths for i in again] == [i.ref_paths for i in items]
    draws = {load_manifest(import_mvtec_folder(mvtec, tmp_path / f"s{seed}.json", n_refs=3, seed=seed))[0].ref_paths
             for seed in range(6)}
    assert len(draws) > 1  # the seed matters


def test_cards_mark_textures_and_objects(mvtec, tmp_path):
    manifest = import_mvtec_folder(mvtec, tmp_path / "m.json")
    rows = {row["category"]: row for row in json.loads(manifest.read_text())}
    carpet = DomainCard.from_json(rows["carpet"]["domain_card"])
    bottle = DomainCard.from_json(rows["bottle"]["domain_card"])
    assert carpet.traits == frozenset({"texture"}) and carpet.code == "carpet"
    assert bottle.traits == frozenset({"object", "aligned"})
    assert {i.category: i.traits for i in load_manifest(manifest)} == {
        "carpet": frozenset({"texture"}), "bottle": frozenset({"object", "aligned"})}


def test_masks_named_like_the_image_and_missing_masks(tmp_path):
    root = tmp_path / "data"
    _category(root, "screw", defects={"scratch_head": 2}, masks=False)
    _png(root / "screw" / "ground_truth" / "scratch_head" / "000.png", 255)  # <stem>.png also counts
    items = {i.item_id: i for i in load_manifest(import_mvtec_folder(root, tmp_path / "m.json"))}
    assert items["screw_scratch_head_000"].mask_path.name == "000.png"
    assert items["screw_scratch_head_001"].mask_path is None


def test_extensions_are_case_insensitive_and_other_files_are_skipped_with_a_warning(tmp_path, caplog):
    root = tmp_path / "data"
    _category(root, "tile", n_train=0, defects={"crack": 0}, n_good=0)
    for name in ("a.PNG", "b.JpG", "c.jpeg", "d.BMP", "e.tif", "f.TIFF"):
        (root / "tile" / "train" / "good").mkdir(parents=True, exist_ok=True)
        _png(root / "tile" / "train" / "good" / "x.png").rename(root / "tile" / "train" / "good" / name)
    _png(root / "tile" / "test" / "crack" / "001.PNG")
    (root / "tile" / "train" / "good" / "notes.txt").write_text("shot on Tuesday")
    (root / "tile" / "train" / "good" / ".DS_Store").write_bytes(b"\0")
    with caplog.at_level(logging.WARNING):
        items = load_manifest(import_mvtec_folder(root, tmp_path / "m.json", n_refs=6))
    assert len(items) == 1 and items[0].item_id == "tile_crack_001"
    assert sorted(p.name for p in items[0].ref_paths) == ["a.PNG", "b.JpG", "c.jpeg", "d.BMP", "e.tif", "f.TIFF"]
    assert "notes.txt" in caplog.text and ".DS_Store" not in caplog.text


def test_fewer_training_images_than_n_refs_warns_and_uses_all(tmp_path, caplog):
    root = tmp_path / "data"
    _category(root, "pill", n_train=3)
    with caplog.at_level(logging.WARNING):
        items = load_manifest(import_mvtec_folder(root, tmp_path / "m.json", n_refs=5))
    assert all(len(i.ref_paths) == 3 for i in items)
    assert "pill" in caplog.text and "n_refs=5" in caplog.text


def test_a_single_category_folder_and_a_category_filter(mvtec, tmp_path):
    single = load_manifest(import_mvtec_folder(mvtec / "carpet", tmp_path / "one.json"))
    assert {i.category for i in single} == {"carpet"}
    chosen = load_manifest(import_mvtec_folder(mvtec, tmp_path / "f.json", categories="bottle"))
    assert {i.category for i in chosen} == {"bottle"}
    with pytest.raises(FolderLayoutError, match="'cable'.*found: bottle, carpet"):
        import_mvtec_folder(mvtec, tmp_path / "g.json", categories=["cable"])


def test_paths_relative_inside_the_manifest_folder_absolute_outside(mvtec, tmp_path):
    inside = import_mvtec_folder(mvtec, mvtec / "manifest.json")
    row = json.loads(inside.read_text())[0]
    assert row["query_path"].startswith(("bottle/", "carpet/"))
    outside = import_mvtec_folder(mvtec, tmp_path / "elsewhere" / "m.json")
    row = json.loads(outside.read_text())[0]
    assert Path(row["query_path"]).is_absolute()
    assert all(Path(p).is_absolute() for p in row["ref_paths"])
    for manifest in (inside, outside):
        assert all(i.query_path.is_file() for i in load_manifest(manifest))


def test_paths_under_anomalyclaw_data_use_the_placeholder(mvtec, tmp_path, monkeypatch):
    monkeypatch.setenv("ANOMALYCLAW_DATA", str(tmp_path))
    manifest = import_mvtec_folder(mvtec, tmp_path / "manifests" / "mvtec.json")
    row = json.loads(manifest.read_text())[0]
    assert row["query_path"].startswith("{DATA_ROOT}/mvtec/")
    assert all(p.startswith("{DATA_ROOT}/mvtec/") for p in row["ref_paths"])
    assert all(i.query_path.is_file() for i in load_manifest(manifest))


@pytest.mark.parametrize("layout, message", [
    ("missing", "does not exist"),
    ("file", "not a folder"),
    ("no_categories", "no category folders"),
    ("no_train_good", "train/good"),
    ("no_test", "no test folder"),
    ("empty_train_good", "holds no images"),
    ("empty_test", "holds no test images"),
])
def test_layout_errors_name_the_path(tmp_path, layout, message):
    root = tmp_path / "data"
    if layout == "file":
        root.write_text("not a folder")
    elif layout == "no_categories":
        (root / "bottle" / "images").mkdir(parents=True)
    elif layout == "no_train_good":
        _category(root, "bottle")
        for p in (root / "bottle" / "train" / "good").iterdir():
            p.unlink()
        (root / "bottle" / "train" / "good").rmdir()
    elif layout == "no_test":
        _png(root / "bottle" / "train" / "good" / "000.png")
    elif layout == "empty_train_good":
        _category(root, "bottle", n_train=0)
        (root / "bottle" / "train" / "good").mkdir(parents=True, exist_ok=True)
        (root / "bottle" / "train" / "good" / "readme.txt").write_text("nothing here")
    elif layout == "empty_test":
        _category(root, "bottle", n_good=0, defects={})
        (root / "bottle" / "test" / "good").mkdir(parents=True)
    with pytest.raises(FolderLayoutError, match=message) as info:
        import_mvtec_folder(root, tmp_path / "m.json")
    assert isinstance(info.value, AnomalyClawError)
    assert str(root) in str(info.value) or "bottle" in str(info.value)
    assert not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("n_refs", [0, -3, 2.5, True])
def test_n_refs_must_be_a_positive_integer(mvtec, tmp_path, n_refs):
    with pytest.raises(FolderLayoutError, match="n_refs"):
        import_mvtec_folder(mvtec, tmp_path / "m.json", n_refs=n_refs)


def test_command_line(mvtec, tmp_path, capsys):
    assert main(["import-folder", str(mvtec), "--out", str(tmp_path / "cli"), "--n-refs", "2",
                 "--categories", "carpet"]) == 0
    assert "manifest.json" in capsys.readouterr().out
    items = load_manifest(tmp_path / "cli")
    assert {i.category for i in items} == {"carpet"} and all(len(i.ref_paths) == 2 for i in items)
    assert main(["import-folder", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_import_ids_are_unique_by_construction(tmp_path):
    """Issue 17 item 6: ``a_b`` + ``c`` and ``a`` + ``b_c`` (or ``y.PNG`` beside ``y.Png``) both
    became one id, and the run then skipped one image while reporting 0 duplicate ids."""
    root = tmp_path / "data"
    _category(root, "a_b", defects={"c": 1}, masks=False)
    _category(root, "a", defects={"b_c": 1}, masks=False)
    _png(root / "a" / "test" / "good" / "y.PNG")
    _png(root / "a" / "test" / "good" / "y.Png")
    _png(root / "a" / "test" / "good" / "z.jpg")
    manifest = import_mvtec_folder(root, tmp_path / "m.json")
    rows = json.loads(manifest.read_text())
    ids = [r["item_id"] for r in rows]
    files = [r["query_path"] for r in rows]
    assert len(ids) == len(set(ids)) == len(set(files)) == len(rows)          # one item per image file
    assert {"a_b/c/000.png", "a/b_c/000.png", "a/good/y.PNG", "a/good/y.Png"} <= set(ids)
    assert "a_good_z" in ids and "a_good_000" in ids                           # readable where unique
    items = load_manifest(manifest)
    assert len(items) == len(rows)
    from anomalyclaw.eval.data.manifests import read_manifest
    assert not read_manifest(manifest).problems


def test_traits_for_every_category_or_one_and_textures_never_aligned(mvtec, tmp_path, capsys):
    default = {i.category: i.traits for i in load_manifest(import_mvtec_folder(mvtec, tmp_path / "d.json"))}
    assert default == {"bottle": {"object", "aligned"}, "carpet": {"texture"}}
    everywhere = load_manifest(import_mvtec_folder(mvtec, tmp_path / "t.json", traits=["texture"]))
    assert {i.traits for i in everywhere} == {frozenset({"texture"})}
    card = everywhere[0].domain_card
    assert "surface" in card.normal and "aligned" not in card.traits
    one = load_manifest(import_mvtec_folder(mvtec, tmp_path / "o.json",
                                            traits={"bottle": ["object", "rotating"]}))
    assert {i.category: i.traits for i in one} == {"bottle": {"object", "rotating"}, "carpet": {"texture"}}
    with pytest.raises(FolderLayoutError, match="unknown trait.*shiny.*known: aerial"):
        import_mvtec_folder(mvtec, tmp_path / "x.json", traits=["shiny"])
    with pytest.raises(FolderLayoutError, match="category 'cable', which is not imported; categories: bottle, carpet"):
        import_mvtec_folder(mvtec, tmp_path / "x.json", traits={"cable": ["object"]})
    # From the command line, and the importer says which traits each category got.
    assert main(["import-folder", str(mvtec), "--out", str(tmp_path / "cli.json"), "--traits", "object,counting",
                 "--traits", "carpet=texture"]) == 0
    out = capsys.readouterr().out
    assert "bottle: traits counting, object" in out and "carpet: traits texture" in out and "--traits" in out
    assert {i.category: i.traits for i in load_manifest(tmp_path / "cli.json")} == {
        "bottle": {"object", "counting"}, "carpet": {"texture"}}
    assert main(["import-folder", str(mvtec), "--out", str(tmp_path / "bad.json"), "--traits", "glossy"]) == 2
    assert "unknown trait(s) glossy" in capsys.readouterr().err
