"""MMAD's question file: a small file in MMAD's format, with every kind of bad entry it can hold,
loads into askable questions and per-question rejections, never an exception."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from anomalyclaw.errors import ManifestError
from anomalyclaw.eval.data.mmad import MMAD_TYPES, load_domain_knowledge, question_id, read_mmad
from anomalyclaw.imaging import load_mask, save_image


def _png(path: Path, value: int = 128) -> None:
    save_image(np.full((64, 64, 3), value, np.uint8), path)


def _q(text="Is there any defect in the object?", options=None, answer="A", qtype="Anomaly Detection"):
    return {"Question": text, "Options": options or {"A": "Yes.", "B": "No."}, "Answer": answer, "type": qtype,
            "annotation": True}


@pytest.fixture
def mmad_root(tmp_path) -> Path:
    """An MMAD-shaped data root: DS-MVTec queries, MVTec-AD templates, mmad.json beside them."""
    root = tmp_path / "MMAD"
    for rel in ("DS-MVTec/bottle/image/broken_large/000.png", "DS-MVTec/bottle/image/good/001.png",
                "MVTec-AD/bottle/train/good/010.png", "MVTec-AD/bottle/train/good/011.png",
                "VisA/candle/test/bad/005.png"):
        _png(root / rel)
    good = {"random_templates": ["MVTec-AD/bottle/train/good/010.png", "MVTec-AD/bottle/train/good/011.png"],
            "similar_templates": ["MVTec-AD/bottle/train/good/011.png"]}
    data = {
        "DS-MVTec/bottle/image/broken_large/000.png": {
            "image_path": "image/broken_large/000.png", "mask_path": "rbg_mask/broken_large/000_rbg_mask.png",
            "conversation": [
                _q(),
                _q("There is a defect in the object. Where is the defect?",
                   {"A": "Top right.", "B": "Top left.", "C": "Center.", "D": "Bottom right."}, "D",
                   "Defect Localization"),
                _q("What is it?", {"A": "Crack.", "B": "Dent."}, "C", "Defect Classification"),  # no such option
                _q("", {"A": "x", "B": "y"}, "A", "Object Details"),                             # no text
                _q("Which?", {"A": "one", "F": "six"}, "A", "Object Structure"),                 # letter F
                "not a question",
            ], **good},
        "DS-MVTec/bottle/image/good/001.png": {"mask_path": None, "conversation": [_q(answer="B")], **good},
        "DS-MVTec/bottle/image/missing/002.png": {"mask_path": "", "conversation": [_q()], **good},
        "DS-MVTec/bottle/image/broken_large/003.png": "not an object",
        "../outside.png": {"conversation": [_q()], **good},
        "VisA/candle/test/bad/005.png": {"mask_path": "", "conversation": [_q(), _q(answer="B")],
                                         "random_templates": [], "similar_templates": []},
    }
    (root / "mmad.json").write_text(json.dumps(data), encoding="utf-8")
    return root


def test_good_questions_load_and_bad_ones_become_rejections(mmad_root):
    contents = read_mmad(mmad_root / "mmad.json")
    assert contents.data_root == mmad_root.resolve()
    asked = {q.question_id: q for im in contents.images for q in im.questions}
    key = "DS-MVTec/bottle/image/broken_large/000.png"
    assert sorted(asked) == [question_id(key, 0), question_id(key, 1), question_id("DS-MVTec/bottle/image/good/001.png", 0)]
    loc = asked[question_id(key, 1)]
    assert loc.answer == "D" and loc.dataset == "DS-MVTec" and loc.category == "bottle"
    assert loc.question.options[2] == ("C", "Center.") and loc.question_type == "Defect Localization"
    assert not hasattr(loc.question, "answer")  # what a model sees carries no answer
    reasons = {r.question_id: " ".join(r.reasons) for r in contents.rejected}
    assert "'Answer' must be one of the option letters ['A', 'B'], got 'C'" in reasons[question_id(key, 2)]
    assert "'Question' must be a non-empty string" in reasons[question_id(key, 3)]
    assert "option letters must be A, B, C, D, E" in reasons[question_id(key, 4)]
    assert "expected a question object" in reasons[question_id(key, 5)]
    assert "query image not found" in reasons[question_id("DS-MVTec/bottle/image/missing/002.png", 0)]
    assert "expected an object" in reasons[question_id("DS-MVTec/bottle/image/broken_large/003.png", "entry")]
    assert "relative to the data root" in reasons[question_id("../outside.png", 0)]
    visa = [reasons[question_id("VisA/candle/test/bad/005.png", i)] for i in (0, 1)]
    assert all("'random_templates' is empty" in r for r in visa)
    # a rejection keeps what the scorer can read of it
    missing = next(r for r in contents.rejected if r.image == "DS-MVTec/bottle/image/missing/002.png")
    assert missing.meta() == {"question_id": question_id("DS-MVTec/bottle/image/missing/002.png", 0),
                              "image": "DS-MVTec/bottle/image/missing/002.png", "dataset": "DS-MVTec",
                              "question_type": "Anomaly Detection", "answer": "A"}
    assert len(contents.problems) >= len(contents.rejected)


def test_items_templates_cards_and_masks(mmad_root):
    contents = read_mmad(mmad_root)  # the folder holding mmad.json
    anomalous = next(im for im in contents.images if "broken_large" in im.item.item_id)
    item = anomalous.item
    assert item.ref_paths == ((mmad_root / "MVTec-AD/bottle/train/good/010.png").resolve(),)  # 1 shot, random
    assert item.label == 1 and item.anomaly_type == "broken_large" and item.domain_code == "DS-MVTec"
    assert item.mask_path == (mmad_root / "DS-MVTec/bottle/rbg_mask/broken_large/000_rbg_mask.png").resolve()
    assert item.domain_card.code == "D1" and "object" in item.traits
    normal = next(im for im in contents.images if "/good/" in im.item.item_id).item
    assert normal.label == 0 and normal.anomaly_type is None and normal.mask_path is None
    similar = read_mmad(mmad_root / "mmad.json", refs="similar", n_refs=3)
    assert [p.name for p in similar.images[0].item.ref_paths] == ["011.png"]  # [:3] of a list of one
    two = read_mmad(mmad_root / "mmad.json", n_refs=2)
    assert [p.name for p in two.images[0].item.ref_paths] == ["010.png", "011.png"]
    only_visa = read_mmad(mmad_root / "mmad.json", datasets=["VisA"])
    assert not only_visa.images and len(only_visa.rejected) == 2


def test_domain_knowledge_goes_into_the_card(mmad_root, tmp_path):
    dk = tmp_path / "domain_knowledge.json"
    dk.write_text(json.dumps({"MVTec": {"bottle": {"broken_large": " <Large Breakage>\n Description: a big chip.",
                                                   "good": " <Normal Characteristics>\n Description: round."}}}))
    knowledge = load_domain_knowledge(dk)
    assert knowledge[("DS-MVTec", "bottle")].startswith("<Large Breakage>")
    contents = read_mmad(mmad_root / "mmad.json", domain_knowledge=dk)
    card = contents.images[0].item.domain_card
    assert "Description: a big chip." in card.describe("bottle") and "Description: round." in card.knowledge
    bad = tmp_path / "bad_dk.json"
    bad.write_text(json.dumps({"MVTec": {"bottle": "flat text"}}))
    with pytest.raises(ManifestError, match="MVTec/bottle"):
        load_domain_knowledge(bad)


def test_data_root_order(mmad_root, tmp_path, monkeypatch):
    elsewhere = tmp_path / "questions" / "mmad.json"
    elsewhere.parent.mkdir()
    elsewhere.write_text((mmad_root / "mmad.json").read_text())
    monkeypatch.setenv("ANOMALYCLAW_DATA", str(mmad_root.parent))  # the folder above MMAD/
    assert read_mmad(elsewhere).data_root == mmad_root.resolve()
    monkeypatch.delenv("ANOMALYCLAW_DATA")
    lost = read_mmad(elsewhere)  # no root holds the images: every question says so
    reasons = {r.question_id: " ".join(r.reasons) for r in lost.rejected}
    assert not lost.images and "query image not found" in reasons[question_id("DS-MVTec/bottle/image/good/001.png", 0)]
    assert read_mmad(elsewhere, data_root=mmad_root).n_questions == 3
    with pytest.raises(ManifestError, match="is not a folder"):
        read_mmad(elsewhere, data_root=tmp_path / "nowhere")


@pytest.mark.parametrize("text, words", [("[1, 2]", "expected one JSON object"), ("{", "not valid JSON")])
def test_a_file_that_is_no_mmad_object_is_one_clear_error(tmp_path, text, words):
    path = tmp_path / "mmad.json"
    path.write_text(text)
    with pytest.raises(ManifestError, match=words):
        read_mmad(path)


def test_repeated_keys_are_reported(mmad_root):
    text = (mmad_root / "mmad.json").read_text()
    key = '"DS-MVTec/bottle/image/good/001.png"'
    entry = text[text.index(key):].split("}, \"DS-MVTec/bottle/image/missing", 1)[0] + "}"
    (mmad_root / "mmad.json").write_text(text[:-1] + ", " + entry + "}")
    contents = read_mmad(mmad_root / "mmad.json")
    assert any("appears more than once" in m for _, _, m in contents.problems)


def test_types_are_mmads(mmad_root):
    assert MMAD_TYPES[0] == "Anomaly Detection" and "Object Details" in MMAD_TYPES and len(MMAD_TYPES) == 8


def test_synth_questions_match_the_benchmark(tmp_path):
    from anomalyclaw.eval.data.manifests import load_manifest
    from anomalyclaw.eval.data.synth import generate_benchmark
    from anomalyclaw.eval.data.synth.mmad import COIN_COUNT, QUADRANTS, coin_count, write_mmad_questions

    manifest = generate_benchmark(tmp_path / "synth", seed=0, n_test_per_domain=4, n_calibration=0, n_dev=0,
                                  size=128, domains=["S2", "S6"])
    path = write_mmad_questions(manifest)
    contents = read_mmad(path)
    assert not contents.rejected and contents.data_root == (tmp_path / "synth").resolve()
    items = {it.item_id: it for it in load_manifest(manifest)}
    for im in contents.images:
        original = items[Path(im.item.item_id).stem]
        assert (im.item.label == 0) == ("good" in im.item.item_id) == (original.label == 0)
        assert im.item.query_path.read_bytes() == original.query_path.read_bytes()
        kinds = {q.question_type: q for q in im.questions}
        assert set(kinds) <= {"Anomaly Detection", "Defect Localization", "Defect Classification", "Object Structure"}
        ad = kinds["Anomaly Detection"]
        assert ad.question.option_map[ad.answer] == ("Yes." if original.label else "No.")
        if original.label:
            loc = kinds["Defect Localization"]
            mask = load_mask(original.mask_path)
            h, w = mask.shape
            quads = [mask[:h // 2, :w // 2], mask[:h // 2, w // 2:], mask[h // 2:, :w // 2], mask[h // 2:, w // 2:]]
            assert loc.question.option_map[loc.answer] == QUADRANTS[int(np.argmax([q.sum() for q in quads]))]
            kind = kinds["Defect Classification"]
            assert kind.question.option_map[kind.answer].lower().startswith(original.anomaly_type.split("_")[0])
        else:
            assert "Defect Localization" not in kinds
        if original.domain_code == "S2":
            count = kinds["Object Structure"]
            assert count.question.option_map[count.answer] == f"{coin_count(original.anomaly_type)}."
        else:
            assert "Object Structure" not in kinds
        if original.domain_code == "S6":  # bi-temporal: the template is the item's own "before" image
            assert im.item.ref_paths == original.ref_paths
    assert coin_count(None) == COIN_COUNT and coin_count("missing_part") == COIN_COUNT - 1
