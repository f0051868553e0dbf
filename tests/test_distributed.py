"""Tests for distributed.py: a batch size the ranks do not divide is refused; the losses under
DDP give, on two gloo processes that each hold half of a batch, exactly the gradients of one
process that holds all of it (token mean, per-answer mean, CLIP's contrastive loss over the
global batch); and `torchrun --standalone --nproc_per_node=2 train.py --config=tiny` on this
CPU ends every stage with the weights and the per-step losses of one process.
Run: python -m pytest -q tests/test_distributed.py"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import distributed
import train
from checkpoint import load_checkpoint
from clip import CLIP, tokenize as clip_tokenize
from flags import ConfigError
from model import VLM
from tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent


def test_a_batch_size_the_ranks_do_not_divide_is_refused(monkeypatch):
    monkeypatch.setattr(distributed, "rank_and_world", lambda: (1, 4))
    assert distributed.rank_share(32) == range(8, 16)   # rank 1 of 4: the second quarter
    distributed.check_batch_sizes({"clip_batch_size": 32, "lm_batch_size": 16})
    monkeypatch.setattr(distributed, "rank_and_world", lambda: (0, 3))
    with pytest.raises(ConfigError, match=r"^--lm_batch_size=16 is not a multiple of the 3 ranks"):
        distributed.check_batch_sizes({"clip_batch_size": 33, "lm_batch_size": 16})
    monkeypatch.setattr(distributed, "rank_and_world", lambda: (0, 1))
    assert distributed.rank_share(5) == range(5)        # one process builds it all


# ----------------------------------------------------------------------------- the losses under DDP


def toy_runs():
    """A tiny CLIP and a tiny VLM (seeded: the same weights in every process) and a batch of 4
    for each loss. The labels give the rows different numbers of labelled tokens and answers,
    so a plain average of the ranks' means would not be the batch's mean."""
    torch.manual_seed(0)
    tok = Tokenizer({bytes([b]): b for b in range(256)})
    # the patch stem: the conv stem's BatchNorm would normalise each rank's half by its own
    # statistics (SyncBatchNorm needs GPUs), which is close to one process but not equal
    cfg = train.Config(**{**train.PRESETS["tiny"], "vit_stem": "patch"})
    clip_model = CLIP(train.clip_config(cfg, tok), eot_id=tok.eot_id)
    vlms = [VLM(train.vlm_config(cfg, tok)) for _ in range(2)]   # one per loss: DDP wraps each once
    for vlm in vlms:   # the lm stage's text-only batches: ViT and projector stay frozen (DDP waits for
        for part in (vlm.vision, vlm.projector, vlm.regions):   # a gradient of every parameter that requires one)
            part.requires_grad_(False)
    pairs = {"images": torch.randn(4, 3, cfg.image_size, cfg.image_size),   # (B, 3, S, S)
             "ids": clip_tokenize(tok, ["a red circle", "two blue squares", "a ring", "a green cross"], 32)}
    ids = torch.randint(0, 256, (4, 12))                                      # (B, T)
    labels = torch.full((4, 12), -100)
    for row, spans in enumerate([[(2, 3)], [(1, 4), (6, 7)], [(3, 11)], [(1, 2), (4, 5), (8, 9)]]):
        for start, end in spans:   # answers: runs of labelled tokens
            labels[row, start:end] = ids[row, start:end]
    text = {"input_ids": ids, "images": None, "labels": labels}
    return [("contrastive", clip_model, train.contrastive_loss, pairs), ("tokens", vlms[0], train.token_loss, text),
            ("answers", vlms[1], train.answer_loss, text)]


def gradients(run, share):
    name, model, loss_fn, batch = run
    model.zero_grad(set_to_none=True)
    step_model = torch.nn.parallel.DistributedDataParallel(model) if dist.is_initialized() else model
    part = {k: v[share.start:share.stop] if torch.is_tensor(v) else v for k, v in batch.items()}
    loss = loss_fn(step_model, part)
    loss.backward()
    return distributed.mean_over_ranks(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()
                                                        if p.grad is not None}


def ranks_gradients(rank, world, init_file, out):
    """One of `world` gloo processes: its share of each batch, through DDP; rank 0 saves the results."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = {run[0]: gradients(run, distributed.rank_share(4)) for run in toy_runs()}
    if rank == 0:
        torch.save(results, out)
    distributed.finish()


def test_two_ranks_with_half_a_batch_each_get_the_gradients_of_one_process(tmp_path):
    """Each rank's loss is its share of the global mean (token and answer counts all-reduced),
    and CLIP's loss is computed over the gathered global batch, scaled by N so that DDP's
    average of the ranks' gradients is the one-process gradient. A wrong factor would pass the
    weight comparison of the torchrun test below (AdamW's first steps and gradient clipping
    undo a uniform scale), so the gradients themselves are compared here."""
    mp.spawn(ranks_gradients, args=(2, str(tmp_path / "init"), str(tmp_path / "ddp.pt")), nprocs=2)
    ddp = torch.load(tmp_path / "ddp.pt")
    for run in toy_runs():
        loss, grads = gradients(run, range(4))
        ddp_loss, ddp_grads = ddp[run[0]]
        torch.testing.assert_close(ddp_loss, loss, rtol=1e-5, atol=1e-6, msg=run[0])
        assert ddp_grads.keys() == grads.keys()
        for n in grads:  # float rounding differs (two half batches), so within 1e-5 of each tensor's largest entry
            scale = grads[n].abs().max().item()
            torch.testing.assert_close(ddp_grads[n], grads[n], rtol=0, atol=1e-5 * scale + 1e-9, msg=f"{run[0]} {n}")


# ----------------------------------------------------------------------------- torchrun


# every stage, a few steps, evaluation sets of a few items: what the runs below compare is the weights
# (the patch stem: see toy_runs on BatchNorm under DDP)
SHORT_RUN = ["--config=tiny", "--vit_stem=patch", "--tokenizer_scenes=50", "--log_every=1000", "--eval_clip_scenes=10",
             "--eval_retrieval=4", "--eval_questions=7", "--eval_pope=2", "--eval_grounding=2",
             "--eval_captions=2", "--eval_batch_size=8"] + [f"--{s}_steps=3" for s in train.STAGES]


def test_torchrun_two_ranks_equal_one_process(tmp_path):
    """DDP: `torchrun --standalone --nproc_per_node=2 train.py --config=tiny` on CPU (gloo), with the
    default --grad_accum=1 (only steps and evaluation sets shortened), so each rank builds half of
    every batch, must end every stage with the weights and the per-step losses of one process that
    builds all of it (the same global batch), within float rounding. Inside train.py every rank's
    weights are compared with rank 0's at the end of each stage (check_replicas stops the run if
    any differs) and rank 0 alone logs that; here rank 0's checkpoints are compared with the
    single process's."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train.py", *SHORT_RUN, f"--out_dir={tmp_path / 'ddp'}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-1500:] + r.stderr[-3000:]
    for stage in train.STAGES:  # logged once: rank 1 prints nothing
        assert r.stdout.count(f"{stage}: weights identical on all 2 ranks") == 1, r.stdout
    assert r.stdout.count("clip step     0/3") == 1
    train.main([*SHORT_RUN, f"--out_dir={tmp_path / 'one'}"])
    for stage in train.STAGES:
        ddp = load_checkpoint(str(tmp_path / "ddp" / f"{stage}.pt"))
        one = load_checkpoint(str(tmp_path / "one" / f"{stage}.pt"))
        torch.testing.assert_close(ddp["losses"], one["losses"], rtol=1e-5, atol=0, msg=stage)
        assert ddp["model"].keys() == one["model"].keys()
        # Two half batches round differently from one whole batch (the gradients agree to ~1e-6
        # of their size, test above), and AdamW divides each gradient by its own running size: a
        # weight whose gradient is zero but for rounding moves by a good part of the learning
        # rate either way. So a few weights of thousands differ by up to ~6e-5 here; all others
        # agree to 1e-6.
        far = 0
        for name, w in one["model"].items():
            torch.testing.assert_close(ddp["model"][name], w, atol=1e-4, rtol=0, msg=f"{stage} {name}")
            far += int(((ddp["model"][name] - w).abs() > 1e-6 + 1e-5 * w.abs()).sum())
        assert far <= sum(w.numel() for w in one["model"].values()) / 1000, (stage, far)
    assert json.loads((tmp_path / "ddp" / "metrics.json").read_text()).keys() == \
        json.loads((tmp_path / "one" / "metrics.json").read_text()).keys()
