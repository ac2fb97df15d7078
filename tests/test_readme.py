"""The README's Python snippet runs as written, as a script, and prints a compact trace."""
from __future__ import annotations

import re
import runpy
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_readme_python_snippet_runs_as_a_script(small_synth, tmp_path, monkeypatch, capsys):
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Use it from Python", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "asyncio.run(main())" in snippet and snippet.lstrip().startswith("import")
    # the snippet reads the manifest `anomalyclaw demo` writes; give it the small benchmark there
    (tmp_path / "anomalyclaw-demo").mkdir()
    (tmp_path / "anomalyclaw-demo" / "synth").symlink_to(Path(small_synth).parent, target_is_directory=True)
    script = tmp_path / "snippet.py"
    script.write_text(snippet, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(script), run_name="__main__")  # as `python snippet.py` runs it, in this process
    out = capsys.readouterr().out
    assert "propose: initial score" in out and "fuse: anomaly score" in out and "direct:" in out
    assert len(out) < 5000, f"{len(out)} characters printed"
    assert "base64" not in out and "data:image" not in out
