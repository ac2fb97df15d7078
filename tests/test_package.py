"""The package: the façade's names resolve lazily, and the CLI answers --help."""
from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import anomalyclaw


def test_facade_names_resolve():
    for name in anomalyclaw.__all__:
        assert getattr(anomalyclaw, name) is not None, name


@pytest.mark.parametrize("package", ["anomalyclaw.experts", "anomalyclaw.prompts", "anomalyclaw.tools",
                                     "anomalyclaw.graph", "anomalyclaw.graph.vlm", "anomalyclaw.eval",
                                     "anomalyclaw.eval.data", "anomalyclaw.eval.data.synth",
                                     "anomalyclaw.eval.running", "anomalyclaw.eval.scoring",
                                     "anomalyclaw.eval.reports", "anomalyclaw.eval.bench"])
def test_every_package_face_has_all_and_its_names_resolve(package):
    module = importlib.import_module(package)
    assert module.__all__, package
    for name in module.__all__:
        assert getattr(module, name) is not None, (package, name)


def test_version_matches_pyproject():
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'^version = "([^"]+)"', text, re.M).group(1) == anomalyclaw.__version__


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
