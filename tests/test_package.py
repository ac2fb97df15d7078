"""The package: the façade's names resolve lazily, and the CLI answers --help."""
from __future__ import annotations

import subprocess
import sys

import anomalyclaw


def test_facade_names_resolve():
    for name in anomalyclaw._EXPORTS:
        assert getattr(anomalyclaw, name) is not None, name


def test_import_is_cheap_and_layered():
    # importing the package must not pull in the heavy parts (lazy façade)
    code = "import sys, anomalyclaw; print(sorted(m for m in ('torch', 'langgraph', 'cv2') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_subpackages_are_not_top_level_modules():
    code = "import importlib.util as u; print([n for n in ('graph', 'tools', 'eval', 'experts', 'prompts') if u.find_spec(n)])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "[]"


def test_cli_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "anomalyclaw", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("eval", "run", "demo", "trace", "tools", "synth", "import-folder"):
        assert cmd in out.stdout
