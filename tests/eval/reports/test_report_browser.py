"""The report in a real headless Chromium (the distribution's package, driven by Playwright):
every image loads, and a script planted in any field (item ids, domain cards, model replies,
usage values, tool names, run settings) never runs and never becomes markup. Also: the page
renders without ANOMALYCLAW_DATA, with hostile item ids, and stays small."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from anomalyclaw.domains import DomainCard
from anomalyclaw.eval.data.manifests import load_manifest, write_manifest
from anomalyclaw.eval.reports.html import build_report
from anomalyclaw.eval.running.records import RECORDS_FILE, load_records, write_records
from anomalyclaw.eval.running.runner import Runner
from anomalyclaw.graph.vlm import make_vlm

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
MARK = "document.documentElement.setAttribute('data-pwned', '1')"
PAYLOAD = (f"<script>{MARK}</script><img src=x onerror=\"{MARK}\"><svg onload=\"{MARK}\"></svg>"
           f"\"'><b onmouseover=\"{MARK}\">x</b>")
IDS = ["S2 " + PAYLOAD, "../../a/b\nc" + PAYLOAD, "z" * 10_000, "plain"]


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.skip(f"Chromium is not installed at {CHROMIUM} (Debian: apt-get install -y chromium); "
                    "the report's browser checks need a real browser")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the Python package playwright is not installed")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        yield b
        b.close()


def _open(browser, page_path: Path):
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # Only the page itself and its files: nothing may leave the machine.
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(("file:", "data:"))
               else route.abort())
    page.goto(page_path.as_uri(), wait_until="load")
    return page, errors


def _check_page(browser, page_path: Path, *, payload_expected: bool) -> dict:
    page, errors = _open(browser, page_path)
    images = page.evaluate("() => [...document.images].map(i => ({src: (i.getAttribute('src') || '').slice(0, 80),"
                           " ok: i.complete && i.naturalWidth > 0}))")
    assert images and all(i["ok"] for i in images), [i for i in images if not i["ok"]]
    # Reference thumbnails are embedded once each, in the style sheet, and shown by class.
    shared = page.evaluate("""async () => {
        const els = [...document.querySelectorAll('.shared')];
        const urls = els.map(e => getComputedStyle(e).backgroundImage);
        const loaded = await Promise.all([...new Set(urls)].map(u => new Promise(done => {
            const im = new Image(); im.onload = () => done(im.naturalWidth > 0); im.onerror = () => done(false);
            im.src = u.slice(5, -2); })));
        return {n: els.length, none: urls.filter(u => !u.startsWith('url(')).length, ok: loaded.every(x => x),
                distinct: loaded.length};
    }""")
    assert shared["none"] == 0 and shared["ok"], shared
    assert page.evaluate("() => document.documentElement.getAttribute('data-pwned')") is None
    assert page.evaluate("() => document.querySelectorAll('script').length") == 0
    handlers = page.evaluate("() => [...document.querySelectorAll('*')].flatMap(e => [...e.attributes]"
                             ".filter(a => a.name.startsWith('on')).map(a => e.tagName + ' ' + a.name))")
    assert handlers == []
    text = page.evaluate("() => document.body.textContent")   # closed <details> too
    if payload_expected:
        assert "<script>document.documentElement" in text      # shown as text, not run
    page.close()
    assert errors == []
    return {"images": len(images), "shared": shared, "text": text}


@pytest.fixture(scope="module")
def hostile_run(small_items, tmp_path_factory):
    """An offline run (tool images, maps) of S2/S6 items under hostile ids and a hostile domain
    card, then a payload planted in every other field the report shows."""
    root = tmp_path_factory.mktemp("browser")
    base = [it for it in small_items if it.domain_code in ("S2", "S6")]
    card = DomainCard("S2", "coins " + PAYLOAD, normal="normal " + PAYLOAD, anomaly="defects " + PAYLOAD,
                      traits=frozenset({"object", "aligned", "counting"}))
    items = [dataclasses.replace(base[k], item_id=rid, category="cat " + PAYLOAD, anomaly_type=PAYLOAD,
                                 card=card if k == 0 else base[k].card) for k, rid in enumerate(IDS)]
    manifest = write_manifest(items, root / "data" / "manifest.json")
    run = root / "run"
    runner = Runner(make_vlm("offline"), out_dir=run, save_images=True, progress=False)
    # In a thread of its own: Playwright's sync API may already hold this thread's event loop.
    with ThreadPoolExecutor(1) as pool:
        summary = pool.submit(asyncio.run, runner.run(load_manifest(manifest))).result()
    assert summary.n_errors == 0
    records = load_records(run)
    for r in records:
        r.rationale = PAYLOAD
        r.fallbacks.append(PAYLOAD)
        r.error = None
        r.direct_error = PAYLOAD
        r.direct_rationale = json.dumps({"image_label": PAYLOAD, "confidence": 0.9, "evidence": PAYLOAD,
                                         "anomaly_type": PAYLOAD, "bbox": [0.1, 0.1, 0.3, 0.3]})
        r.usage.update(requests=PAYLOAD, prompt_tokens=PAYLOAD, images_sent=PAYLOAD)
        r.timings[PAYLOAD] = PAYLOAD
        r.tools_used.append(PAYLOAD)
        r.domain_code = "S2" if r.domain_code == "S2" else PAYLOAD
        r.history.append({"turn": 9, "stage": PAYLOAD, "tool": PAYLOAD, "args": {PAYLOAD: PAYLOAD},
                          "candidate": PAYLOAD, "observation": PAYLOAD, "obs_error": PAYLOAD, "obs_ok": False,
                          "obs_data": {PAYLOAD: PAYLOAD}, "rationale": PAYLOAD, "reply": PAYLOAD,
                          "candidates": [{"id": PAYLOAD, "description": PAYLOAD, "bbox": [0.1, 0.1, 0.2, 0.2],
                                          "status": PAYLOAD}],
                          "verdicts": [{"id": PAYLOAD, "status": PAYLOAD, "evidence": PAYLOAD}],
                          "action": {"tool": PAYLOAD, "args": {"x": PAYLOAD}, "candidate": PAYLOAD},
                          "images": [PAYLOAD], PAYLOAD: PAYLOAD})
        r.remaining_features.append({"id": PAYLOAD, "description": PAYLOAD, "bbox": [0.5, 0.5, 0.7, 0.7],
                                     "status": "open"})
        if r.localization:
            r.localization["boxes"].append({"bbox": [0.2, 0.2, 0.4, 0.4], "score": 0.5, "candidate": PAYLOAD,
                                            "tool": PAYLOAD})
            r.localization["refuted"].append({"bbox": [0.6, 0.6, 0.8, 0.8], "candidate": PAYLOAD, "tool": PAYLOAD})
    (run / RECORDS_FILE).unlink()
    write_records(records, run)
    info = next(run.glob("run_*.json"))
    data = json.loads(info.read_text())
    data.update(prompts=PAYLOAD, tools=[PAYLOAD], run_id=PAYLOAD, config={PAYLOAD: PAYLOAD})
    info.write_text(json.dumps(data))
    return run, manifest


def test_planted_scripts_never_run_and_every_image_loads(browser, hostile_run, tmp_path):
    run, manifest = hostile_run
    page = build_report(run, manifest=manifest)
    result = _check_page(browser, page, payload_expected=True)
    n_items = len(IDS)
    # Each item: its query with the map; the tool images; the plots; and its references, each
    # distinct file embedded once however many items show it.
    assert result["images"] >= n_items + 2
    n_refs = sum(len(it.ref_paths) for it in load_manifest(manifest))
    distinct = {p for it in load_manifest(manifest) for p in it.ref_paths}
    assert result["shared"]["n"] == n_refs and result["shared"]["distinct"] == len(distinct) < n_refs
    # The check is not masked by the page's Content-Security-Policy: without it nothing runs either.
    raw = page.read_text(encoding="utf-8")
    assert raw.count("Content-Security-Policy") == 1
    unguarded = tmp_path / "no_csp.html"
    unguarded.write_text("\n".join(line for line in raw.splitlines() if "Content-Security-Policy" not in line),
                         encoding="utf-8")
    shutil.copytree(run / "images", tmp_path / "images")
    _check_page(browser, unguarded, payload_expected=True)


def test_hostile_ids_get_distinct_anchors_and_links_that_work(browser, hostile_run):
    run, manifest = hostile_run
    page_path = build_report(run, manifest=manifest)
    page, _ = _open(browser, page_path)
    anchors = page.evaluate("() => [...document.querySelectorAll('details.item')].map(d => d.id)")
    assert len(anchors) == len(set(anchors)) == len(IDS) and all(len(a) < 100 for a in anchors)
    links = page.evaluate("() => [...document.querySelectorAll('a[href^=\"#\"]')].map(a => a.getAttribute('href'))")
    assert sorted(link[1:] for link in links) == sorted(anchors)
    for link in links:   # every index link lands on its item
        assert page.evaluate(f"() => document.getElementById({json.dumps(link[1:])}) !== null")
    page.close()


def test_report_renders_without_the_data_root(browser, hostile_run, small_synth, tmp_path, monkeypatch):
    """A {DATA_ROOT} manifest with ANOMALYCLAW_DATA unset: the page renders, the missing images
    are marked, the maps and tool images still show."""
    run, manifest = hostile_run
    data_root = small_synth.parent          # where the images are
    portable = tmp_path / "portable.json"
    monkeypatch.setenv("ANOMALYCLAW_DATA", str(data_root))
    write_manifest(load_manifest(manifest), portable, relative_to=tmp_path / "elsewhere", data_root=data_root)
    assert "{DATA_ROOT}" in portable.read_text()
    monkeypatch.delenv("ANOMALYCLAW_DATA")
    page = build_report(run, tmp_path / "report.html", manifest=portable)
    text = _check_page(browser, page, payload_expected=True)["text"]
    assert "ANOMALYCLAW_DATA is not set" in text and "could not be read and are marked missing" in text
    assert "query image missing" in text and "agent's map alone" in text
    assert "{DATA_ROOT}/" in text and "anomalyclaw-no-data-root" not in text  # the manifest's own spelling
    # A data root that is not a folder (a typo) is the same case, said so, not a stopped report.
    monkeypatch.setenv("ANOMALYCLAW_DATA", str(tmp_path / "no-such-folder"))
    page = build_report(run, tmp_path / "report2.html", manifest=portable)
    text = _check_page(browser, page, payload_expected=True)["text"]
    assert f"ANOMALYCLAW_DATA is {tmp_path / 'no-such-folder'}, which is not a folder" in text
