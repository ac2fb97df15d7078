"""The HTML run report: built from a real offline run with saved tool images, parsed back."""
from __future__ import annotations

import asyncio
import base64
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from anomalyclaw.cli import main
from anomalyclaw.errors import AnomalyClawError
from anomalyclaw.eval.data.manifests import load_manifest
from anomalyclaw.eval.scoring.metrics import evaluate
from anomalyclaw.eval.running.records import RECORDS_FILE, Record, load_records, write_records
from anomalyclaw.eval.reports.html import TOOL_THUMB_SIDE, build_report
from anomalyclaw.eval.running.runner import Runner
from anomalyclaw.graph.vlm import make_vlm
from anomalyclaw.imaging import decode_image
from anomalyclaw.paths import safe_file_name

RUN_ITEMS = ("S1_0000", "S1_0001", "S2_0000")
INJECTED = "<script>alert('pwned')</script>"
VOID = {"img", "meta", "br", "hr", "input", "link", "col", "wbr", "source"}


class PageParser(HTMLParser):
    """Collects what the tests check: tags seen, ids, image sources, text, and nesting errors."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.ids: set[str] = set()
        self.img_src: list[str] = []
        self.links: list[str] = []
        self.text: list[str] = []
        self.stack: list[str] = []
        self.nesting_errors: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            self.img_src.append(a.get("src", ""))
        if tag == "a":
            self.links.append(a.get("href", ""))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.nesting_errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
            return
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse(page: Path) -> PageParser:
    parser = PageParser()
    parser.feed(page.read_text(encoding="utf-8"))
    parser.close()
    assert parser.nesting_errors == [] and parser.stack == [], (parser.nesting_errors, parser.stack)
    return parser


@pytest.fixture(scope="module")
def offline_run(small_items, small_synth, tmp_path_factory) -> Path:
    """A finished offline run of three items with their tool images saved (read-only for tests)."""
    items = [it for it in small_items if it.item_id in RUN_ITEMS]
    assert len(items) == len(RUN_ITEMS)
    out = tmp_path_factory.mktemp("report_run")
    summary = asyncio.run(Runner(make_vlm("offline"), out_dir=out, save_images=True, progress=False).run(items))
    assert summary.n_done == len(RUN_ITEMS) and summary.n_errors == 0
    return out


@pytest.fixture()
def run_copy(offline_run, tmp_path) -> Path:
    """A copy of the run a test may edit."""
    return Path(shutil.copytree(offline_run, tmp_path / "run"))


def _saved_images(run: Path) -> list[Path]:
    return sorted(p for p in (run / "images").rglob("*") if p.is_file())


def _anchor(item_id: str) -> str:
    return "item-" + safe_file_name(item_id)


def test_report_has_every_item_and_embeds_tool_images(offline_run, tmp_path):
    page = build_report(offline_run, tmp_path / "report.html")
    parsed = parse(page)
    html_text = page.read_text(encoding="utf-8")
    records = load_records(offline_run)
    for r in records:
        assert _anchor(r.item_id) in parsed.ids
        assert "#" + _anchor(r.item_id) in parsed.links
        assert r.item_id in html_text
    assert parsed.tags.count("details") >= len(records)
    assert "script" not in parsed.tags
    # Every saved tool image is embedded as a thumbnail (same aspect, longest side bounded) and
    # linked at full size; plus two plots and each item's map (no manifest: the map alone).
    saved = _saved_images(offline_run)
    assert saved, "the offline run saved no tool images"
    embedded = [decode_image(base64.b64decode(s.split(",", 1)[1])) for s in parsed.img_src
                if s.startswith("data:image/")]
    assert len(embedded) == len(parsed.img_src) == len(saved) + 2 + len(records)
    for path in saved:
        full = decode_image(path.read_bytes())
        assert any(abs(im.shape[1] / im.shape[0] - full.shape[1] / full.shape[0]) < 0.02
                   and max(im.shape[:2]) == min(TOOL_THUMB_SIDE, max(full.shape[:2])) for im in embedded), path
        assert any((page.parent / link).resolve() == path.resolve() for link in parsed.links), path
    text = " ".join(parsed.text)
    assert "offline" in text and "rule-based stand-in" in text


def test_report_summary_matches_evaluate(offline_run, tmp_path):
    records = load_records(offline_run)
    result = evaluate(records)
    page = build_report(offline_run, tmp_path / "report.html")
    text = " ".join(parse(page).text)
    macro = result["macro_auroc"]["fused"]
    assert f"{macro:.4f}" in text  # S1 has both labels, so the macro mean is a number
    assert "ROC curves" in text and "AUROC by domain" in text
    # Each record's fused score is shown in its row of the index.
    for r in records:
        assert f"{r.anomaly_score:.3f}" in text


def test_record_strings_are_escaped(run_copy, tmp_path):
    records = load_records(run_copy)
    target = records[0]
    target.rationale = INJECTED
    target.fallbacks.append(INJECTED)
    target.direct_rationale = json.dumps({"image_label": "anomalous", "confidence": 0.9, "evidence": INJECTED})
    target.history.append({"turn": 9, "stage": "refute", "tool": INJECTED, "args": {"x": INJECTED},
                           "observation": INJECTED, "verdicts": [{"id": INJECTED, "status": "confirmed",
                                                                  "evidence": INJECTED}],
                           "reply": INJECTED, INJECTED: INJECTED})
    target.candidate_features.append({"id": "c9", "description": INJECTED, "bbox": [0.1, 0.1, 0.2, 0.2]})
    (run_copy / RECORDS_FILE).unlink()
    write_records(records, run_copy)
    page = build_report(run_copy, tmp_path / "report.html", manifest=None)
    parsed = parse(page)
    raw = page.read_text(encoding="utf-8")
    assert "script" not in parsed.tags
    assert INJECTED not in raw and "<script" not in raw
    assert "&lt;script&gt;" in raw
    assert sum(INJECTED in t for t in parsed.text) >= 8  # shown as text, everywhere it was put


def test_image_paths_from_records_cannot_leave_the_run_folder(run_copy, tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(_saved_images(run_copy)[0].read_bytes())
    records = load_records(run_copy)
    records[0].history.append({"turn": 9, "stage": "refute", "tool": "x", "observation": "o",
                               "images": [str(secret), "../secret.png", "images/../records.jsonl",
                                          "images/none.png"]})
    (run_copy / RECORDS_FILE).unlink()
    write_records(records, run_copy)
    page = build_report(run_copy, tmp_path / "report.html")
    parsed = parse(page)
    raw = page.read_text(encoding="utf-8")
    n_saved = len(_saved_images(run_copy))
    # + plots + each item's map
    assert len([s for s in parsed.img_src if s.startswith("data:image/")]) == n_saved + 2 + len(records)
    assert raw.count("refused: not an image file under") == 3
    assert "is missing from" in raw


def test_linked_images_and_manifest_thumbnails(offline_run, small_synth, tmp_path):
    page = build_report(offline_run, tmp_path / "pages" / "report.html", embed_images=False, manifest=small_synth)
    parsed = parse(page)
    linked = [s for s in parsed.img_src if not s.startswith("data:")]
    # Tool images and each item's references: all linked, all resolving from the page; each query
    # is drawn with its map overlaid (a generated image, embedded).
    n_refs = sum(len(it.ref_paths) for it in load_manifest(small_synth) if it.item_id in RUN_ITEMS)
    assert len(linked) == len(_saved_images(offline_run)) + n_refs
    for src in linked:
        assert (page.parent / src).resolve().is_file(), src
    assert len(parsed.img_src) - len(linked) == len(RUN_ITEMS) + 2   # overlays + plots
    # Boxes are drawn over the query.
    assert "rect" in parsed.tags and "svg" in parsed.tags


def test_single_item_page_and_unknown_item(offline_run, tmp_path):
    page = build_report(offline_run, tmp_path / "one.html", item_ids=["S1_0001"])
    parsed = parse(page)
    assert parsed.ids == {_anchor("S1_0001")}
    assert "S1_0000" not in page.read_text(encoding="utf-8")
    with pytest.raises(AnomalyClawError, match="nope"):
        build_report(offline_run, tmp_path / "x.html", item_ids=["nope"])


def test_error_records_and_released_format(tmp_path):
    released = {
        "item_id": "D1_0037", "domain_code": "D1", "label_gt": 0, "mode": "anomaly_detection",
        "anomaly_score": 0.035, "direct_score": 0.02, "v9_score": 0.05, "n_turns": 2,
        "tools_used": ["tool_side_by_side"],
        "candidate_features": [{"name": "minor scratch", "location_hint": "left side"}],
        "history": [{"turn": 1, "thought": "look left", "anomaly_score": 0.15, "action": "call_tool",
                     "tool": "tool_side_by_side", "args": "{'bbox': [100, 120, 180, 180]}",
                     "remaining_candidate_features": [{"name": "minor scratch", "location_hint": "left side"}],
                     "visual_evidence": ["fabric texture is regular"], "obs_keys": ["bbox"]},
                    {"turn": 2, "refutation_verdict": "found_in_ref", "feature_status_update": "seen on ref0",
                     "action": "final", "updated_score": 0.05}],
        "direct_rationale": "not JSON at all", "error": None}
    broken = Record(item_id="D1_0038", domain_code="D1", label_gt=1, error="image: cannot read q.png")
    folder = tmp_path / "released"
    folder.mkdir()
    (folder / "D1.json").write_text(json.dumps([released, broken.model_dump(mode="json")]))
    page = build_report(folder, tmp_path / "released.html")
    parsed = parse(page)
    text = " ".join(parsed.text)
    for expected in ("minor scratch", "left side", "found_in_ref", "seen on ref0", "fabric texture is regular",
                     "not JSON at all", "image: cannot read q.png", "look left"):
        assert expected in text, expected
    assert "No record has a label, both branch scores and no error" not in text


def test_released_records_render(reference_dir, tmp_path):
    src = reference_dir / "results" / "released_qwen35vl27b" / "D1.json"
    page = build_report(src, tmp_path / "d1.html")
    parsed = parse(page)
    records = load_records(src)
    assert {_anchor(r.item_id) for r in records} <= parsed.ids
    assert "script" not in parsed.tags


def test_cli_report(offline_run, tmp_path, capsys):
    out = tmp_path / "cli.html"
    assert main(["report", str(offline_run), "--out", str(out), "--item", "S2_0000"]) == 0
    assert "S2_0000" in out.read_text(encoding="utf-8")
    assert str(out) in capsys.readouterr().out
    assert main(["report", str(offline_run), "--out", str(out), "--item", "missing_id"]) == 2
    assert "missing_id" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "no_such_run")]) == 2


def test_the_embedded_page_does_not_grow_with_the_images(offline_run, small_synth, tmp_path):
    """Thumbnails, not full-size images: the same run reported against copies of its images at
    four times the side (16 times the pixels) weighs about the same."""
    import dataclasses

    import cv2

    from anomalyclaw.eval.data.manifests import write_manifest

    items = [it for it in load_manifest(small_synth) if it.item_id in RUN_ITEMS]
    big_dir = tmp_path / "big"
    big_dir.mkdir()

    def bigger(path: Path) -> Path:
        out = big_dir / f"{len(list(big_dir.iterdir()))}_{path.name}"
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        cv2.imwrite(str(out), cv2.resize(image, (image.shape[1] * 4, image.shape[0] * 4),
                                         interpolation=cv2.INTER_CUBIC))
        return out

    big = [dataclasses.replace(it, query_path=bigger(it.query_path), ref_paths=tuple(bigger(p) for p in it.ref_paths),
                               mask_path=bigger(it.mask_path) if it.mask_path else None) for it in items]
    big_manifest = write_manifest(big, tmp_path / "big.json")
    small_page = build_report(offline_run, tmp_path / "small.html", manifest=small_synth).stat().st_size
    big_page = build_report(offline_run, tmp_path / "big.html", manifest=big_manifest).stat().st_size
    image_bytes = sum(p.stat().st_size for it in big for p in (it.query_path, *it.ref_paths))
    assert big_page < 1.15 * small_page, (big_page, small_page)
    assert big_page < image_bytes / 4  # far below the images themselves
