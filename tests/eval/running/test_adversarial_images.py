"""The standing adversarial suite, images (issue 16), through the one loader and a whole run:
animated GIF and WebP, multi-page TIFF, WebP, huge text chunks, 1 x 100000 and 10 x 100000,
float TIFF with NaN, references identical to the query (zero variance) or all black. Each is
judged from its first frame/page, or refused with an error naming the file; the others' scores
never change. Decode memory is bounded per process (issue 17 item 13)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from anomalyclaw.config import AgentConfig
from anomalyclaw.eval.running.records import RECORDS_FILE, Record
from anomalyclaw.eval.running.runner import Runner
from anomalyclaw.graph.vlm import make_vlm
from anomalyclaw.imaging import MAX_ASPECT, MIN_SIDE, load_image


def _frames(base: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray(base), Image.fromarray(255 - base), Image.fromarray(base // 2)]


def hostile_images(base: np.ndarray, folder: Path) -> dict[str, tuple[Path, str | None]]:
    """kind -> (file, None if it loads as ``base`` (its first frame), else a phrase of its error)."""
    folder.mkdir(parents=True, exist_ok=True)
    first, *rest = _frames(base)
    out: dict[str, tuple[Path, str | None]] = {}

    def save(name: str, expect: str | None, **kw):
        path = folder / name
        kw.pop("image", first).save(path, **kw)
        out[path.name] = (path, expect)

    save("animated.gif", "gif", save_all=True, append_images=rest, duration=80, loop=0)
    save("animated.webp", "webp", save_all=True, append_images=rest, lossless=True)
    save("pages.tiff", None, save_all=True, append_images=rest)
    save("plain.webp", None, lossless=True)
    big = PngImagePlugin.PngInfo()
    big.add_text("comment", "x" * 5 * 2**20)                   # 5 MB of tEXt
    big.add_text("history", "y" * 80 * 2**20, zip=True)        # 80 MB once inflated: above Pillow's bound
    save("text_chunks.png", None, pnginfo=big)
    save("line.png", f"smaller than {MIN_SIDE} px", image=Image.fromarray(np.zeros((1, 100_000, 3), np.uint8)))
    save("strip.png", f"more than {MAX_ASPECT} times", image=Image.fromarray(np.zeros((10, 100_000, 3), np.uint8)))
    grey = base.mean(axis=2).astype(np.float32)
    grey[:8, :8] = np.nan
    grey[8, 8] = np.inf
    save("float_nan.tiff", "float", image=Image.fromarray(grey, mode="F"))
    return out


@pytest.fixture(scope="module")
def picture(small_items) -> np.ndarray:
    return load_image(small_items[0].query_path)


def test_each_hostile_image_loads_its_first_frame_or_names_the_file(picture, tmp_path):
    for kind, (path, expect) in hostile_images(picture, tmp_path).items():
        if expect in (None, "gif", "webp"):
            img = load_image(path)
            assert img.shape == picture.shape and img.dtype == np.uint8, kind
            tolerance = 8 if expect == "gif" else 0                     # GIF: a 256-colour palette
            assert np.abs(img.astype(int) - picture).mean() <= tolerance, kind
        elif expect == "float":
            img = load_image(path)
            assert img.shape == picture.shape and np.isfinite(img).all() and img[:8, :8].max() == 0
            assert img.std() > 10                                       # the finite range is stretched
        else:
            with pytest.raises(Exception) as err:
                load_image(path)
            assert str(path) in str(err.value) and expect in str(err.value), (kind, str(err.value))


async def test_a_run_over_hostile_images_judges_or_names_each(small_items, picture, tmp_path):
    item = small_items[0]
    kinds = hostile_images(picture, tmp_path / "imgs")
    black = tmp_path / "imgs" / "black.png"
    Image.fromarray(np.zeros_like(picture)).save(black)
    items = [replace(item, item_id="plain")]
    items += [replace(item, item_id=kind, query_path=path) for kind, (path, _) in kinds.items()]
    items += [replace(item, item_id="refs_equal_query", ref_paths=(item.query_path,) * 3),
              replace(item, item_id="all_black", query_path=black, ref_paths=(black,) * 3),
              replace(item, item_id="black_refs", ref_paths=(black,) * 2)]
    out = tmp_path / "run"
    summary = await Runner(make_vlm("offline"), out_dir=out, progress=False, config=AgentConfig()).run(items)
    lines = (out / RECORDS_FILE).read_text(encoding="utf-8").splitlines()
    records = {r.item_id: r for r in (Record.model_validate(json.loads(line)) for line in lines)}
    assert set(records) == {it.item_id for it in items} and summary.fatal is None
    refused = {k for k, (_, expect) in kinds.items() if expect not in (None, "gif", "webp", "float")}
    for item_id, rec in records.items():
        if item_id in refused:
            assert rec.error.startswith("image: ") and str(kinds[item_id][0]) in rec.error, rec.error
            continue
        assert rec.error is None and not (rec.direct_error or rec.refute_error), (item_id, rec.error)
        for score in (rec.anomaly_score, rec.direct_score, rec.refute_score, rec.expert_score):
            assert score is not None and 0.0 <= score <= 1.0 and np.isfinite(score), (item_id, rec)
        assert not any("internal" in f for f in rec.fallbacks), (item_id, rec.fallbacks)
    for kind in ("pages.tiff", "plain.webp", "text_chunks.png", "animated.webp"):   # the same pixels: the same scores
        assert records[kind].anomaly_score == records["plain"].anomaly_score, kind


def test_decode_memory_is_bounded_whatever_the_concurrency():
    """Issue 17 item 13: every large image in flight decoded at once, each with three full-size
    copies (a 72 MP PNG of 231 KB cost ~1.3 GB). Now decodes share one byte budget and large
    images are reduced before any copy: eight 16 MP PNGs loaded by eight threads at once stay
    within the budget plus one image (measured as ``anomalyclaw bench memory`` does)."""
    from anomalyclaw.eval.bench.memory import measure_decode

    row = measure_decode(8, 4000, 4000, threads=8, max_side=512, budget_mb=64)
    # One 16 MP image is 46 MB decoded; eight at once with their copies were over 1 GB.
    assert row["peak_extra_rss_mb"] < 200 and row["budget_waits"] >= 1, row
