"""Tests for notebooks/: each notebook runs top to bottom in quick mode, and each opens the
way the README promises (a Colab badge for its own file, a setup cell with the repository URL).

A notebook is run the plain way, without Jupyter: its code cells, in order, as one Python
script (lines that start with % or ! are IPython magics and are dropped), with matplotlib's
Agg backend, TINYVLM_QUICK=1 (each notebook's small config), from the repository root, in a
fresh process. Any exception fails the test and shows the end of the traceback.

Notebook 4 also prints its key checks as name=value lines (RoPE against the complex
rotation, the KV cache against recomputation, merged LoRA against unmerged): the tests hold
both its quick run and its saved full run to them.
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


def test_there_are_four_notebooks():
    assert [p.name for p in NOTEBOOKS] == ["01_vit.ipynb", "02_clip.ipynb", "03_llava.ipynb", "04_llm.ipynb"]


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


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    """run(path): the notebook's quick-mode run (a CompletedProcess), made once per session,
    so a test that reads a notebook's printed numbers costs no second run."""
    runs = {}

    def run(path):
        if path not in runs:
            tmp = tmp_path_factory.mktemp(path.stem)
            script = tmp / (path.stem + ".py")
            script.write_text(as_script(load(path)))
            env = dict(os.environ, TINYVLM_QUICK="1", MPLBACKEND="Agg", OMP_NUM_THREADS="1", TMPDIR=str(tmp))
            runs[path] = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True,
                                        text=True, timeout=300)
        return runs[path]

    return run


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_in_quick_mode(path, quick_run):
    pytest.importorskip("matplotlib")
    run = quick_run(path)
    assert run.returncode == 0, f"{path.name} failed:\n{run.stderr[-4000:]}"
    assert "quick mode" in run.stdout


def printed_checks(text):
    """The name=value lines a notebook prints for its tests (e.g. rope_vs_complex_max_abs_diff=2.8e-07)."""
    return dict(re.findall(r"^([A-Za-z]\w*)=(\S+)", text, re.M))


def assert_llm_checks(values):
    """Notebook 4's checks: RoPE is the complex rotation, the KV cache changes no token, and
    LoRA merges into the same function without having moved a base weight."""
    assert float(values["rope_vs_complex_max_abs_diff"]) < 1e-6
    assert float(values["rope_relative_max_spread"]) < 1e-4
    assert float(values["gqa_vs_repeated_kv_max_abs_diff"]) < 1e-4
    assert values["kv_cache_same_tokens"] == "True"
    assert float(values["kv_cache_speedup"]) > 0
    assert float(values["lora_B_max_abs"]) > 0  # trained: the merge has something to fold in
    assert values["lora_base_weights_unchanged"] == "True"
    assert float(values["lora_merged_vs_unmerged_max_abs_diff"]) < 1e-4


def test_llm_notebook_checks_hold_in_quick_mode(quick_run):
    pytest.importorskip("matplotlib")
    run = quick_run(ROOT / "notebooks" / "04_llm.ipynb")
    assert run.returncode == 0, f"04_llm.ipynb failed:\n{run.stderr[-4000:]}"
    assert_llm_checks(printed_checks(run.stdout))


def test_llm_notebook_checks_held_in_its_saved_full_run():
    nb = load(ROOT / "notebooks" / "04_llm.ipynb")
    outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert_llm_checks(printed_checks("".join("".join(o.get("text", "")) for o in outputs)))
