"""The quickstart notebook runs end to end, cell by cell, in a fresh kernel of this interpreter."""
from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbformat.v4 import new_notebook

from anomalyclaw.graph.vlm.fake_server import FakeVLMServer

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"
KEY = "sk-notebook-test-4f9a21c7"


@pytest.fixture()
def kernel_name(tmp_path, monkeypatch) -> str:
    """A kernelspec that runs this interpreter, first on JUPYTER_PATH, so the notebook runs the
    code under test whatever other "python3" kernels the machine has."""
    from ipykernel.kernelspec import write_kernel_spec

    name = "anomalyclaw-test"
    write_kernel_spec(tmp_path / "jupyter" / "kernels" / name, overrides={"display_name": "AnomalyClaw tests"})
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's temporary folder lands here
    return name


def execute(nb, kernel_name: str, cwd: Path):
    """Run every cell; nbclient raises CellExecutionError on the first cell that fails."""
    NotebookClient(nb, timeout=240, kernel_name=kernel_name, resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def code_cell(nb, marker: str):
    cells = [c for c in nb.cells if c.cell_type == "code" and marker in c.source]
    assert len(cells) == 1, f"expected one code cell containing {marker!r}, found {len(cells)}"
    return cells[0]


def text_of(cell) -> str:
    parts = []
    for out in cell.outputs:
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("execute_result", "display_data"):
            parts.append(out.data.get("text/plain", ""))
    return "".join(parts)


def n_images(cell) -> int:
    return sum(1 for out in cell.outputs if out.output_type == "display_data"
               and ({"image/png", "image/jpeg"} & set(out.data)))


def tagged_cell(nb, tag: str):
    cells = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
    return cells[0]


def endpoint_cell(nb):
    cells = [c for c in nb.cells if "endpoint" in c.metadata.get("tags", [])]
    assert len(cells) == 1
    return cells[0]


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) >= 6
    assert all(c.outputs == [] and c.execution_count is None for c in code)


def test_quickstart_runs_end_to_end(kernel_name, tmp_path, monkeypatch):
    # A local OpenAI-compatible endpoint, so that section 6 (a real endpoint) runs too.
    with FakeVLMServer(api_key=KEY) as server:
        monkeypatch.setenv("ANOMALYCLAW_BASE_URL", server.base_url)
        monkeypatch.setenv("ANOMALYCLAW_MODEL", "fake-vlm")
        monkeypatch.setenv("ANOMALYCLAW_API_KEY", KEY)
        nb = execute(nbformat.read(NOTEBOOK, as_version=4), kernel_name, tmp_path)
        requests = server.stats.completions

    items = text_of(code_cell(nb, "generate_benchmark("))
    assert "14 test items" in items

    one = text_of(code_cell(nb, "graph = build_pipeline()"))
    assert re.search(r"fused \d\.\d{3}", one) and "tools used:" in one

    stream = code_cell(nb, "graph.astream(")
    streamed = text_of(stream)
    for node in ("== direct", "== propose", "== select_tool", "== commit", "== fuse"):
        assert node in streamed
    # The query, its closest reference, then every image a tool returned (each printed as "[name] caption").
    tool_images = len(re.findall(r"^  \[\w+\] ", streamed, flags=re.M))
    assert n_images(stream) == 2 + tool_images
    # The showcase item shows the agent doing its job: a tool finds the defect, its images are
    # in the streamed turns, and the candidate it tested is confirmed.
    assert "coin_count, ground truth missing_part" in one
    assert tool_images >= 1 and re.search(r"verdict c\d: confirmed - \w+: evidence 0?\.\d+ \(found\)", streamed)

    swap = text_of(code_cell(nb, "registry.drop("))
    dropped = re.search(r"dropped (\w+);", swap).group(1)
    tool_list = swap.split("the direct branch now sends")[0]
    assert f"- {dropped}:" not in tool_list and "- colour_histogram_compare:" in tool_list
    assert "You inspect images for a quality team." in swap
    second_run = re.search(r"without \w+, with colour tool\s+tools (\[.*?\])", swap).group(1)
    assert dropped not in second_run

    colour = code_cell(nb, '"colour_histogram_compare", {"bbox": bbox}')
    assert text_of(colour).count("ok=True") == 2 and n_images(colour) == 2

    evaluation = code_cell(nb, "Runner(")
    assert "14 items in" in text_of(evaluation) and "macro" in text_of(evaluation)
    assert n_images(evaluation) == 1
    fusion = text_of(code_cell(nb, "evaluate(records, expert_weight=0)"))
    assert re.search(r"fused with the expert term \(weight 0\.2\): \d\.\d{3}; without it \(weight 0\): (\d\.\d{3}), "
                     r"the blend \1", fusion) and "'expert_z': {'anomaly_vfm'" in fusion

    page = Path(re.search(r"open (\S+) in a browser", text_of(code_cell(nb, "build_report("))).group(1))
    assert page.is_file() and page.is_relative_to(tmp_path)
    assert "S7_0001" in page.read_text(encoding="utf-8")
    where = code_cell(nb, "draw_localization(rec")
    assert re.search(r"confirmed \[\[[0-9., ]+\]", text_of(where)) and "map file maps/" in text_of(where)
    assert n_images(where) == 1

    # section 7: custom events, a checkpointed thread in memory, then SQLite with native tool calls
    events = text_of(tagged_cell(nb, "langgraph-events"))
    assert "VLM propose answered" in events and re.search(r"tool \w+ ok in \d+ ms", events), events
    assert "fuse: anomaly score" in events and "base64" not in events and len(events) < 8000
    threads = text_of(tagged_cell(nb, "langgraph-threads"))
    assert re.search(r"\d+ checkpoints on thread 'S2_\d+'", threads) and "next refute" in threads
    rerun = re.search(r"re-run from step \d+: refute (\S+) \(first run (\S+)\)", threads)
    assert rerun and rerun.group(1) == rerun.group(2)  # the offline policy replays its episode
    sqlite = text_of(tagged_cell(nb, "langgraph-sqlite"))
    assert "stopped before: ('refute',)" in sqlite and "resumed: refute" in sqlite
    assert "AI -> Tool -> Human" in sqlite  # native: the tool's answer is a tool message, its images a user message

    real = text_of(endpoint_cell(nb))
    assert "openai (fake-vlm)" in real and "skipped" not in real
    assert requests >= 2  # both branches of the item went to the endpoint
    everything = "".join(text_of(c) for c in nb.cells if c.cell_type == "code")
    assert KEY not in everything


def test_endpoint_cell_is_skipped_without_an_endpoint(kernel_name, tmp_path):
    nb = new_notebook(cells=[endpoint_cell(nbformat.read(NOTEBOOK, as_version=4))])
    out = text_of(execute(nb, kernel_name, tmp_path).cells[0])
    assert "skipped: ANOMALYCLAW_BASE_URL is not set" in out
