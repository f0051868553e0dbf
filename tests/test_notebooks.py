"""Tests for notebooks/: each notebook runs top to bottom in quick mode, and each opens the
way the README promises (a Colab badge for its own file, a setup cell with the repository URL).

A notebook is run the plain way, without Jupyter: its code cells, in order, as one Python
script (lines that start with % or ! are IPython magics and are dropped), with matplotlib's
Agg backend, TINYVLM_QUICK=1 (each notebook's small config), from the repository root, in a
fresh process. Any exception fails the test and shows the end of the traceback.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# plt.show() displays in Jupyter; here it only closes the figures, so they do not pile up
PREAMBLE = 'import matplotlib\nmatplotlib.use("Agg")\nimport matplotlib.pyplot as plt\nplt.show = lambda *a, **k: plt.close("all")\n'


def load(path):
    with open(path) as f:
        return json.load(f)


def source(cell):
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def as_script(nb):
    """The code cells as one script, each headed by its number so a traceback names the cell."""
    parts = [PREAMBLE]
    code_cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    for k, cell in enumerate(code_cells, 1):
        lines = [line for line in source(cell).splitlines() if not line.lstrip().startswith(("%", "!"))]
        parts.append(f"# ---- code cell {k} ----\n" + "\n".join(lines) + "\n")
    return "\n".join(parts)


def test_there_are_three_notebooks():
    assert [p.name for p in NOTEBOOKS] == ["01_vit.ipynb", "02_clip.ipynb", "03_llava.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_opens_with_badge_and_setup_and_carries_a_full_run(path):
    nb = load(path)
    first, setup = nb["cells"][0], next(c for c in nb["cells"] if c["cell_type"] == "code")
    url = re.search(r'^REPO_URL = "https://github\.com/([\w.-]+/[\w.-]+)"$', source(setup), re.M)
    assert url, "the first code cell must set REPO_URL to the repository's GitHub URL"
    badge = f"https://colab.research.google.com/github/{url.group(1)}/blob/main/notebooks/{path.name}"
    assert first["cell_type"] == "markdown" and badge in source(first), f"the first cell needs the badge {badge}"
    assert "'google.colab' in sys.modules" in source(setup).replace('"', "'")
    # the saved outputs come from a full run: pictures, no errors, no quick mode
    outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 5
    assert not any(o["output_type"] == "error" for o in outputs)
    printed = "".join("".join(o.get("text", "")) for o in outputs)
    assert "full mode" in printed and "quick mode" not in printed


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_in_quick_mode(path, tmp_path):
    pytest.importorskip("matplotlib")
    script = tmp_path / (path.stem + ".py")
    script.write_text(as_script(load(path)))
    env = dict(os.environ, TINYVLM_QUICK="1", MPLBACKEND="Agg", OMP_NUM_THREADS="1", TMPDIR=str(tmp_path))
    run = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, f"{path.name} failed:\n{run.stderr[-4000:]}"
    assert "quick mode" in run.stdout
