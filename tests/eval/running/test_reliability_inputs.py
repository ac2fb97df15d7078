"""Bad images and manifests: a clear per-item error naming the file, or a correct score; never a
stopped run, never a spoiled good item (issue 5)."""
from __future__ import annotations

import io
import json
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalyclaw.errors import ImageLoadError
from anomalyclaw.eval.data.manifests import read_manifest
from anomalyclaw.eval.running.records import RECORDS_FILE, Record
from anomalyclaw.eval.running.runner import Runner
from anomalyclaw.graph.vlm import make_vlm
from anomalyclaw.imaging import MIN_SIDE, load_image


# ------------------------------------------------------------------------------ image files
def _png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header announcing ``width`` x ``height`` px with only a few rows of data:
    a decompression bomb's shape at a few hundred bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    rows = zlib.compress(b"\x00" * (width + 1) * 4, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def _save(pil: Image.Image, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pil.save(path, **kw)
    return path


def _exif_rotated_jpeg(rgb: np.ndarray, path: Path) -> Path:
    """``rgb`` stored rotated 90 degrees counter-clockwise with EXIF orientation 6 (display
    rotates 90 degrees clockwise), so a viewer that honours EXIF shows ``rgb``."""
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(rgb, k=1)))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(stored, path, quality=95, exif=exif.tobytes())


def _variants(rgb: np.ndarray, folder: Path) -> dict[str, Path]:
    """The same picture in every form a data set throws at a loader."""
    pil = Image.fromarray(rgb)
    grey = np.asarray(pil.convert("L"))
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    rgba[:16, :16, 3] = 0  # a transparent corner
    return {
        "grey16": _save(Image.fromarray(grey.astype(np.uint16) * 257), folder / "grey16.png"),
        "grey": _save(pil.convert("L"), folder / "grey.png"),
        "rgba": _save(Image.fromarray(rgba, "RGBA"), folder / "rgba.png"),
        "cmyk": _save(pil.convert("CMYK"), folder / "cmyk.jpg", quality=95),
        "palette": _save(pil.convert("P", palette=Image.Palette.ADAPTIVE, colors=64), folder / "palette.png"),
        "exif": _exif_rotated_jpeg(rgb, folder / "exif.jpg"),
    }


def _broken(good_png: Path, good_jpg: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    """Files that cannot be judged, each with a phrase its error must contain."""
    folder.mkdir(parents=True, exist_ok=True)
    png, jpg = good_png.read_bytes(), good_jpg.read_bytes()
    files = {
        "missing": (folder / "missing.png", "does not exist"),
        "empty": (folder / "empty.png", "empty (0 bytes)"),
        "truncated_png": (folder / "truncated.png", "truncated or corrupt"),
        "truncated_jpeg": (folder / "truncated.jpg", "truncated or corrupt"),
        "text": (folder / "notes.png", "not an image file"),
        "bomb": (folder / "bomb.png", "decompression-bomb"),
        "tiny": (folder / "tiny.png", f"smaller than {MIN_SIDE} px"),
    }
    files["empty"][0].write_bytes(b"")
    files["truncated_png"][0].write_bytes(png[: len(png) // 2])
    files["truncated_jpeg"][0].write_bytes(jpg[: len(jpg) * 6 // 10])
    files["text"][0].write_text("these are my notes, not pixels\n")
    files["bomb"][0].write_bytes(_png_claiming(20000, 20000))
    _save(Image.new("RGB", (1, 1), (200, 10, 10)), files["tiny"][0])
    return files


@pytest.fixture(scope="module")
def picture() -> np.ndarray:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:96, 0:128]
    base = np.stack([x * 2, y * 2, (x + y)], axis=2).astype(np.float32)
    return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------ the loader
def test_loader_turns_every_pixel_format_into_rgb(picture, tmp_path):
    files = _variants(picture, tmp_path)
    for name, path in files.items():
        img = load_image(path)
        assert img.dtype == np.uint8 and img.shape == picture.shape, name
    upright = load_image(files["exif"]).astype(int)
    assert np.abs(upright - picture).mean() < 10 < 40 < np.abs(upright - picture[::-1, ::-1]).mean()
    grey16 = load_image(files["grey16"])
    assert grey16.min() == 0 and grey16.max() == 255  # the 16-bit range is stretched to 8 bits
    rgba = load_image(files["rgba"])
    assert (rgba[:16, :16] == 0).all() and np.array_equal(rgba[32:, 32:], picture[32:, 32:])
    assert np.abs(load_image(files["cmyk"]).astype(int) - picture).mean() < 6


def test_loader_errors_name_the_file_and_the_reason(picture, tmp_path):
    good_png = _save(Image.fromarray(picture), tmp_path / "good.png")
    good_jpg = _save(Image.fromarray(picture), tmp_path / "good.jpg", quality=90)
    for name, (path, phrase) in _broken(good_png, good_jpg, tmp_path / "bad").items():
        start = time.perf_counter()
        with pytest.raises(ImageLoadError) as err:
            load_image(path)
        assert time.perf_counter() - start < 2.0, name  # refused without decoding 400 MP
        assert err.value.path == str(path) and phrase in str(err.value), (name, str(err.value))


def test_oversized_images_are_refused_or_decoded_small(picture, tmp_path, monkeypatch):
    big = np.tile(picture, (4, 4, 1))  # 384 x 512 px
    png = _save(Image.fromarray(big), tmp_path / "big.png")
    jpg = _save(Image.fromarray(big), tmp_path / "big.jpg", quality=90)
    monkeypatch.setenv("ANOMALYCLAW_MAX_IMAGE_PIXELS", str(100 * 1000))
    with pytest.raises(ImageLoadError, match="decompression-bomb limit"):
        load_image(png)
    small = load_image(jpg)  # a JPEG is decoded at a reduced scale instead
    assert small.shape[0] * small.shape[1] <= 100 * 1000
    assert small.shape[1] / small.shape[0] == pytest.approx(4 / 3, 0.02)
    monkeypatch.delenv("ANOMALYCLAW_MAX_IMAGE_PIXELS")
    assert load_image(jpg, max_side=128).shape == (96, 128, 3)  # decoded at 1/4, never upscaled


def test_broken_exif_is_ignored(picture, tmp_path):
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 99  # no such orientation
    Image.fromarray(picture).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    path = tmp_path / "odd_exif.jpg"
    path.write_bytes(buf.getvalue())
    assert load_image(path).shape == picture.shape


# ------------------------------------------------------------------------------ whole runs
def _row(item_id: str, query: Path | str, refs: list, label: int = 0) -> dict:
    return {"item_id": item_id, "domain": "texture_surface", "domain_code": "S1", "query_path": str(query),
            "ref_paths": [str(r) for r in refs], "label": label, "split": "test"}


def _by_id(out_dir: Path) -> dict[str, Record]:
    lines = (out_dir / RECORDS_FILE).read_text(encoding="utf-8").splitlines()
    records = [Record.model_validate(json.loads(line)) for line in lines]
    ids = [r.item_id for r in records]
    assert len(ids) == len(set(ids)), "an item was recorded twice"
    return {r.item_id: r for r in records}


async def _run(manifest: Path, out_dir: Path, data_root: Path):
    contents = read_manifest(manifest, data_root=data_root)
    runner = Runner(make_vlm("offline"), out_dir=out_dir, progress=False)
    summary = await runner.run(contents.items, rejected=contents.rejected)
    return contents, summary


async def test_bad_items_get_error_records_and_leave_good_items_alone(small_items, tmp_path):
    data = tmp_path / "data"
    goods = [it for it in small_items if it.domain_code in ("S1", "S3", "S5")][:3]
    template = goods[0]
    refs = list(template.ref_paths)
    query_rgb = load_image(template.query_path)
    good_rows = [_row(it.item_id, it.query_path, it.ref_paths, it.label) for it in goods]

    handled = {f"fmt_{name}": path for name, path in _variants(query_rgb, data / "formats").items()}
    resized = [_save(Image.fromarray(load_image(r)).resize(size), data / "resized" / f"ref{k}.png")
               for k, (r, size) in enumerate(zip(refs, [(300, 200), (128, 128), (256, 190), (512, 512)]))]
    good_png = _save(Image.fromarray(query_rgb), data / "q.png")
    good_jpg = _save(Image.fromarray(query_rgb), data / "q.jpg", quality=90)
    broken = _broken(good_png, good_jpg, data / "broken")

    rows = list(good_rows)
    rows += [_row(name, path, refs) for name, path in handled.items()]
    rows.append(_row("refs_of_other_sizes", good_png, resized))
    rows += [_row(f"bad_{name}", path, refs) for name, (path, _) in broken.items()]
    rows.append(_row("bad_reference", good_png, [refs[0], broken["truncated_png"][0]]))
    rows.append(_row("no_references", good_png, []))
    rows.append(_row("escapes_data_root", "{DATA_ROOT}/../outside.png", refs))
    rows.append(_row(goods[1].item_id, good_png, refs))  # a duplicate id: the first one wins
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps(rows))

    contents, summary = await _run(manifest, tmp_path / "run", data)
    records = _by_id(tmp_path / "run")
    expected_ids = {r["item_id"] for r in rows}
    assert set(records) == expected_ids
    assert any("duplicate" in m for _, f, m in contents.problems if f == "item_id")
    assert summary.fatal is None and summary.n_errors == len(broken) + 3

    for name in [*handled, "refs_of_other_sizes"]:
        rec = records[name]
        assert rec.error is None and 0.0 <= rec.anomaly_score <= 1.0, (name, rec.error)
    for name, (path, phrase) in broken.items():
        error = records[f"bad_{name}"].error
        assert error.startswith("image: ") and str(path) in error and phrase in error, (name, error)
    assert str(broken["truncated_png"][0]) in records["bad_reference"].error
    assert "ref_paths" in records["no_references"].error and "empty" in records["no_references"].error
    assert "escapes ANOMALYCLAW_DATA" in records["escapes_data_root"].error

    # The good items score exactly as they do in a run without the bad ones.
    clean = tmp_path / "clean.json"
    clean.write_text(json.dumps(good_rows))
    await _run(clean, tmp_path / "clean_run", data)
    alone = _by_id(tmp_path / "clean_run")
    for it in goods:
        mixed, solo = records[it.item_id], alone[it.item_id]
        assert mixed.error is None
        assert (mixed.anomaly_score, mixed.direct_score, mixed.refute_score) == \
            (solo.anomaly_score, solo.direct_score, solo.refute_score)
        assert mixed.tools_used == solo.tools_used


async def test_runner_api_guards_duplicates_and_reference_free_items(small_items, tmp_path):
    from dataclasses import replace

    item = small_items[0]
    items = [item, replace(item, query_path=item.ref_paths[0]), replace(item, item_id="no_refs", ref_paths=())]
    summary = await Runner(make_vlm("offline"), out_dir=tmp_path, progress=False).run(items)
    records = _by_id(tmp_path)
    assert set(records) == {item.item_id, "no_refs"} and summary.n_duplicates == 1
    assert records[item.item_id].error is None
    assert "no reference images" in records["no_refs"].error


async def test_item_ids_cannot_steer_saved_images_out_of_the_run_folder(small_items, tmp_path):
    from dataclasses import replace

    from anomalyclaw.config import AgentConfig, EndpointConfig
    from anomalyclaw.graph.vlm.fake_server import FakeVLMServer

    item = replace(small_items[0], item_id="../../outside")
    out = tmp_path / "deep" / "run"
    with FakeVLMServer() as server:  # its replies call side_by_side_compare, which returns an image
        vlm = make_vlm("openai", EndpointConfig(base_url=server.base_url, model="fake-vlm"))
        await Runner(vlm, out_dir=out, progress=False, save_images=True,
                     config=AgentConfig(expert_score=False)).run([item])
    saved = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".png", ".jpg")]
    # Tool images under OUT/images, anomaly maps under OUT/maps: nothing anywhere else.
    assert saved and all((out / "images") in p.parents or (out / "maps") in p.parents for p in saved)
    assert any((out / "images") in p.parents for p in saved) and any((out / "maps") in p.parents for p in saved)
    assert _by_id(out)["../../outside"].error is None


async def test_saved_images_of_ids_that_slug_alike_stay_apart(small_items, tmp_path):
    """Issue 17 item 5: ``a/b`` and ``a_b``, ``x y`` and ``x?y``, ids equal in their first 120
    characters each get their own image folder; none overwrites another's evidence."""
    from dataclasses import replace

    from anomalyclaw.config import AgentConfig, EndpointConfig
    from anomalyclaw.graph.vlm.fake_server import FakeVLMServer

    ids = ["a/b", "a_b", "x y", "x?y", "k" * 120 + "1", "k" * 120 + "2"]
    items = [replace(small_items[k % 2], item_id=i) for k, i in enumerate(ids)]
    out = tmp_path / "run"
    with FakeVLMServer() as server:
        vlm = make_vlm("openai", EndpointConfig(base_url=server.base_url, model="fake-vlm"))
        await Runner(vlm, out_dir=out, progress=False, save_images=True,
                     config=AgentConfig(expert_score=False)).run(items)
    records = _by_id(out)
    listed = {i: [p for row in records[i].history for p in row.get("images", [])] for i in ids}
    folders = {i: {Path(p).parent for p in paths} for i, paths in listed.items()}
    assert all(len(f) == 1 for f in folders.values()), folders
    assert len({next(iter(f)) for f in folders.values()}) == len(ids)   # one folder per item
    every = [p for paths in listed.values() for p in paths]
    assert len(every) == len(set(every)) and all((out / p).is_file() for p in every)
    on_disk = [p for p in (out / "images").rglob("*") if p.is_file()]
    assert len(on_disk) == len(every)                                   # nothing overwritten
