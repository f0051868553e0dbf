"""Tests for checkpoint.py: an atomic save against a simulated crash, a load that refuses a
pickled payload with a side effect and a truncated or empty file; resume_point and the stage
checkpoints are checked through whole runs in tests/test_train.py.
Run: python -m pytest -q tests/test_checkpoint.py"""
import os
import re
from pathlib import Path

import pytest
import torch

from checkpoint import load_checkpoint, save_checkpoint
from flags import ConfigError


SIDE_EFFECTS = []


def _side_effect(tag):
    SIDE_EFFECTS.append(tag)
    return tag


class Payload:
    """Unpickling this runs _side_effect: what a malicious checkpoint would do with os.system."""

    def __reduce__(self):
        return (_side_effect, ("unpickled code ran",))


def test_save_checkpoint_replaces_the_file_atomically(tmp_path, monkeypatch):
    path = str(tmp_path / "stage.pt")
    save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "step": 1})
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "step": 2})
    assert os.listdir(tmp_path) == ["stage.pt"]                # replaced in place, no .tmp left
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))

    def crash(obj, f, *a, **k):                                # dies half way through writing
        Path(f).write_bytes(b"PK\x03\x04 half a zip file")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint(path, {"model": {"w": torch.full((3,), 7.0)}, "step": 3})
    assert load_checkpoint(path)["step"] == 2            # the previous checkpoint is whole


def test_load_checkpoint_refuses_pickled_code_and_broken_files(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "extra": Payload()}, evil)
    with pytest.raises(ConfigError, match=re.escape(str(evil))) as e:
        load_checkpoint(str(evil))
    assert "\n" not in str(e.value) and SIDE_EFFECTS == []      # refused, and nothing ran
    torch.load(evil, weights_only=False)                        # the file really is dangerous:
    assert SIDE_EFFECTS == ["unpickled code ran"]               # a plain load runs its code

    good = tmp_path / "good.pt"
    save_checkpoint(str(good), {"model": {"w": torch.randn(64, 64)}})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    for path in (truncated, empty):
        with pytest.raises(ConfigError, match=re.escape(str(path)) + ": cannot load checkpoint"):
            load_checkpoint(str(path))
    with pytest.raises(ConfigError, match="no such checkpoint"):
        load_checkpoint(str(tmp_path / "missing.pt"))
