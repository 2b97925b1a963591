"""Every notebook runs top to bottom at tiny scale, so a broken one fails CI."""

import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK_DIR = os.path.join(os.path.dirname(__file__), "..", "notebooks")
NOTEBOOKS = sorted(glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))
# The notebooks issue 8 asks for; a missing one fails instead of silently not running.
EXPECTED = ("00_foundation", "01_quickstart", "02_grpo_ablation", "03_export")
# Notebooks whose point is a figure: each must display at least one image.
SHOWS_PLOTS = ("01_quickstart", "02_grpo_ablation", "03_export")


def _name(path):
  return os.path.splitext(os.path.basename(path))[0]


def test_expected_notebooks_exist():
  assert set(EXPECTED) <= {_name(p) for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_executes(path, monkeypatch):
  monkeypatch.setenv("M2_NOTEBOOK_STEPS", "6")
  monkeypatch.delenv("M2_ABLATION_DIR", raising=False)   # 02 runs its own tiny ablation
  nb = nbformat.read(path, as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": os.path.dirname(path)}}).execute()
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(c.execution_count is not None for c in code), "a code cell did not run"
  outputs = [o for c in code for o in c.get("outputs", [])]
  assert not [o for o in outputs if o.output_type == "error"]
  if _name(path) in SHOWS_PLOTS:
    assert any("image/png" in o.get("data", {}) for o in outputs), "no figure was displayed"
