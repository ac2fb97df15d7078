"""The synthetic benchmark: counts, masks, references, cards, determinism, speed."""
from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from anomalyclaw.domains import TRAITS, DomainCard
from anomalyclaw.errors import ConfigError
from anomalyclaw.eval.data.manifests import load_manifest
from anomalyclaw.cli import main
from anomalyclaw.eval.data.synth import DEFECT_FAMILIES, DOMAINS, N_REFERENCES, generate_benchmark
from anomalyclaw.imaging import load_image, load_mask

SPLIT_SIZES = {"calibration": 8, "dev": 8, "test": 24}


@pytest.fixture(scope="module")
def default_benchmark(tmp_path_factory):
    """The benchmark at default settings, generated once for this module, with the CPU time it
    took (all threads; unlike wall time, it does not grow when other jobs load the machine)."""
    out = tmp_path_factory.mktemp("synth_default")
    started = time.process_time()
    manifest = generate_benchmark(out, seed=0)
    return manifest, time.process_time() - started


def test_default_benchmark_is_generated_in_under_30_seconds(default_benchmark):
    """Under 30 s of CPU time means under 30 s of wall time even on one free core."""
    manifest, cpu_seconds = default_benchmark
    assert manifest.name == "manifest.json" and manifest.is_file()
    assert cpu_seconds < 30, f"generating the default benchmark took {cpu_seconds:.1f} s of CPU time"


def test_every_domain_has_each_split_half_anomalous(default_benchmark):
    items = load_manifest(default_benchmark[0])
    assert {i.domain_code for i in items} == set(DOMAINS)
    assert len(DOMAINS) >= 6
    counts = Counter((i.domain_code, i.split, i.label) for i in items)
    for code in DOMAINS:
        for split, n in SPLIT_SIZES.items():
            assert counts[(code, split, 1)] == n // 2, (code, split)
            assert counts[(code, split, 0)] == n - n // 2, (code, split)
    assert len({i.item_id for i in items}) == len(items)


def test_items_carry_names_categories_and_source(default_benchmark):
    for item in load_manifest(default_benchmark[0]):
        dom = DOMAINS[item.domain_code]
        assert item.domain == dom.name and item.category == dom.category
        assert item.source_dataset == "synthetic (scikit-image)"
        assert item.query_path.is_file()
        if item.label == 1:
            assert item.anomaly_type in dom.anomaly_types
            assert item.extra["defect_family"] == DEFECT_FAMILIES[item.anomaly_type]
            assert 0.0 <= item.extra["defect_severity"] <= 1.0
        else:
            assert item.anomaly_type is None and item.mask_path is None


def test_at_least_four_defect_families_with_both_kinds_of_anomaly(default_benchmark):
    items = [i for i in load_manifest(default_benchmark[0]) if i.label == 1]
    families = {DEFECT_FAMILIES[i.anomaly_type] for i in items}
    assert {"crack_or_scratch", "stain_or_colour", "missing_or_extra_part", "deformation_or_texture"} <= families
    # Every domain seeds more than one kind of defect.
    for code in DOMAINS:
        assert len({i.anomaly_type for i in items if i.domain_code == code}) >= 2, code


def test_anomalous_items_have_a_non_empty_binary_mask_of_the_query_size(default_benchmark):
    for item in load_manifest(default_benchmark[0]):
        if item.label == 0:
            continue
        assert item.mask_path is not None and item.mask_path.is_file(), item.item_id
        raw = cv2.imread(str(item.mask_path), cv2.IMREAD_UNCHANGED)
        assert raw.dtype == np.uint8 and raw.ndim == 2
        assert set(np.unique(raw)) <= {0, 255}
        assert raw.shape == load_image(item.query_path).shape[:2]
        area = (raw == 255).mean()
        assert 0 < area < 0.35, (item.item_id, area)


def test_references_come_from_a_pool_that_is_never_a_query(default_benchmark):
    items = load_manifest(default_benchmark[0])
    queries = {i.query_path for i in items}
    for item in items:
        assert not set(item.ref_paths) & queries
        assert all(p.is_file() for p in item.ref_paths)
        if DOMAINS[item.domain_code].bi_temporal:
            assert len(item.ref_paths) == 1 and item.ref_paths[0].name == f"{item.item_id}_before.png"
        else:
            assert len(set(item.ref_paths)) == N_REFERENCES
            assert all(p.parent.name == "references" for p in item.ref_paths)


def test_domain_cards_parse_and_carry_the_right_traits(default_benchmark):
    raw = json.loads(default_benchmark[0].read_text())
    expected = {"texture_surface": {"texture"}, "coin_count": {"aligned", "counting", "object"},
                "ct_phantom": {"medical"}, "retina_fundus": {"medical"}, "histology_ihc": {"medical", "texture"},
                "aerial_change": {"aerial", "bi_temporal", "aligned"}, "rotating_nut": {"object", "rotating"}}
    for row in raw:
        card = DomainCard.from_json(row["domain_card"])
        assert card.code == row["domain_code"]
        assert set(card.traits) == expected[row["domain"]]
        assert set(card.traits) <= set(TRAITS)
        assert card.reference_type == ("bi_temporal" if "bi_temporal" in card.traits else "few_shot")
    items = load_manifest(default_benchmark[0])
    assert all(i.traits == frozenset(expected[i.domain]) for i in items)


def test_pixel_difference_to_the_closest_reference_finds_the_defect_in_aligned_domains(default_benchmark):
    """In aligned domains the strongest (blurred) difference to the closest reference lies on
    the defect for most anomalous items, though normal variation keeps it from being trivial."""
    items = [i for i in load_manifest(default_benchmark[0]) if i.label == 1 and "aligned" in i.traits]
    assert items
    hits = Counter()
    for item in items:
        query = load_image(item.query_path).astype(np.float32)
        diffs = [cv2.GaussianBlur(np.abs(query - load_image(r).astype(np.float32)).mean(axis=2), (0, 0), 2)
                 for r in item.ref_paths]
        closest = min(diffs, key=lambda d: float(d.mean()))
        mask = cv2.dilate(load_mask(item.mask_path).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        hits[item.domain_code, bool(mask[np.unravel_index(np.argmax(closest), closest.shape)])] += 1
    for code in {i.domain_code for i in items}:
        rate = hits[code, True] / (hits[code, True] + hits[code, False])
        assert rate >= 0.7, (code, rate)


def test_sources_are_pictures_scikit_image_ships():
    from skimage import data

    for dom in DOMAINS.values():
        assert dom.sources
        for name in dom.sources:
            # These load from the scikit-image package itself; cells3d, brain... would download.
            assert name not in {"cells3d", "human_mitosis", "kidney", "brain", "skin", "eagle", "lily"}
            assert getattr(data, name)().size > 0


@pytest.mark.parametrize("code", sorted(DOMAINS))
def test_mask_covers_exactly_what_the_defect_changed(code):
    """Against the same scene without the defect, the image changes inside the mask (clearly)
    and nowhere else: beyond a 3 px margin for blur, no change above 4 grey levels (rounding)."""
    dom = DOMAINS[code]
    for seed in range(3):
        sample = dom.sample(np.random.default_rng([99, seed]), 128, True)
        assert sample.anomaly_type in dom.anomaly_types
        assert sample.mask.dtype == bool and sample.mask.shape == (128, 128) and sample.mask.any()
        change = np.abs(sample.image.astype(np.int16) - sample.clean.astype(np.int16)).max(axis=2)
        margin = cv2.dilate(sample.mask.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
        assert np.percentile(change[sample.mask], 90) >= 6, (code, seed)
        outside = change[~margin]
        assert outside[outside > 4].sum() <= 0.05 * change.sum(), (code, seed)
        assert (sample.reference is not None) == dom.bi_temporal


@pytest.mark.parametrize("code", sorted(DOMAINS))
def test_normal_samples_vary_and_have_no_defect(code):
    dom = DOMAINS[code]
    a = dom.sample(np.random.default_rng([5, 0]), 96, False)
    b = dom.sample(np.random.default_rng([5, 1]), 96, False)
    assert a.mask is None and a.anomaly_type is None and np.array_equal(a.image, a.clean)
    assert a.image.shape == (96, 96, 3) and a.image.dtype == np.uint8
    # Two normal images of a domain are never pixel-identical: normal varies.
    assert np.abs(a.image.astype(int) - b.image.astype(int)).mean() > 1.0


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_output_and_a_new_seed_does_not(tmp_path):
    small = dict(size=96, n_test_per_domain=4, n_calibration=2, n_dev=0)
    generate_benchmark(tmp_path / "a", seed=3, workers=2, **small)
    generate_benchmark(tmp_path / "b", seed=3, workers=1, **small)
    generate_benchmark(tmp_path / "c", seed=4, **small)
    a, b, c = (_tree_bytes(tmp_path / name) for name in "abc")
    assert a == b
    assert a["manifest.json"] != c["manifest.json"]
    queries = [name for name in a if "/queries/" in name]
    assert queries and all(a[name] != c[name] for name in queries)


def test_a_domain_subset_reproduces_the_same_files(tmp_path):
    small = dict(size=96, n_test_per_domain=4, n_calibration=2, n_dev=2)
    generate_benchmark(tmp_path / "all", seed=1, **small)
    manifest = generate_benchmark(tmp_path / "two", seed=1, domains=["coin_count", "S6"], **small)
    items = load_manifest(manifest)
    assert {i.domain_code for i in items} == {"S2", "S6"}
    full, part = _tree_bytes(tmp_path / "all"), _tree_bytes(tmp_path / "two")
    assert all(full[name] == data for name, data in part.items() if name != "manifest.json")


def test_the_folder_can_be_moved(tmp_path):
    generate_benchmark(tmp_path / "here", seed=0, size=64, n_test_per_domain=2, n_calibration=0, n_dev=0,
                       domains=["S1", "S6"])
    shutil.move(str(tmp_path / "here"), str(tmp_path / "there"))
    raw = json.loads((tmp_path / "there" / "manifest.json").read_text())
    assert not any(Path(row["query_path"]).is_absolute() for row in raw)
    for item in load_manifest(tmp_path / "there"):
        assert item.query_path.is_file() and all(p.is_file() for p in item.ref_paths)
        assert tmp_path / "there" in item.query_path.parents


@pytest.mark.parametrize("kwargs, named", [
    (dict(size=32), "size"), (dict(size=256.0), "size"), (dict(n_dev=-1), "dev"),
    (dict(n_test_per_domain=1), "n_test_per_domain"), (dict(domains=["S1", "marble"]), "marble"),
    (dict(domains=[]), "domains"), (dict(seed=-2), "seed"), (dict(workers=0), "workers"),
])
def test_bad_arguments_raise_a_config_error_naming_the_value(tmp_path, kwargs, named):
    with pytest.raises(ConfigError, match=named):
        generate_benchmark(tmp_path, **kwargs)
    assert not (tmp_path / "manifest.json").exists()


def test_command_line(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "cli"), "--size", "64", "--n-test", "2", "--n-calibration", "0",
                 "--n-dev", "0", "--domains", "S3,retina_fundus"]) == 0
    assert "manifest.json" in capsys.readouterr().out
    assert {i.domain_code for i in load_manifest(tmp_path / "cli")} == {"S3", "S4"}
    assert main(["synth", "--out", str(tmp_path / "bad"), "--domains", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
