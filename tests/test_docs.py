"""Tests for README.md, docs/ and the notebooks' text: what they say about the code holds.

- Every citation of the project's own code names something that exists: `vit.ViT`,
  `model.VLM.embed`, or `train.py` → `train_stage` (and the names listed after it, as in
  `clip.py` → `CLIP.forward`, `clip_loss`) are imported and looked up attribute by attribute.
  Only the top-level modules count (torch.nn, np.ndarray and tests/*.py are not ours to check).
- The README's reading-order table gives each file's length within 10 % of `wc -l`.
- The repository stands alone: no tracked file cites a document it does not contain, an issue
  by number, or course material.
- The README stays a short guide (at most 15,000 bytes) that opens with the two commands.

The notebooks are checked apart from README.md and docs/, so that a failure says which side
it is on. Each test lists every problem it finds, not only the first.
"""
import importlib
import inspect
import json
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MODULES = sorted(p.stem for p in ROOT.glob("*.py"))
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

# `clip.pt`, `tokenizer.json`, `train.py`: file names, not attributes
FILE_SUFFIXES = {"py", "pt", "json", "jsonl", "ipynb", "png", "md", "html", "txt", "tmp"}
# module.name(.name...), not preceded by a word, a dot, a slash or a hyphen
# (so torch.utils.data.DataLoader and tests/test_train.py are not read as data.DataLoader or train.py)
DOTTED = re.compile(r"(?<![\w./-])(" + "|".join(MODULES) + r")\.([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")
# `name.py` → `a`, `b` and `C.d`: the names after the arrow, each in backticks (a `file.py` starts the next)
ARROW = re.compile(r"(?<![\w/.-])`?(\w+)\.py`?\s*(?:→|->)\s*((?:`(?!\w+\.py`)[A-Za-z_][\w.]*`(?:\s*(?:,\s*and|,|and)\s*(?=`(?!\w+\.py`)))?)+)")


def markdown_texts(paths):
    return {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in paths}


def notebook_cells(kinds=("markdown",)):
    """{'notebooks/NAME.ipynb cell K': source} for every cell of those kinds (K counts all cells from 0)."""
    texts = {}
    for path in NOTEBOOKS:
        for k, cell in enumerate(json.loads(path.read_text(encoding="utf-8"))["cells"]):
            if cell["cell_type"] in kinds:
                source = cell["source"]
                texts[f"{path.relative_to(ROOT)} cell {k}"] = "".join(source) if isinstance(source, list) else source
    return texts


def citations(text):
    """[(module, 'Name.attr')] of every citation of the project's code in a text."""
    found = []
    for m in DOTTED.finditer(text):
        if m.group(2).split(".")[0] not in FILE_SUFFIXES:
            found.append((m.group(1), m.group(2)))
    for m in ARROW.finditer(text):
        if m.group(1) in MODULES:
            found += [(m.group(1), name.rstrip(".")) for name in re.findall(r"`([^`]+)`", m.group(2))]
    return found


def resolves(module, dotted):
    """Whether module.dotted exists: each part an attribute of the one before, or the last one
    an attribute a class's methods assign (`CLIP.visual`: self.visual = ViT(...) in __init__)."""
    obj = importlib.import_module(module)
    parts = dotted.split(".")
    for k, part in enumerate(parts):
        if hasattr(obj, part):
            obj = getattr(obj, part)
        elif inspect.isclass(obj) and k == len(parts) - 1:
            return re.search(rf"\bself\.{part}\s*(?::[^=\n]+)?=[^=]", inspect.getsource(obj)) is not None
        else:
            return False
    return True


def broken_citations(texts):
    return sorted({f"{where}: {module}.{name}" for where, text in texts.items()
                   for module, name in citations(text) if not resolves(module, name)})


def test_the_citation_finder_reads_both_forms():
    text = ("`vit.ViT`, `model.VLM.embed`; (`clip.py` → `CLIP.forward`, `clip_loss` and\n`CLIP.visual`). "
            "`out/clip.pt`, `train.py`, torch.utils.data.DataLoader, `tests/test_vit.py` → `test_x`")
    assert citations(text) == [("vit", "ViT"), ("model", "VLM.embed"),
                               ("clip", "CLIP.forward"), ("clip", "clip_loss"), ("clip", "CLIP.visual")]
    assert not broken_citations({"t": text})
    assert broken_citations({"t": "`vit.NoSuchThing`, `clip.CLIP.no_such_part`"}) == [
        "t: clip.CLIP.no_such_part", "t: vit.NoSuchThing"]


def test_readme_and_docs_cite_only_code_that_exists():
    texts = markdown_texts([README, *sorted((ROOT / "docs").glob("*.md"))])
    assert sum(len(citations(t)) for t in texts.values()) > 20  # the finder finds them at all
    broken = broken_citations(texts)
    assert not broken, "\n".join(broken)


def test_notebook_text_cites_only_code_that_exists():
    broken = broken_citations(notebook_cells())
    assert not broken, "\n".join(broken)


def readme_table(first_header):
    """The rows (lists of cells) of the README table whose first header cell is first_header."""
    rows, inside = [], False
    for line in README.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not inside:
            inside = line.startswith("|") and cells[0].lower() == first_header
            continue
        if not line.startswith("|"):
            break
        if not set(line) <= set("|-: "):  # not the |---| line
            rows.append(cells)
    return rows


def reading_order():
    """{file: (lines, notebook cell, test cell)} from the README table | file | lines | notebook | test |."""
    rows = {}
    for cells in readme_table("file"):
        name = re.search(r"`?([\w/]+\.py)`?", cells[0])
        if name:
            rows[name.group(1)] = (int(re.sub(r"[^\d]", "", cells[1])), cells[2], cells[3])
    return rows


def test_reading_order_covers_every_file_with_its_length_notebook_and_test():
    header = next(line for line in README.read_text(encoding="utf-8").splitlines() if line.startswith("| file |"))
    assert [c.strip() for c in header.strip("|").split("|")][:4] == ["file", "lines", "notebook", "test"]
    rows = reading_order()
    assert sorted(rows) == sorted(f"{m}.py" for m in MODULES), "the table lists each top-level .py file once"
    problems = []
    for name, (lines, notebook, test) in rows.items():
        actual = (ROOT / name).read_text(encoding="utf-8").count("\n")  # what wc -l counts
        if abs(lines - actual) > 0.1 * actual:
            problems.append(f"{name}: the README says {lines} lines, wc -l says {actual}")
        for path in re.findall(r"`([\w/.]+\.(?:ipynb|py))`", notebook + " " + test):
            if not (ROOT / path).exists() and not (ROOT / "notebooks" / path).exists() and not (ROOT / "tests" / path).exists():
                problems.append(f"{name}: {path} does not exist")
    assert not problems, "\n".join(problems)


def test_readme_stage_table_matches_train_stages():
    """Each row of STAGES has a row in the README's stage table that names its learning-rate
    fields (optional ones too), its steps and batch-size fields, and the stages it starts from."""
    import train
    rows = {re.sub(r"[`*]", "", r[0]): " ".join(r[1:]) for r in readme_table("stage")}
    assert list(rows) == list(train.STAGES)
    problems = []
    for name, spec in train.STAGES.items():
        needed = [*spec.trains.values(), *spec.optional.values(), spec.steps, spec.batch_size, *spec.starts_from]
        problems += [f"{name}: {field}" for field in needed if f"`{field}`" not in rows[name]]
    assert not problems, "the stage table does not name:\n" + "\n".join(problems)


# What a stand-alone repository never says: a design document or a folder outside it (docs/design.md
# is the project's own), issue numbers, course material. Each pattern has one letter in a [class],
# so that this file does not itself hold the words it looks for.
NOT_STAND_ALONE = [
    ("an outside design document", re.compile(r"[D]ESIGN\.md")),
    ("an outside folder", re.compile(r"\.\./[s]hared")),
    ("an issue by number", re.compile(r"\bissues? #?\d{1,3}\b", re.I)),
    ("the issue", re.compile(r"\bthe issue(?:'s|s)?\b", re.I)),
    ("course material", re.compile(r"\bless[o]n(?:'s|s)?\b", re.I)),
    ("lecture or slides", re.compile(r"\b(?:lectures?|slides)\b", re.I)),
]


def tracked_text_files():
    try:
        names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: no list of tracked files")
    files = {}
    for name in names:
        path = ROOT / name
        if path == Path(__file__).resolve() or not path.is_file():
            continue  # this file names the patterns it looks for
        raw = path.read_bytes()
        if b"\0" not in raw:
            files[name] = raw.decode("utf-8", errors="replace")
    return files


def outside_references(texts):
    """'where:line: what: the words' for every match of NOT_STAND_ALONE in {where: text}."""
    return [f"{where}:{text.count(chr(10), 0, m.start()) + 1}: {what}: {text[max(0, m.start() - 30):m.end() + 30]!r}"
            for where, text in texts.items() for what, pattern in NOT_STAND_ALONE for m in pattern.finditer(text)]


def test_the_repository_stands_alone():
    files = {n: t for n, t in tracked_text_files().items() if not n.endswith(".ipynb")}
    assert len(files) > 20
    found = outside_references(files)
    assert not found, "\n".join(found)


def test_the_notebooks_stand_alone():
    """Every cell's source, code and markdown (outputs are what the code printed)."""
    found = outside_references(notebook_cells(("markdown", "code")))
    assert not found, "\n".join(found)


def test_readme_is_short_and_opens_with_the_two_commands():
    text = README.read_text(encoding="utf-8")
    assert len(text.encode("utf-8")) <= 15_000
    first = "\n".join(text.splitlines()[:25])
    assert "pip install -r requirements.txt && python train.py" in first
    assert "pip install -r requirements-dev.txt && python -m pytest" in first
