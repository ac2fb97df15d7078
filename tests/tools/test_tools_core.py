"""The tool machinery: bbox validation, observations, applicability, context, registry, runs.

Items here are drawn in the test (a grey plate with six discs, 160 x 128 px), so these tests
need neither the synthetic benchmark nor any weights.
"""
from __future__ import annotations

import asyncio
import json
import math
import re

import cv2
import numpy as np
import pytest
from langchain_core.messages import ToolMessage
from langchain_core.tools import StructuredTool
from pydantic import BaseModel, Field

from anomalyclaw.domains import DomainCard
from anomalyclaw.imaging import decode_image, save_image
from anomalyclaw.items import Item
from anomalyclaw.tools import (CONTEXT_KEY, TOOL_NAMES, Applicability, ItemContext, Observation, ToolArgumentError,
                               ToolRegistry, run_tool_on_item)
from anomalyclaw.tools.factory import make_tool
from anomalyclaw.tools.observation import MAX_IMAGE_SIDE, ramp
from anomalyclaw.tools.regions import resolve_bbox
from anomalyclaw.cache import clear_caches
from anomalyclaw.tools.imageops import box_iou, register, tolerant_delta_e, to_lab

PLATE_CARD = DomainCard("T1", "disc plate", traits=frozenset({"object", "aligned", "counting"}))
TEXTURE_CARD = DomainCard("T2", "noise texture", traits=frozenset({"texture"}))


def plate(rng: np.random.Generator, *, shift=(0, 0), scratch: bool = False, missing: bool = False) -> np.ndarray:
    """A 160 x 128 grey plate with six bright discs; optional dark scratch or missing disc."""
    img = np.full((128, 160, 3), 70, np.uint8)
    for k, (x, y) in enumerate([(35, 40), (80, 40), (125, 40), (35, 90), (80, 90), (125, 90)]):
        if missing and k == 4:
            continue
        cv2.circle(img, (x + shift[0], y + shift[1]), 14, (200, 190, 170), -1)
    if scratch:
        cv2.line(img, (20, 62), (60, 70), (15, 15, 15), 3)
    noise = rng.normal(0, 2.0, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def make_item(tmp_path, name: str, *, label: int = 0, card: DomainCard = PLATE_CARD, n_refs: int = 4,
              seed: int = 0, **defect) -> Item:
    rng = np.random.default_rng(seed)
    folder = tmp_path / name
    folder.mkdir(parents=True, exist_ok=True)
    refs = []
    for r in range(n_refs):
        path = folder / f"ref{r}.png"
        save_image(plate(rng, shift=tuple(int(v) for v in rng.integers(-2, 3, 2))), path)
        refs.append(path)
    query = folder / "query.png"
    save_image(plate(rng, shift=(1, -1), **defect), query)
    return Item(item_id=name, query_path=query, ref_paths=tuple(refs), domain=card.name, domain_code=card.code,
                label=label, card=card)


@pytest.fixture(autouse=True)
def _fresh_caches():
    clear_caches()
    yield
    clear_caches()


@pytest.fixture
def registry() -> ToolRegistry:
    return ToolRegistry.default()


# ---------------------------------------------------------------------------------- bbox

@pytest.mark.parametrize("box", [[0.1, 0.2, 0.5, 0.6], (0.0, 0.0, 1.0, 1.0), np.array([0.25, 0.25, 0.75, 0.75])])
def test_resolve_bbox_accepts_normalized_boxes(box):
    region = resolve_bbox(box, (100, 200, 3))
    assert region.notes == ()
    x0, y0, x1, y1 = region.px
    assert (x0, y0) == (int(box[0] * 200), int(box[1] * 100)) and x1 > x0 and y1 > y0


def test_resolve_bbox_none_is_the_whole_image_unless_required():
    assert resolve_bbox(None, (50, 80)).whole
    with pytest.raises(ToolArgumentError, match="bbox is required"):
        resolve_bbox(None, (50, 80), required=True)


def test_resolve_bbox_clamps_slightly_outside_values_and_says_so():
    region = resolve_bbox([-0.1, 0.2, 1.2, 0.9], (100, 100))
    assert region.norm == (0.0, 0.2, 1.0, 0.9)
    assert "clamped" in region.notes[0]


def test_resolve_bbox_widens_tiny_boxes_to_the_minimum_size():
    region = resolve_bbox([0.5, 0.5, 0.501, 0.502], (200, 200))
    x0, y0, x1, y1 = region.px
    assert (x1 - x0, y1 - y0) == (8, 8) and "widened" in region.notes[0]
    corner = resolve_bbox([0.999, 0.999, 1.0, 1.0], (200, 200))
    assert corner.px == (192, 192, 200, 200)


@pytest.mark.parametrize("box, message", [
    ([0.6, 0.2, 0.4, 0.8], "x0 < x1"),
    ([0.1, 0.2, 0.3], "got"),
    ([0.1, float("nan"), 0.3, 0.4], "NaN"),
    ([0.1, 0.2, float("inf"), 0.4], "NaN or infinite"),
    ([100, 120, 180, 180], "pixel coordinates"),
    ([-3.0, 0.0, 0.5, 0.5], "far outside"),
    (["a", "b", "c", "d"], "non-numbers"),
    ("0.1,0.2,0.3,0.4", "got"),
    ([1.1, 1.2, 1.3, 1.4], "empty"),
])
def test_resolve_bbox_rejects_unusable_boxes_with_a_message(box, message):
    with pytest.raises(ToolArgumentError, match=message) as info:
        resolve_bbox(box, (100, 100))
    assert "[x0, y0, x1, y1]" in str(info.value)


def test_ramp_is_zero_below_one_above_and_linear_between():
    assert ramp(0.5, 1.0, 3.0) == 0.0 and ramp(3.5, 1.0, 3.0) == 1.0
    assert ramp(2.0, 1.0, 3.0) == pytest.approx(0.5)
    assert ramp(math.inf, 1.0, 3.0) == 1.0 and ramp(-math.inf, 1.0, 3.0) == 0.0


# ---------------------------------------------------------------------------- image ops

def test_register_recovers_a_known_shift():
    rng = np.random.default_rng(1)
    fixed = plate(rng)
    moving = np.roll(fixed, (3, -4), axis=(0, 1))  # content moved down 3, left 4
    reg = register(moving, fixed, motion="translation")
    assert reg.shift_px == pytest.approx((-4, 3), abs=0.6)
    residual = np.abs(reg.warped.astype(float) - fixed)[reg.valid].mean()
    assert residual < np.abs(moving.astype(float) - fixed).mean() / 2


def test_tolerant_difference_ignores_small_shifts_but_not_missing_parts():
    rng = np.random.default_rng(2)
    base = to_lab(plate(rng))
    shifted = to_lab(plate(rng, shift=(2, 1)))
    missing = to_lab(plate(rng, missing=True))
    assert tolerant_delta_e(base, shifted, 3).max() < 10
    assert tolerant_delta_e(base, missing, 3).max() > 40


def test_to_lab_maps_every_code_as_the_affine_map_of_opencvs_8_bit_lab():
    """The table lookup gives, for every 8-bit code, L = code * 100/255 and a, b = code - 128 in
    float32, the numbers the affine map of the codes gave; crops (non-contiguous views) too."""
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    image[:16, :, :] = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(6, axis=1)  # every value
    codes = cv2.cvtColor(image, cv2.COLOR_RGB2Lab)
    assert len(np.unique(codes[..., 0])) > 200  # many L codes are exercised
    expected = codes.astype(np.float32) * np.array([100.0 / 255.0, 1, 1], np.float32) - np.array([0, 128, 128],
                                                                                                   np.float32)
    lab = to_lab(image)
    assert lab.dtype == np.float32 and lab.shape == image.shape
    np.testing.assert_array_equal(lab, expected)
    np.testing.assert_array_equal(to_lab(image[5:40:2, 7:90:3]), expected[5:40:2, 7:90:3])


def test_delta_e_to_one_colour_is_the_difference_to_that_colour_everywhere():
    from anomalyclaw.tools.imageops import delta_e

    rng = np.random.default_rng(6)
    lab = to_lab(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    colour = np.array([52.3, -7.25, 18.5], np.float32)
    full = np.ascontiguousarray(np.broadcast_to(colour, lab.shape))
    for one in (colour[None, None, :], colour):
        np.testing.assert_array_equal(delta_e(lab, one), delta_e(lab, full))
    np.testing.assert_allclose(delta_e(lab, colour[None, None, :]),
                               np.sqrt(((lab.astype(np.float64) - colour) ** 2).sum(axis=2)), rtol=1e-5, atol=1e-4)
    crop = lab[3:30:2, 5:50:3]  # a view, not contiguous
    np.testing.assert_array_equal(delta_e(crop, colour[None, None, :]), delta_e(np.ascontiguousarray(crop), full[3:30:2, 5:50:3].copy()))


def test_box_iou():
    assert box_iou([0, 0, 1, 1], [0, 0, 1, 1]) == 1.0
    assert box_iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0
    assert box_iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)


# ------------------------------------------------------------------------ applicability

def test_applicability_checks_traits_reference_counts_and_suggests_an_alternative(tmp_path):
    plate_item = make_item(tmp_path, "plate")
    texture_item = make_item(tmp_path, "texture", card=TEXTURE_CARD)
    single = make_item(tmp_path, "single", n_refs=1)
    needs_aligned = Applicability(requires=frozenset({"aligned"}), instead="side_by_side_compare")
    assert needs_aligned.check(plate_item) == (True, "")
    ok, why = needs_aligned.check(texture_item)
    assert not ok and "aligned" in why and "T2" in why and "use side_by_side_compare" in why
    ok, why = Applicability(requires=frozenset({"references>=2"})).check(single)
    assert not ok and "at least 2 reference images" in why
    ok, why = Applicability(excludes=frozenset({"texture"})).check(texture_item)
    assert not ok and "texture" in why
    with pytest.raises(ValueError, match="unknown applicability words"):
        Applicability(requires=frozenset({"alligned"}))


# -------------------------------------------------------------------------------- context

def test_context_loads_lazily_at_work_size_and_caches(tmp_path):
    item = make_item(tmp_path, "ctx")
    ctx = ItemContext(item, work_side=96)
    assert ctx._query is None
    assert max(ctx.query.shape[:2]) == 96 and ctx.query.dtype == np.uint8
    assert ctx.query is ctx.query
    assert all(max(r.shape[:2]) == 96 for r in ctx.references)
    assert ctx.reference_aligned(2).shape == ctx.query.shape
    ranking = ctx.reference_ranking()
    assert sorted(i for i, _ in ranking) == [0, 1, 2, 3]
    assert ranking[0][1] >= ranking[-1][1] and ctx.closest_reference_index() == ranking[0][0]
    with pytest.raises(ValueError, match="work_side"):
        ItemContext(item, work_side=4)


def test_a_reference_rewritten_in_place_is_fitted_again_and_one_reading_serves_two_threads(tmp_path):
    import os
    from concurrent.futures import ThreadPoolExecutor

    from anomalyclaw.experts.pool import ExpertPool

    item = make_item(tmp_path, "rewritten")
    pool = ExpertPool("classic")
    ctx = ItemContext(item, work_side=96, expert_pool=pool)
    with ThreadPoolExecutor(2) as ex:  # the two branches asking at once: one reading
        first, again = ex.map(lambda _: ctx.expert_result("anomaly_vfm"), range(2))
    assert first is again and pool.stats["misses"] == 1
    ItemContext(item, work_side=96, expert_pool=pool).expert_result("anomaly_vfm")
    assert pool.stats["misses"] == 1  # same files: the fitted set is reused
    save_image(np.full((96, 96, 3), 255, np.uint8), item.ref_paths[0])  # another image, same path
    os.utime(item.ref_paths[0], ns=(1, 1))  # and a different mtime whatever the clock's resolution
    rewritten = ItemContext(item, work_side=96, expert_pool=pool)
    assert not np.array_equal(rewritten.reference(0), ctx.reference(0))
    rewritten.expert_result("anomaly_vfm")
    assert pool.stats["misses"] == 2  # the pool fitted the set again instead of serving stale features


def test_unreadable_query_becomes_a_failed_observation(tmp_path, registry):
    item = make_item(tmp_path, "broken")
    item.query_path.write_bytes(b"not an image")
    obs = registry.run("side_by_side_compare", {}, ItemContext(item))
    assert not obs.ok and "cannot load image" in obs.error and str(item.query_path) in obs.error


# ------------------------------------------------------------------------------- registry

def test_default_registry_has_the_13_tools_in_their_families(registry):
    assert registry.names() == list(TOOL_NAMES) and len(registry) == 13
    families = {d["name"]: d["family"] for d in registry.describe()}
    assert families["image_diff"] == "reference understanding"
    assert families["expert_heatmap"] == "frozen expert probes"
    assert families["fft_spectrum_viz"] == "structure / texture"
    assert families["region_zoom"] == "visual inspection"
    json.dumps(registry.describe())  # `anomalyclaw tools --json` needs it serialisable


def test_registries_do_not_share_tool_objects():
    a, b = ToolRegistry.default(), ToolRegistry.default()
    a.drop("image_diff")
    assert "image_diff" not in a and "image_diff" in b
    assert a.get("region_zoom") is not b.get("region_zoom")


def test_no_tool_schema_accepts_a_path(registry):
    """A model can never make a tool read a file: no argument names or describes one."""
    for entry in registry.describe():
        for arg, spec in entry["args_schema"].get("properties", {}).items():
            text = (arg + " " + json.dumps(spec)).lower().replace("_", " ")
            assert not re.search(r"\b(path|file|filename|dir|directory|folder|url|uri)s?\b", text), (entry["name"], arg)


@pytest.mark.parametrize("given, expected", [
    ("side_by_side_compare", "side_by_side_compare"),
    ("tool_side_by_side", "side_by_side_compare"),
    ("tool_zoom_bbox", "region_zoom"),
    ("tool_expert_score", "anomaly_vfm_score"),
    ("tool_reference_profiler", "reference_profile"),
    ("tool_segment_and_count", "segment_anomaly"),
    ("tool_reference_retriever", "reference_retriever"),
    ("Side-By-Side Compare", "side_by_side_compare"),
    ("IMAGE_DIFF", "image_diff"),
    ("image_dif", "image_diff"),
    ("fft_spectrum", "fft_spectrum_viz"),
    ("functions.region_zoom", "region_zoom"),
    ("texture_fft", "fft_spectrum_viz"),
    ("tool_texture_fft", "fft_spectrum_viz"),
])
def test_resolve_repairs_near_misses(registry, given, expected):
    name, message = registry.resolve(given)
    assert name == expected
    assert (message == "") == (given == expected)


@pytest.mark.parametrize("given", ["tool_domain_knowledge", "", None, 42, "zoom_in_and_compare_everything"])
def test_resolve_rejects_unknown_names_listing_the_valid_ones(registry, given):
    name, message = registry.resolve(given)
    assert name is None and "valid tools" in message and "side_by_side_compare" in message


#: Catalog names for the released trajectories' tool names that have a counterpart; the others
#: (``tool_domain_knowledge``, ``tool_patch_grid``) have none and must get the valid-names message.
RELEASED_COUNTERPARTS = {
    "tool_side_by_side": "side_by_side_compare", "tool_expert_score": "anomaly_vfm_score",
    "tool_reference_profiler": "reference_profile", "tool_segment_and_count": "segment_anomaly",
    "tool_zoom_bbox": "region_zoom", "tool_reference_retriever": "reference_retriever",
    "texture_fft": "fft_spectrum_viz", "tool_texture_fft": "fft_spectrum_viz",
}


def _released_tool_names(reference_dir) -> set[str]:
    names: set[str] = set()
    for path in sorted((reference_dir / "results" / "released_qwen35vl27b").glob("D*.json")):
        for row in json.loads(path.read_text(encoding="utf-8")):
            names.update(t for t in row.get("tools_used") or [] if isinstance(t, str))
            names.update(h["tool"] for h in row.get("history") or []
                         if isinstance(h, dict) and isinstance(h.get("tool"), str))
    return names


def test_every_tool_name_in_the_released_trajectories_resolves(reference_dir, registry, tmp_path):
    names = _released_tool_names(reference_dir)
    assert {"tool_side_by_side", "tool_expert_score", "tool_domain_knowledge"} <= names
    ctx = ItemContext(make_item(tmp_path, "released"))
    for given in sorted(names | {"texture_fft", "tool_texture_fft"}):
        name, message = registry.resolve(given)
        if given in RELEASED_COUNTERPARTS:
            assert name == RELEASED_COUNTERPARTS[given], given
        else:  # no counterpart in the catalog: the observation lists the valid names
            assert name is None, given
            obs = registry.run(given, {}, ctx)
            assert not obs.ok and "valid tools" in obs.error and "side_by_side_compare" in obs.error


def test_render_lists_only_applicable_tools_with_compact_args(tmp_path, registry):
    plate_text = registry.render(make_item(tmp_path, "plate"))
    texture_text = registry.render(make_item(tmp_path, "tex", card=TEXTURE_CARD))
    assert "image_diff" in plate_text and "blob_layout_viz" in plate_text
    assert "fft_spectrum_viz" not in plate_text
    assert "image_diff" not in texture_text and "fft_spectrum_viz" in texture_text
    line = next(l for l in plate_text.splitlines() if l.startswith("- region_zoom:"))
    args = json.loads(line.split(" args ", 1)[1])
    assert set(args) == {"bbox", "scale"} and "required" in args["bbox"]
    assert len(registry.render().splitlines()) == 13


class _EchoArgs(BaseModel):
    word: str = Field("hi", description="a word to echo")


def _echo(ctx, args):
    return Observation("echo", text=f"{args.word} from {ctx.item.item_id}", data={"evidence": 0.0})


def test_custom_tools_can_be_added_dropped_and_run(tmp_path, registry):
    tool = make_tool("echo", "Echo a word.", _EchoArgs, _echo, family="custom", specialty="echo a word")
    registry.add(tool, family="custom", specialty="echo a word",
                 applicability=Applicability(requires=frozenset({"texture"})))
    assert "echo" in registry and registry.names()[-1] == "echo"
    texture_item = make_item(tmp_path, "tex", card=TEXTURE_CARD)
    assert registry.run("echo", {"word": "yo"}, ItemContext(texture_item)).text == "yo from tex"
    assert "echo" not in registry.render(make_item(tmp_path, "plate"))
    blocked = registry.run("echo", {}, ItemContext(make_item(tmp_path, "plate")))
    assert not blocked.ok and not blocked.applicable and "texture" in blocked.text
    # What the prompt shows of a tool's arguments follows the tool registered under its name now.
    registry.compact_args("echo")["word"] = "scribbled on"  # a copy: the registry's stays
    assert registry.compact_args("echo")["word"].endswith("a word to echo")

    class _LoudArgs(BaseModel):
        word: str = Field("HI", description="a word to shout")

    registry.add(make_tool("echo", "Shout a word.", _LoudArgs, _echo, family="custom", specialty="shout"),
                 family="custom", specialty="shout")
    assert registry.compact_args("echo")["word"].endswith("a word to shout")
    registry.drop("echo")
    assert "echo" not in registry
    with pytest.raises(KeyError, match="no tool 'echo'"):
        registry.drop("echo")


def test_a_plain_langchain_tool_can_join_the_registry(tmp_path, registry):
    plain = StructuredTool.from_function(lambda word: f"said {word}", name="say", description="Say a word.")
    registry.add(plain, family="custom", specialty="say a word")
    obs = registry.run("say", {"word": "x"}, ItemContext(make_item(tmp_path, "p")))
    assert obs.ok and obs.text == "said x"


def test_run_never_raises_on_bad_calls(tmp_path, registry):
    ctx = ItemContext(make_item(tmp_path, "bad"))
    unknown = registry.run("tool_domain_knowledge", {"question": "?"}, ctx)
    assert not unknown.ok and "valid tools" in unknown.error
    not_dict = registry.run("region_zoom", [0.1, 0.2, 0.3, 0.4], ctx)
    assert not not_dict.ok and "JSON object" in not_dict.error
    wrong_type = registry.run("side_by_side_compare", {"n_refs": "many"}, ctx)
    assert not wrong_type.ok and "n_refs" in wrong_type.error and "Accepted arguments" in wrong_type.error
    missing = registry.run("region_zoom", {}, ctx)
    assert not missing.ok and "bbox" in missing.error
    path_arg = registry.run("side_by_side_compare", {"path": "/etc/passwd"}, ctx)
    assert path_arg.ok and "ignored unknown argument(s) ['path']" in path_arg.text


def test_repaired_name_runs_and_says_so(tmp_path, registry):
    obs = registry.run("tool_side_by_side", {"bbox": [0.1, 0.3, 0.45, 0.6]}, ItemContext(make_item(tmp_path, "r")))
    assert obs.ok and obs.tool == "side_by_side_compare"
    assert "repaired to 'side_by_side_compare'" in obs.text


def test_arun_matches_run(tmp_path, registry):
    item = make_item(tmp_path, "async", label=1, scratch=True)
    obs = asyncio.run(registry.arun("image_diff", {}, ItemContext(item)))
    assert obs.ok and obs.data["found"]
    failed = asyncio.run(registry.arun("no_such_tool", {}, ItemContext(item)))
    assert not failed.ok


def test_tools_take_the_item_only_from_the_config(tmp_path, registry):
    tool = registry.get("side_by_side_compare")
    call = {"name": tool.name, "args": {"bbox": [0.1, 0.3, 0.45, 0.6]}, "id": "c1", "type": "tool_call"}
    message = tool.invoke(call, config={"configurable": {CONTEXT_KEY: ItemContext(make_item(tmp_path, "cfg"))}})
    assert isinstance(message, ToolMessage) and isinstance(message.artifact, Observation)
    assert message.content == message.artifact.text and message.artifact.ok
    orphan = tool.invoke(call)  # no context: a clear failure, not an exception
    assert not orphan.artifact.ok and CONTEXT_KEY in orphan.artifact.error
    plain = tool.invoke({"bbox": "nonsense"}, config={"configurable": {CONTEXT_KEY: ItemContext(make_item(tmp_path, "c2"))}})
    assert isinstance(plain, str) and plain.startswith("No tool was run: invalid arguments for side_by_side_compare")


def test_every_call_returns_one_observation_and_rejections_say_why(tmp_path, registry):
    ctx = ItemContext(make_item(tmp_path, "trace"))
    calls = [("reference_profile", {}), ("region_zoom", {"bbox": [0.2, 0.2, 0.4, 0.4]}), ("region_zoom", {}),
             ("tool_no_such_thing", {}), ("fft_spectrum_viz", {})]
    observations = [registry.run(name, args, ctx) for name, args in calls]
    assert [o.tool for o in observations] == ["reference_profile", "region_zoom", "region_zoom",
                                              "tool_no_such_thing", "fft_spectrum_viz"]
    assert [o.ok for o in observations] == [True, True, False, False, False]
    unknown, not_applicable = observations[3], observations[4]
    assert unknown.text.startswith("No tool was run: unknown tool 'tool_no_such_thing'")
    assert not not_applicable.applicable
    assert not_applicable.text.startswith("No tool was run: fft_spectrum_viz does not apply to this item")
    assert "Tools that apply: " in not_applicable.text


def test_the_guard_runs_once_per_call(tmp_path, registry, monkeypatch):
    """The registry checks a call; the tool it hands the checked call to does not check again."""
    from anomalyclaw.tools import factory, registry as registry_module

    counted = []
    real = factory.check_arguments

    def counting(*args, **kwargs):
        counted.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(factory, "check_arguments", counting)
    monkeypatch.setattr(registry_module, "check_arguments", counting)
    obs = registry.run("region_zoom", {"bbox": [0.2, 0.2, 0.4, 0.4]}, ItemContext(make_item(tmp_path, "once")))
    assert obs.ok and counted == ["region_zoom"]


# ---------------------------------------------------------------------------- observations

def test_observations_are_json_serialisable_with_bounded_images(tmp_path, registry):
    ctx = ItemContext(make_item(tmp_path, "json", label=1, scratch=True))
    for name in registry.names():
        args = {"bbox": [0.1, 0.4, 0.4, 0.6]} if name == "region_zoom" else {}
        obs = registry.run(name, args, ctx)
        record = json.loads(json.dumps(obs.to_json(with_images=True)))
        assert record["tool"] == name and isinstance(record["elapsed_s"], float)
        assert len(obs.text) <= 1200
        assert len(obs.images) <= 3
        for image in obs.images:
            assert image.data[:3] == b"\xff\xd8\xff" or image.data[:8] == b"\x89PNG\r\n\x1a\n"
            assert max(decode_image(image.data).shape[:2]) <= MAX_IMAGE_SIDE
        if obs.applicable and obs.ok and obs.data.get("evidence") is not None:
            assert 0.0 <= obs.data["evidence"] <= 1.0


def test_scratch_is_found_by_the_aligned_tools(tmp_path, registry):
    normal = ItemContext(make_item(tmp_path, "n", seed=3))
    scratched = ItemContext(make_item(tmp_path, "s", label=1, seed=3, scratch=True))
    truth = [20 / 160, 58 / 128, 62 / 160, 74 / 128]
    for name in ("image_diff", "segment_anomaly", "change_heatmap_viz"):
        clean, found = registry.run(name, {}, normal), registry.run(name, {}, scratched)
        assert clean.data["evidence"] < 0.3, (name, clean.text)
        assert found.data["evidence"] > 0.7 and box_iou(found.data["bbox"], truth) > 0.3, (name, found.text)
    bbox = {"bbox": [0.1, 0.4, 0.42, 0.62]}
    assert registry.run("side_by_side_compare", bbox, scratched).data["evidence"] > \
        registry.run("side_by_side_compare", bbox, normal).data["evidence"]


def test_missing_part_is_counted_by_blob_layout(tmp_path, registry):
    normal = registry.run("blob_layout_viz", {}, ItemContext(make_item(tmp_path, "n", seed=4)))
    missing = registry.run("blob_layout_viz", {}, ItemContext(make_item(tmp_path, "m", label=1, seed=4, missing=True)))
    assert normal.data["count"] == 6 and normal.data["evidence"] < 0.3
    assert missing.data["count"] == 5 and missing.data["missing"] == 1 and missing.data["evidence"] > 0.8
    assert box_iou(missing.data["bbox"], [66 / 160, 76 / 128, 95 / 160, 105 / 128]) > 0.5


def test_run_tool_on_item_writes_images_and_the_observation(tmp_path):
    item = make_item(tmp_path, "cli", label=1, scratch=True)
    out = tmp_path / "out"
    obs = run_tool_on_item("image_diff", item, {}, out_dir=out)
    assert obs.ok
    record = json.loads((out / "cli_image_diff.json").read_text())
    assert record["image_files"] and all((out / p.split("/")[-1]).is_file() for p in record["image_files"])
    failed = run_tool_on_item("nope", item, {}, out_dir=out)
    assert not failed.ok


def test_blur_in_place_overwrites_its_input_with_the_same_numbers():
    from anomalyclaw.tools.imageops import blur

    lab = to_lab(np.random.default_rng(7).integers(0, 256, (48, 80, 3), dtype=np.uint8))
    expected = blur(lab, 1.0)
    assert not np.shares_memory(expected, lab)
    for sigma in (1.0, 3.0):
        work = lab.copy()
        out = blur(work, sigma, in_place=True)
        assert out is work
        np.testing.assert_array_equal(out, blur(lab, sigma))
    wide = lab.copy()
    np.testing.assert_array_equal(blur(wide, 12.0, in_place=True), blur(lab, 12.0))  # wide blurs: a new array
