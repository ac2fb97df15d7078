"""The API key never leaves the process: not in records, logs, streams, traces, run files,
reports or error messages, even when the endpoint echoes it back (issue 5)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from anomalyclaw.cli import main as cli_main
from anomalyclaw.graph.vlm.fake_server import FakeVLMServer
from anomalyclaw.eval.data.manifests import write_manifest
from anomalyclaw.eval.running.records import RECORDS_FILE, Record

KEY = "sk-anomalyclaw-test-5f2b9c1d7e3a"


def _cli(manifest: Path, out: Path, base_url: str, *, key: str = KEY,
         client: str = "langchain") -> subprocess.CompletedProcess:
    env = dict(os.environ, ANOMALYCLAW_API_KEY=key, ANOMALYCLAW_MAX_RETRIES="2", ANOMALYCLAW_BACKOFF_MAX_S="0.02")
    return subprocess.run(
        [sys.executable, "-m", "anomalyclaw", "-v", "-v", "run", "--manifest", str(manifest), "--out", str(out),
         "--backend", "openai", "--base-url", base_url, "--model", "fake-vlm", "--timeout", "0.5",
         "--save-images", "--no-progress", "--json", "--client", client], capture_output=True, text=True, env=env,
        timeout=240)


def _files_holding_key(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]


def test_key_stays_out_of_every_output(small_items, tmp_path, capsys):
    items = small_items[:6]
    manifest = write_manifest(items, tmp_path / "manifest.json")
    out = tmp_path / "run"
    # An endpoint that echoes the key in a reply, with 20% of its requests faulty besides.
    echo = json.dumps({"image_label": "normal", "confidence": 0.8, "anomaly_type": None, "bbox": None,
                       "evidence": f"For the record, you called me with the key {KEY}."})
    # Every direct reply echoes it: a request cut by its 0.5 s deadline on a loaded machine must
    # not take the only echo with it.
    with FakeVLMServer(api_key=KEY, fault_rate=0.2, hang_s=1.0, seed=2, script={"direct": [echo] * 3 * len(items)}) as server:
        proc = _cli(manifest, out, server.base_url)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert server.stats.by_status[200] > 0 and "DEBUG" in proc.stderr  # the calls were made, verbosely
    records = [Record.model_validate(json.loads(line)) for line in (out / RECORDS_FILE).read_text().splitlines()]
    assert sorted(r.item_id for r in records) == sorted(it.item_id for it in items)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])  # the run's --json line counts the errors
    assert summary["n_errors"] == sum(r.error is not None for r in records) and summary["fatal"] is None
    assert any("***" in r.to_line() for r in records)  # the echoed key was there, and was blanked
    assert KEY not in proc.stdout and KEY not in proc.stderr

    for rec in records:
        assert cli_main(["trace", str(out), "--item", rec.item_id]) == 0
        assert cli_main(["trace", str(out), "--item", rec.item_id, "--json"]) == 0
    if importlib.util.find_spec("anomalyclaw.eval.reports.html") is not None:
        assert cli_main(["report", str(out), "--manifest", str(manifest)]) == 0
    printed = capsys.readouterr()
    assert KEY not in printed.out and KEY not in printed.err
    assert list(out.glob("run_*.json")) and _files_holding_key(tmp_path) == []


@pytest.mark.parametrize("client", ["langchain", "sdk"])
def test_a_key_with_a_trailing_newline_stays_out_of_the_http_debug_logs(small_items, tmp_path, client):
    """A key pasted with its line ending (``\\r\\n``) is stripped at load: the endpoint accepts
    it, and the -vv HTTP logs of either client never show it."""
    manifest = write_manifest(small_items[:1], tmp_path / "manifest.json")
    out = tmp_path / "run"
    with FakeVLMServer(api_key=KEY) as server:
        proc = _cli(manifest, out, server.base_url, key=KEY + "\r\n", client=client)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "DEBUG" in proc.stderr and server.stats.by_status[200] > 0
    assert KEY not in proc.stdout and KEY not in proc.stderr and _files_holding_key(tmp_path) == []


def test_rejected_key_stops_the_run_without_printing_it(small_items, tmp_path):
    manifest = write_manifest(small_items[:3], tmp_path / "manifest.json")
    out = tmp_path / "run"
    # The endpoint wants another key and, as some gateways do, quotes the one it got.
    with FakeVLMServer(api_key="sk-the-right-one") as server:
        proc = _cli(manifest, out, server.base_url)
    assert proc.returncode == 3
    assert "HTTP 401" in proc.stderr and "ANOMALYCLAW_API_KEY" in proc.stderr
    assert "Incorrect API key provided: ***" in proc.stderr
    assert KEY not in proc.stdout and KEY not in proc.stderr
    assert _files_holding_key(tmp_path) == []


async def test_error_messages_and_log_records_are_redacted(small_items, caplog):
    import logging

    from anomalyclaw.config import EndpointConfig, install_secret_redaction
    from anomalyclaw.errors import EndpointFatalError
    from anomalyclaw.graph.vlm import make_vlm
    from langchain_core.messages import HumanMessage

    with FakeVLMServer(api_key="sk-the-right-one") as server:
        endpoint = EndpointConfig.from_env(base_url=server.base_url, model="fake-vlm", api_key=KEY)
        assert KEY not in repr(endpoint) and KEY not in json.dumps(endpoint.public())
        with pytest.raises(EndpointFatalError) as err:
            await make_vlm("openai", endpoint).acall([HumanMessage("hi")], stage="direct")
    assert "HTTP 401" in str(err.value) and KEY not in str(err.value)

    install_secret_redaction([KEY])
    log = logging.getLogger("anomalyclaw.test")
    with caplog.at_level(logging.INFO):
        log.info("calling with %s", KEY)
        try:
            raise RuntimeError(f"connection to endpoint with key {KEY} failed")
        except RuntimeError:
            log.exception("request failed")
    for handler_record in caplog.records:
        text = handler_record.getMessage() + (handler_record.exc_text or "")
        assert KEY not in text
    assert "***" in caplog.text and KEY not in caplog.text
