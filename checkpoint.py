"""
checkpoint.py — what a run keeps in out_dir, and how --resume and the next stage read it back.

    out/<stage>.pt       one per stage, written every checkpoint_every steps and at its end
    out/tokenizer.json   the run's tokenizer (checkpoint.get_tokenizer), shared by every stage
    out/metrics.json     one flat JSON object that every stage adds its figures to

A stage checkpoint is a plain dict, written atomically (temp file + os.replace: a crash or a
kill during a save leaves the previous file whole) and loaded with torch.load(weights_only=True),
so it holds tensors and plain containers, never pickled code:

    stage, config, tokenizer, model (the trained weights), step, losses (one per step so far)
    + optimizer, scaler, rng      while the stage runs (what --resume needs to go on)
    + metrics, seconds            once it has finished and been evaluated

Every problem with a checkpoint (missing, truncated, from another config or another run's
tokenizer, unfinished) is a one-line ConfigError naming the file.

Run the tests:  python -m pytest -q tests/test_checkpoint.py
"""
import json
import os
import time
from dataclasses import asdict

import torch
import torch.distributed as dist

import batches
import user_data
from distributed import is_main
from flags import ConfigError
from tokenizer import Tokenizer, train_bpe

# flags that change how a run is driven, not what it computes: --resume may change them
RUN_ONLY = ("stage", "out_dir", "device", "resume", "log_every", "checkpoint_every")


def save_checkpoint(path, payload):
    """Atomic write: a crash mid-save leaves the previous file whole (temp file + os.replace).
    Under torchrun rank 0 writes (every rank holds the same weights) and all ranks wait until
    the file is whole, since the next stage loads it on every rank."""
    if is_main():
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = path + ".tmp"
        torch.save(payload, tmp)
        os.replace(tmp, path)
    if dist.is_initialized():
        dist.barrier()


def load_checkpoint(path):
    """weights_only=True: a checkpoint holds tensors and plain containers, never pickled code."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such checkpoint; run the stage that writes it first")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, foreign pickle, not a checkpoint at all
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: cannot load checkpoint ({first_line[:200]})") from None


def update_metrics(out_dir, new):
    """metrics.json is one flat object that every stage adds to, written atomically (by rank 0)."""
    if not is_main():
        return new
    path = os.path.join(out_dir, "metrics.json")
    metrics = {}
    if os.path.isfile(path):
        with open(path) as f:
            metrics = json.load(f)
    metrics.update(new)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(metrics, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return metrics


def get_tokenizer(cfg):
    """The run's tokenizer, kept in out/tokenizer.json (and inside every checkpoint). A new
    `--stage all` run trains it; a single stage or --resume reuses the saved one, so that
    every stage of a run shares the same ids."""
    path = os.path.join(cfg.out_dir, "tokenizer.json")
    if (cfg.resume or cfg.stage != "all") and os.path.isfile(path):
        try:
            return Tokenizer.load(path)
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSON errors are ValueErrors
            raise ConfigError(f"{path}: not a tokenizer file ({e})") from None
    t0 = time.time()
    texts = user_data.user_texts(cfg) if cfg.caption_data or cfg.instruct_data else batches.world_texts(cfg)
    tok = Tokenizer(train_bpe(texts, cfg.vocab_size))
    print(f"tokenizer: {tok.vocab_size} tokens trained in {time.time() - t0:.1f}s")
    if is_main():  # every rank trained the same tokenizer; one writes it
        tok.save(path)
    return tok


def stage_path(cfg, stage):
    return os.path.join(cfg.out_dir, f"{stage}.pt")


def save_stage(stage, cfg, tok, module, state):
    """out/<stage>.pt: the stage's name, the run's config and tokenizer, the weights of the
    module it trains, and `state` (the training loop's, or at the end the stage's figures)."""
    save_checkpoint(stage_path(cfg, stage), {"stage": stage, "config": asdict(cfg), "tokenizer": tok.state(),
                                             "model": module.state_dict(), **state})


def load_weights(module, state, path):
    """Strict loading: a checkpoint from another config is one clear line, not a traceback."""
    try:
        module.load_state_dict(state, strict=not os.environ.get('POS_WORDS'))
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0] if lines else "shapes differ"
        raise ConfigError(f"{path} was written by another config ({detail[:160]})") from None


def load_vision(model, ckpt, path):
    """A checkpoint's ViT into a VLM's model.vision: CLIP's image tower from a clip.pt, or the
    ViT and the projector of an align.pt / instruct.pt (--vision_from)."""
    prefixes = ("visual.",) if ckpt.get("stage") == "clip" else ("vision.", "projector.")
    for prefix, module in zip(prefixes, (model.vision, model.projector)):
        part = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
        if not part:
            raise ConfigError(f"{path}: a {ckpt.get('stage')!r} checkpoint holds no {prefix.rstrip('.')} weights; "
                              f"use a clip.pt, align.pt or instruct.pt")
        load_weights(module, part, path)


def check_tokenizer(ckpt, tok, path):
    """A checkpoint's ids mean something only with its own tokenizer: refuse to mix runs."""
    try:
        same = Tokenizer.from_state(ckpt["tokenizer"]).ranks == tok.ranks
    except (KeyError, ValueError):
        same = False
    if not same:
        raise ConfigError(f"{path}: its tokenizer does not match tokenizer.json in the same folder; "
                          "it comes from another run")


def finished_checkpoint(cfg, stage, tok):
    """An earlier stage's checkpoint, checked: that stage finished, with this run's tokenizer."""
    path = stage_path(cfg, stage)
    ckpt = load_checkpoint(path)
    if "metrics" not in ckpt:
        raise ConfigError(f"{path}: the {stage} stage stopped at step {ckpt.get('step')}; "
                          "finish it with --resume")
    check_tokenizer(ckpt, tok, path)
    return ckpt


def resume_point(stage, cfg, tok):
    """With --resume: this stage's checkpoint if there is one (None: start the stage afresh),
    checked to come from the same run."""
    path = stage_path(cfg, stage)
    if not (cfg.resume and os.path.isfile(path)):
        return None
    ckpt = load_checkpoint(path)
    check_tokenizer(ckpt, tok, path)
    now = asdict(cfg)
    changed = [k for k, v in ckpt["config"].items() if k not in RUN_ONLY and now.get(k, v) != v]
    if changed:
        k = changed[0]
        raise ConfigError(f"{path}: written with --{k}={ckpt['config'][k]}, not {now[k]}; "
                          "--resume continues a run with its own config")
    return ckpt
