"""Tests for flags.py: flags are parsed into hand-picked expected configs, in every form
(--k=v, --k v, a bare boolean), presets then overrides, and every mistake is one clear line.
Run: python -m pytest -q tests/test_flags.py"""
import subprocess
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pytest

from flags import ConfigError, parse_flags, tile_grids
from train import Config, PRESETS

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Toy:
    flag: bool = False
    n: int = 1
    x: float = 0.5
    name: str = "a"


TOY_PRESETS = {"base": {}, "big": {"n": 100, "name": "big"}, "on": {"flag": True}}


def toy(*argv):
    return parse_flags(Toy, list(argv), TOY_PRESETS)


def test_flag_forms():
    """--k=v, --k v and a bare boolean --k all set the field, typed by the dataclass."""
    assert toy() == Toy()
    assert toy("--n=3", "--x", "0.25", "--name=b", "--flag") == Toy(flag=True, n=3, x=0.25, name="b")
    assert toy("--flag", "--n", "2") == Toy(flag=True, n=2)      # a bare bool followed by another flag
    assert toy("--n", "-4") == Toy(n=-4)                          # a negative value is a value, not a flag
    assert toy("--x=1") == Toy(x=1.0) and isinstance(toy("--x=1").x, float)
    assert toy("--name=a=b") == Toy(name="a=b")                   # only the first '=' splits
    assert toy("--n=1", "--n=9") == Toy(n=9)                      # the last one wins


@pytest.mark.parametrize("text, value", [("false", False), ("False", False), ("0", False), ("no", False),
                                         ("off", False), ("true", True), ("TRUE", True), ("1", True),
                                         ("yes", True), ("on", True)])
def test_booleans_are_parsed_not_truth_tested(text, value):
    # argparse's type=bool makes "--flag False" True (bool("False")); here both forms parse the
    # word. The preset starts the flag at the opposite value, so a no-op would fail.
    start = "--config=base" if value else "--config=on"
    assert toy(start, f"--flag={text}").flag is value
    assert toy(start, "--flag", text).flag is value


def test_presets_then_overrides_in_any_order():
    """--config picks the base values; every other flag overrides it wherever it stands."""
    assert toy("--config=big") == Toy(n=100, name="big")
    assert toy("--config=big", "--n=5") == Toy(n=5, name="big")
    assert toy("--n=5", "--config=big") == Toy(n=5, name="big")   # the preset never overrides a flag
    assert parse_flags(Toy, [], {"first": {"n": 7}, "second": {}}) == Toy(n=7)  # no --config: the first preset


@pytest.mark.parametrize("argv, message", [
    (["--m=3"], r"unknown flag --m \(--help lists them\); valid: --config, --flag, --n, --x, --name"),
    (["--n=abc"], r"--n expects int, got 'abc'"),
    (["--n=1.5"], r"--n expects int"),
    (["--x=fast"], r"--x expects float"),
    (["--flag=maybe"], r"--flag expects bool"),
    (["--flag", "maybe"], r"--flag expects bool"),
    (["--n"], r"--n needs a value"),
    (["--config=huge"], r"unknown --config=huge; presets: base, big, on"),
    (["n=3"], r"unexpected argument 'n=3'"),
    (["--"], r"unexpected argument '--'"),
])
def test_bad_flags_are_refused_with_a_clear_message(argv, message):
    """Unknown keys, wrong types, missing values and stray words are refused, never ignored."""
    with pytest.raises(ConfigError, match=message):
        toy(*argv)


def test_real_config_presets_and_overrides():
    """The same on train.Config: tiny is exactly its preset, overrides land on the right fields
    (the "--vit_cls False" trap included), and the error for a typo lists every valid key."""
    tiny = parse_flags(Config, ["--config=tiny"], PRESETS)
    assert tiny == Config(**PRESETS["tiny"]) and tiny.clip_steps == PRESETS["tiny"]["clip_steps"]
    cfg = parse_flags(Config, ["--config=tiny", "--clip_steps=3", "--vit_cls", "False", "--clip-lr=1e-2",
                               "--out_dir", "/tmp/x"], PRESETS)
    assert asdict(cfg) == {**asdict(tiny), "clip_steps": 3, "vit_cls": False, "clip_lr": 0.01, "out_dir": "/tmp/x"}
    assert parse_flags(Config, [], PRESETS) == Config()   # the first preset, "cpu", is the dataclass defaults
    with pytest.raises(ConfigError, match=r"--clip_steps expects int, got 'abc'"):
        parse_flags(Config, ["--clip_steps=abc"], PRESETS)
    with pytest.raises(ConfigError) as e:
        parse_flags(Config, ["--clip_stepz=3"], PRESETS)
    assert all(f"--{k}" in str(e.value) for k in asdict(Config()))   # every valid key is listed


def test_bare_unknown_flag_lists_the_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown flag --bogus \(--help lists them\); valid: --config, --flag"):
        toy("--bogus")


def test_bare_hyphenated_boolean():
    assert parse_flags(Config, ["--vit_cls=false", "--vit-cls"], PRESETS).vit_cls is True


def test_bogus_flag_on_the_command_line_is_one_line_and_exit_code_2():
    """A user mistake on the command line is one 'error:' line and exit code 2, no traceback."""
    r = subprocess.run([sys.executable, "train.py", "--bogus"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--bogus" in lines[0], r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_help_prints_every_flag_with_its_default_and_the_presets(capsys):
    """--help (or -h, anywhere on the line) prints the presets and the dataclass's source, then
    exits with 0 without building a config."""
    for argv in (["--help"], ["--n=3", "-h"]):
        with pytest.raises(SystemExit) as e:
            toy(*argv)
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "--config=base: the defaults below" in out and "--config=big: n=100, name=big" in out
        assert "    n: int = 1" in out and 'name: str = "a"' in out
    r = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr == ""
    for f in fields(Config):   # every flag, with its default, in the source's own words
        assert f"    {f.name}: " in r.stdout, f.name
    assert "clip_steps: int = " in r.stdout and "# " in r.stdout and "--config=tiny: " in r.stdout


def test_tile_grids_parse_and_refuse():
    """--tile_grids="1x2, 2x2" -> ((1, 2), (2, 2)); "" -> no tiling; a grid beyond 4x4 or a
    malformed one is one clear line."""
    assert tile_grids(Config(tile_grids="1x2, 2x2")) == ((1, 2), (2, 2))
    assert tile_grids(Config()) == ()
    for bad in ("5x1", "2by2", "x2", "0x1"):
        with pytest.raises(ConfigError, match=f"--tile_grids: '{bad}' is not a grid RxC"):
            tile_grids(Config(tile_grids=bad))
