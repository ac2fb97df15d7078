"""``anomalyclaw predict``: one image, or a folder of them, against references, no manifest."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from anomalyclaw.cli import main
from anomalyclaw.errors import EXIT_USAGE
from anomalyclaw.eval.running.predict import PredictInputError, domain_card, predict_items


@pytest.fixture(scope="module")
def coins(small_items):
    """The synthetic coin tray's anomalous query and its reference folder."""
    item = next(it for it in small_items if it.domain_code == "S2" and it.label == 1)
    return item, item.ref_paths[0].parent


def test_predict_one_synthetic_query_against_its_references(coins, tmp_path, capsys):
    item, refs = coins
    out = tmp_path / "pred"
    assert main(["predict", str(item.query_path), "--refs", str(refs), "--traits", "object,aligned,counting",
                 "--out", str(out), "--no-progress", "--json"]) == 0
    printed = capsys.readouterr().out
    text, last = printed.strip().rsplit("\n", 1)
    assert f"{item.query_path.name}: anomaly score " in text and " -> anomalous (threshold 0.5" in text
    assert "  verdict c1: confirmed" in text and "  box [" in text and "tool images (" in text
    (pred,) = json.loads(last)["predictions"]
    assert pred["query"] == str(item.query_path) and pred["label"] == "anomalous"
    assert 0.5 <= pred["anomaly_score"] <= 1.0 and pred["tools_used"] and pred["boxes"]
    assert pred["images"] and all(Path(p).is_file() for p in pred["images"])
    assert pred["maps"] and Path(pred["maps"][0]).is_file() and "  anomaly map: " in text
    # The seeded defect lies in one of the boxes the run produced.
    from anomalyclaw.imaging import load_image
    mask = load_image(item.mask_path)[..., 0] > 127
    h, w = mask.shape
    hit = any(mask[int(b["bbox"][1] * h):max(int(b["bbox"][3] * h), int(b["bbox"][1] * h) + 1),
                   int(b["bbox"][0] * w):max(int(b["bbox"][2] * w), int(b["bbox"][0] * w) + 1)].any()
              for b in pred["boxes"])
    assert hit, pred["boxes"]


def test_predict_a_folder_of_queries_and_again_in_the_same_folder(coins, small_items, tmp_path, capsys):
    _, refs = coins
    queries = tmp_path / "queries"
    queries.mkdir()
    for it in [i for i in small_items if i.domain_code == "S2"]:
        (queries / it.query_path.name).write_bytes(it.query_path.read_bytes())
    out = tmp_path / "pred"
    for _ in range(2):  # the second predict replaces the first one's records
        assert main(["predict", str(queries), "--refs", str(refs), "--out", str(out), "--no-progress",
                     "--json"]) == 0
        preds = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["predictions"]
        assert sorted(Path(p["query"]).name for p in preds) == sorted(f.name for f in queries.iterdir())
        assert len((out / "records.jsonl").read_text().splitlines()) == 2


def test_predict_never_replaces_a_runs_records(coins, small_synth, tmp_path, capsys):
    item, refs = coins
    run = tmp_path / "run"
    assert main(["run", "--manifest", str(small_synth), "--domains", "S1", "--out", str(run), "--no-progress"]) == 0
    before = (run / "records.jsonl").read_bytes()
    assert main(["predict", str(item.query_path), "--refs", str(refs), "--out", str(run), "--no-progress"]) == 2
    assert "holds the records of a run, which this would replace" in capsys.readouterr().err
    assert (run / "records.jsonl").read_bytes() == before


def test_predict_input_mistakes_are_one_line(coins, tmp_path, capsys):
    item, refs = coins
    assert main(["predict", str(tmp_path / "nope.png"), "--refs", str(refs)]) == EXIT_USAGE
    assert f"query {tmp_path / 'nope.png'} does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["predict", str(item.query_path), "--refs", str(empty)]) == EXIT_USAGE
    assert f"reference folder {empty} holds no images" in capsys.readouterr().err
    assert main(["predict", str(item.query_path), "--refs", str(refs), "--traits", "shiny"]) == EXIT_USAGE
    assert "unknown trait(s) shiny" in capsys.readouterr().err
    assert main(["predict", str(item.query_path), "--refs", str(refs), "--domain-card", "{\"code\": 1}"]) == EXIT_USAGE
    assert "--domain-card" in capsys.readouterr().err


def test_a_query_among_the_references_is_left_out_of_its_own_set(coins):
    _, refs = coins
    files = sorted(refs.iterdir())
    items = predict_items([files[0]], [refs], domain_card(traits=["aligned"]))
    assert files[0].resolve() not in items[0].ref_paths and len(items[0].ref_paths) == len(files) - 1
    assert items[0].traits == frozenset({"aligned"}) and items[0].label is None
    with pytest.raises(PredictInputError, match="no reference image besides itself"):
        predict_items([files[0]], [files[0]])
