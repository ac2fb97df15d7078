"""Secrets are blanked in record values, never in serialised JSON; odd keys are stripped and
checked at load, and their escaped forms are blanked too (issue 17 items 1 and 9)."""
from __future__ import annotations

import json
import logging

import pytest

from anomalyclaw.config import EndpointConfig, check_api_key, redact, redact_value, secret_forms
from anomalyclaw.errors import ConfigError
from anomalyclaw.eval.running.records import RECORDS_FILE, Record, RecordWriter, finished_ids, load_records
from anomalyclaw.eval.running.runner import Runner
from anomalyclaw.graph.vlm import make_vlm
from anomalyclaw.graph.vlm.fake_server import FakeVLMServer

FAST_CONFIG = dict(expert_score=False)


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _a_full_record() -> Record:
    """A record with every kind of field a run writes: scores 0 and 1, nulls, text with the
    letters and words short keys are made of, nested history and usage."""
    return Record(item_id="item-1", domain_code="S1", label_gt=1, anomaly_score=1.0, direct_score=0.0,
                  refute_score=1, expert_score=None, rationale="the test part shows 1 scratch; e.g. null",
                  tools_used=["zoom_region"], history=[{"stage": "propose", "anomaly_score": 0.0, "text": "x y e"}],
                  usage={"requests": 1, "calls": [{"stage": "direct", "prompt_tokens": 10, "retries": 0}]},
                  fallbacks=["test: 1 fallback"], error=None, timings={"total_s": 1.0})


@pytest.mark.parametrize("key", ["1", "0", "e", "x", "null", "test"])
def test_a_short_key_never_corrupts_a_record(key, tmp_path):
    """Item 1: blanking ``key`` in the serialised line broke the JSON or its fields; now the values
    are redacted before serialising, so every line parses and keeps every field and number."""
    original = _a_full_record()
    with RecordWriter(tmp_path, secrets=[key]) as w:
        w.write(original)
        w.write(Record(item_id="echo", error=f"HTTP 401: Incorrect API key provided: {key}."))
    lines = (tmp_path / RECORDS_FILE).read_text(encoding="utf-8").splitlines()
    objs = [json.loads(line) for line in lines]                      # every line parses
    back = {r.item_id: r for r in load_records(tmp_path, strict=True)}
    assert finished_ids(tmp_path) == {"item-1", "echo"}                # a resume redoes nothing
    rec = back["item-1"]
    assert set(objs[0]) == set(json.loads(original.to_line()))       # no field lost
    assert (rec.anomaly_score, rec.direct_score, rec.refute_score, rec.label_gt) == (1.0, 0.0, 1.0, 1)
    assert rec.usage["calls"][0]["prompt_tokens"] == 10 and rec.history[0]["anomaly_score"] == 0.0
    assert back["echo"].error == "HTTP 401: Incorrect API key provided: ***."   # the echo is blanked
    assert not any(s == key or f" {key} " in f" {s} " for s in _strings(objs))


def test_redact_value_keeps_structure_and_blanks_every_form():
    key = 'sk-"quoted"\\back-0123'
    value = {"a": [key, f"x {json.dumps(key)} y", f"repr {key!r}", 3, None, True], key: {"n": 1.5}}
    clean = redact_value(value, [key])
    assert clean["a"][3:] == [3, None, True] and clean[key.replace(key, "***")] == {"n": 1.5}
    for s in _strings(clean):
        assert all(form not in s for form in secret_forms(key)), s
    assert redact("no secret here", [key]) == "no secret here"


def test_keys_are_stripped_and_checked_at_load(caplog):
    """Item 9: a key with a trailing \\r\\n was sent and printed as is; now it is stripped (and a
    key with a control character inside is refused, a short key warned about)."""
    env = {"ANOMALYCLAW_API_KEY": "sk-abcdef123456\r\n", "ANOMALYCLAW_BASE_URL": "http://127.0.0.1:1/v1",
           "ANOMALYCLAW_MODEL": "m"}
    assert EndpointConfig.from_env(env=env).secret_values() == ["sk-abcdef123456"]
    assert EndpointConfig(api_key="  sk-abcdef123456\n").secret_values() == ["sk-abcdef123456"]
    for bad in ("sk-abc\ndef", "sk abc def", "\r\n", "sk-\x00abc"):
        with pytest.raises(ConfigError, match="ANOMALYCLAW_API_KEY|empty"):
            EndpointConfig.from_env(env={**env, "ANOMALYCLAW_API_KEY": bad})
    with caplog.at_level(logging.WARNING):
        assert check_api_key("test") == "test"
    assert "too short" in caplog.text and "test" not in caplog.text.replace("test.", "")


async def test_an_echoed_key_with_quotes_and_backslashes_is_blanked_in_records(small_items, tmp_path):
    """Item 9: an endpoint that echoes a key holding ``"`` or ``\\`` put it in the record in its
    JSON-escaped form, which plain text replacement did not find."""
    key = 'sk-q"uote\\slash-0123456789'
    echo = json.dumps({"image_label": "normal", "confidence": 0.8, "anomaly_type": None, "bbox": None,
                       "evidence": f"raw {key} json {json.dumps(key)} repr {key!r}"})
    with FakeVLMServer(api_key=key, script={"direct": [echo]}) as server:
        endpoint = EndpointConfig.from_env(base_url=server.base_url, model="fake-vlm", api_key=key)
        from anomalyclaw.config import AgentConfig
        summary = await Runner(make_vlm("openai", endpoint), out_dir=tmp_path, progress=False,
                               config=AgentConfig(**FAST_CONFIG), secrets=endpoint.secret_values()
                               ).run(small_items[:1])
    assert summary.n_errors == 0 and server.stats.by_status[200] > 0
    text = (tmp_path / RECORDS_FILE).read_text(encoding="utf-8")
    obj = json.loads(text)
    assert "raw *** json" in obj["direct_rationale"] or "raw *** json" in json.dumps(obj)
    for form in secret_forms(key) + [json.dumps(key)[1:-1].replace("\\", "\\\\")]:
        assert form not in text, form
    for s in _strings(obj):
        assert all(form not in s for form in secret_forms(key))


async def test_a_run_with_key_e_keeps_every_record_whole(small_items, tmp_path):
    """Item 1 end to end: with the key ``e`` a run used to write lines that did not parse (and
    report 0 errors); now every record parses and a resume has nothing left to do."""
    from anomalyclaw.config import AgentConfig

    items = small_items[:3]
    with FakeVLMServer(api_key="e") as server:
        endpoint = EndpointConfig.from_env(base_url=server.base_url, model="fake-vlm", api_key="e")
        runner = Runner(make_vlm("openai", endpoint), out_dir=tmp_path, progress=False,
                        config=AgentConfig(**FAST_CONFIG), secrets=endpoint.secret_values())
        summary = await runner.run(items)
    lines = (tmp_path / RECORDS_FILE).read_text(encoding="utf-8").splitlines()
    records = [Record.model_validate(json.loads(line)) for line in lines]
    assert summary.n_errors == 0 and len(records) == 3 and all(r.anomaly_score is not None for r in records)
    assert all("e" in r.rationale for r in records if r.rationale)     # text is not blanked letter by letter
    assert finished_ids(tmp_path) == {it.item_id for it in items}
