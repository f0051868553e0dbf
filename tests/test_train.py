"""Tests for train.py.

The STAGES table is checked against Config; the LR schedule against values worked out by hand;
the optimizer's weight-decay split by what one AdamW step does to each parameter. One short run
of the whole pipeline (module fixture, ~20 s) is shared by the tests of losses, frozen towers,
checkpoints and metrics.json; a run killed mid-stage and resumed must equal the uninterrupted
one; short stages must learn; a NaN loss stops a run cleanly; fp16's overflowing steps are
skipped; every preset trains a step of every stage.

Measured on this 2-core CPU with torch.set_num_threads(1) (tests/conftest.py), seeded, so the
loss thresholds below are deterministic; the margins are stated where they are asserted.
"""
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import asdict, fields, replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import batches
import data
import evaluate
import generate
import shapes
import train
from checkpoint import get_tokenizer, load_checkpoint, save_checkpoint
from flags import ConfigError, parse_flags
from model import VLM, per_answer_loss
from tokenizer import Tokenizer, train_bpe
from train import Config, PRESETS

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- the stage table


def test_every_stage_names_real_config_fields_and_model_parts():
    """STAGES is read by name (getattr(cfg, field), model.get_submodule(part)): a typo there would
    only fail when that stage runs. The stages run in the order of the table and start only from
    earlier ones."""
    names = {f.name for f in fields(Config)}
    tok = Tokenizer({bytes([b]): b for b in range(256)})
    models = {"clip": train.build_model("clip", Config(), tok, "cpu"), "vlm": VLM(train.vlm_config(Config(), tok))}
    for k, (stage, spec) in enumerate(train.STAGES.items()):
        lrs = {**spec.trains, **spec.optional}
        assert {spec.steps, spec.batch_size, *lrs.values()} <= names, stage
        for part in (*lrs, spec.saves):
            models[spec.model].get_submodule(part)
        assert all(earlier in list(train.STAGES)[:k] for earlier in spec.starts_from), stage
        assert spec.data in ("pairs", "text", "captions", "conversations") and callable(spec.metrics)
        assert spec.loss in ("contrastive", "tokens", "answers") and (spec.held_out is None or callable(spec.held_out))


# ----------------------------------------------------------------------------- LR schedule and optimizer


def test_lr_schedule_by_hand():
    cfg = SimpleNamespace(warmup_frac=0.1, min_lr_frac=0.1)
    steps = 100                                   # warmup = 10 steps
    lr = [train.lr_at(s, steps, cfg) for s in range(steps)]
    # linear warmup 1/10, 2/10, ..., 10/10
    assert lr[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    # cosine from 1 at the end of warmup, through the midpoint value, down to min_lr_frac
    assert lr[10] == pytest.approx(1.0)
    assert lr[55] == pytest.approx(0.1 + 0.9 * 0.5)                       # progress 45/90 = 1/2
    assert lr[40] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 3)))   # progress 30/90
    assert train.lr_at(steps, steps, cfg) == pytest.approx(0.1)           # the curve ends at min_lr_frac
    assert lr[-1] == pytest.approx(0.1, abs=1e-3) and lr[-1] > 0.1
    assert all(a > b for a, b in zip(lr[10:], lr[11:]))                   # strictly decaying after warmup
    assert min(lr) >= 0.1 - 1e-12 and max(lr) == pytest.approx(1.0)
    # no warmup asked for: still one step of it (never a zero LR), then the cosine
    assert train.lr_at(0, 10, SimpleNamespace(warmup_frac=0.0, min_lr_frac=0.0)) == 1.0


def test_optimizer_decays_only_matrices_and_keeps_per_module_lrs():
    torch.manual_seed(0)
    a = torch.nn.ModuleDict({"lin": torch.nn.Linear(4, 3), "norm": torch.nn.LayerNorm(3),
                             "emb": torch.nn.Embedding(5, 3)})
    b = torch.nn.ModuleDict({"lin": torch.nn.Linear(3, 2)})
    temperature = torch.nn.Parameter(torch.tensor(2.0))                   # 0-D, like CLIP's logit scale
    frozen = torch.nn.Parameter(torch.ones(2, 2), requires_grad=False)
    cfg = SimpleNamespace(weight_decay=0.5)
    opt = train.make_optimizer([(list(a.parameters()) + [temperature, frozen], 0.1), (b.parameters(), 0.01)],
                               cfg, "cpu")
    ids = lambda ps: {id(p) for p in ps}
    groups = [(ids(g["params"]), g["lr"], g["weight_decay"]) for g in opt.param_groups]
    assert groups == [
        (ids([a.lin.weight, a.emb.weight]), 0.1, 0.5),                         # >= 2-D: decayed
        (ids([a.lin.bias, a.norm.weight, a.norm.bias, temperature]), 0.1, 0.0),  # biases, norms, scalars: not
        (ids([b.lin.weight]), 0.01, 0.5),
        (ids([b.lin.bias]), 0.01, 0.0),
    ]                                                                          # the frozen one is in no group
    assert [g["peak_lr"] for g in opt.param_groups] == [0.1, 0.1, 0.01, 0.01]
    # behaviour, not bookkeeping: with zero gradients one AdamW step only applies decoupled
    # weight decay, p <- p * (1 - lr * wd), to the decayed group and leaves the others alone
    params = [p for g in opt.param_groups for p in g["params"]]
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for g in opt.param_groups:
        for p in g["params"]:
            p0 = before[[id(q) for q in params].index(id(p))]
            torch.testing.assert_close(p.detach(), p0 * (1 - g["lr"] * g["weight_decay"]))


# ----------------------------------------------------------------------------- one short run of every stage

# tiny, with lm_steps 40 -> 60 and instruct lr 1e-3 -> 3e-3 so that both stages halve their
# loss on fresh data (measured: lm 5.76 -> 2.51, ratio 0.44; instruct 3.39 -> 1.27, ratio 0.37),
# and evaluation sets cut to a few items each (the figures only need to exist here)
RUN_FLAGS = ["--lm_steps=60", "--instruct_lr=3e-3", "--instruct_projector_lr=3e-3", "--eval_clip_scenes=30",
             "--eval_retrieval=10", "--eval_questions=14", "--eval_pope=4", "--eval_grounding=2",
             "--eval_captions=2", "--log_every=1000"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """train.main on the tiny config, all four stages, recording what each train_loop saw."""
    out = tmp_path_factory.mktemp("tiny_run")
    seen = {}
    train_loop = train.train_loop

    def recording_train_loop(model, *args, **kwargs):
        losses = train_loop(model, *args, **kwargs)
        seen[kwargs["name"]] = {"losses": losses,
                      "trained": {n for n, p in model.named_parameters() if p.requires_grad},
                      "frozen_grads": [p.grad for p in model.parameters() if not p.requires_grad],
                      "n_params": len(list(model.named_parameters()))}
        return losses

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "train_loop", recording_train_loop)
        train.main(["--config=tiny", "--out_dir", str(out), *RUN_FLAGS])
    return SimpleNamespace(out=out, seen=seen, cfg=parse_flags(Config, ["--config=tiny", *RUN_FLAGS], PRESETS))


def test_metrics_json_has_every_figure_as_a_number(tiny_run):
    """metrics.json after `train.py --config=tiny` holds every figure docs/design.md names, each a
    finite number, fractions in [0, 1], timings positive and consistent with the total."""
    metrics = json.loads((tiny_run.out / "metrics.json").read_text())
    required = (["vqa_acc", "grounding_acc", "caption_acc", "total_seconds"]
                + [f"vqa_acc_{t}" for t in ("colour", "shape", "size", "count", "position", "existence", "relation")]
                + [f"pope_{k}_{m}" for k in ("random", "popular", "adversarial") for m in ("acc", "f1", "yes_ratio")]
                + ["clip_zero_shot_acc", "clip_retrieval_r1", "clip_retrieval_r5", "clip_zero_shot_colour_acc",
                   "clip_zero_shot_shape_acc", "clip_linear_probe_acc"]
                + [f"{s}_train_seconds" for s in train.STAGES])
    assert not set(required) - set(metrics)
    for key, value in metrics.items():
        assert type(value) in (int, float) and math.isfinite(value), (key, value)
        if re.search(r"_(acc|f1|yes_ratio|precision|recall|r1|r5)(_|$)", key):
            assert 0.0 <= value <= 1.0, (key, value)
        if key.endswith("_seconds"):
            assert value > 0.0, key
    assert metrics["total_seconds"] >= sum(metrics[f"{s}_train_seconds"] for s in train.STAGES)
    assert sorted(os.listdir(tiny_run.out)) == ["align.pt", "clip.pt", "instruct.pt", "lm.pt", "metrics.json", "tokenizer.json"]


def test_lm_and_instruct_halve_their_loss_on_fresh_batches(tiny_run):
    # every step draws new scenes, so this is learning, not memorising one batch
    for stage in ("lm", "instruct"):
        losses = tiny_run.seen[stage]["losses"]
        assert len(losses) == getattr(tiny_run.cfg, f"{stage}_steps")
        assert sum(losses[-5:]) / 5 < 0.5 * losses[0], (stage, losses[0], losses[-5:])


def test_align_lowers_its_loss_with_the_projector_alone(tiny_run):
    # The frozen text-only tiny LLM barely attends to the image slots, so the projector alone
    # cannot halve the caption loss at this size (measured: 3.18 -> 3.12 in 30 steps; on one fixed
    # batch the curve is the same at 15x the LR); this only pins that the loss goes down, not up.
    losses = tiny_run.seen["align"]["losses"]
    assert len(losses) == tiny_run.cfg.align_steps
    assert sum(losses[-5:]) / 5 < losses[0] - 0.02, losses


def test_frozen_towers_get_no_gradient_and_do_not_change(tiny_run):
    seen = tiny_run.seen
    prefixes = lambda names: {n.split(".")[0] for n in names}
    assert prefixes(seen["align"]["trained"]) == {"projector"}
    assert prefixes(seen["instruct"]["trained"]) == {"projector", "regions", "llm"}
    assert prefixes(seen["lm"]["trained"]) == {"llm"}
    for stage in ("lm", "align", "instruct"):
        assert seen[stage]["frozen_grads"] and all(g is None for g in seen[stage]["frozen_grads"]), stage
    ckpt = {s: load_checkpoint(str(tiny_run.out / f"{s}.pt"))["model"] for s in train.STAGES}
    vision = {k[len("visual."):]: v for k, v in ckpt["clip"].items() if k.startswith("visual.")}
    for stage in ("align", "instruct"):  # the ViT is clip's, bit for bit, after both LLaVA stages
        got = {k[len("vision."):]: v for k, v in ckpt[stage].items() if k.startswith("vision.")}
        assert got.keys() == vision.keys() and all(torch.equal(got[k], vision[k]) for k in vision), stage
    llm_align = {k[len("llm."):]: v for k, v in ckpt["align"].items() if k.startswith("llm.")}
    assert llm_align.keys() == ckpt["lm"].keys()
    assert all(torch.equal(llm_align[k], ckpt["lm"][k]) for k in llm_align)        # align froze the LLM
    # ... and the parts that were trained did change
    assert not torch.equal(ckpt["instruct"]["llm.tok_emb.weight"], ckpt["align"]["llm.tok_emb.weight"])
    proj = [k for k in ckpt["align"] if k.startswith("projector.")]
    assert proj and not all(torch.equal(ckpt["instruct"][k], ckpt["align"][k]) for k in proj)


def test_instruct_names_the_regions_at_the_visual_tokens_length_and_trains_them(tiny_run):
    cfg = replace(tiny_run.cfg, out_dir=str(tiny_run.out))
    align = load_checkpoint(str(tiny_run.out / "align.pt"))["model"]
    assert not align["regions.weight"].any()  # align leaves them out: zeros add nothing
    tok = Tokenizer.from_state(load_checkpoint(str(tiny_run.out / "lm.pt"))["tokenizer"])
    model = train.build_model("instruct", cfg, tok, "cpu")
    # the visual tokens without their names: as long, on average, as each name now is
    images = batches.vlm_batch(cfg, tok, "instruct", 0, 0, model.num_image_tokens, 16)["images"]
    with torch.no_grad():
        plain = model.projector(model.vision(images, keep_cls=False)).norm(dim=-1).mean()
    emb = model.llm.tok_emb.weight.detach()  # align's, that is lm.pt's, embeddings
    for k, region in enumerate(shapes.REGIONS):  # 3x3 visual tokens: token k names region k
        name = emb[tok.encode(" " + region)].sum(0)
        torch.testing.assert_close(model.regions.weight[k], plain * name / name.norm())
    trained = load_checkpoint(str(tiny_run.out / "instruct.pt"))["model"]["regions.weight"]
    assert not torch.equal(trained, model.regions.weight)  # and instruct trained them from there


def test_checkpoints_rebuild_the_model_from_their_own_config(tiny_run):
    """A stage checkpoint is self-contained: its config and tokenizer rebuild a model that
    loads its weights strictly, and every stage saved the same tokenizer."""
    ckpt = load_checkpoint(str(tiny_run.out / "instruct.pt"))
    cfg = Config(**ckpt["config"])
    tok = Tokenizer.from_state(ckpt["tokenizer"])
    model = VLM(train.vlm_config(cfg, tok))
    model.load_state_dict(ckpt["model"])             # strict: every key, every shape
    assert ckpt["stage"] == "instruct" and cfg.lm_steps == 60 and cfg.out_dir == str(tiny_run.out)
    # all stages share the tokenizer trained once at the start
    for stage in ("clip", "lm", "align"):
        other = Tokenizer.from_state(load_checkpoint(str(tiny_run.out / f"{stage}.pt"))["tokenizer"])
        assert other.ranks == tok.ranks


def test_lora_instruct_stage_changes_only_low_rank_parts_and_saves_a_plain_model(tiny_run, tmp_path):
    """--lora_rank=4 on the instruct stage, from the tiny run's align.pt: the saved instruct.pt
    loads strictly into a VLM without adapters (generate.py's path), every LLM weight without
    an adapter (embedding, norms) is align's bit for bit, and each adapted matrix moved by a
    change of rank <= 4 (the merged B·A): the base weights themselves never trained."""
    for name in ("tokenizer.json", "clip.pt", "lm.pt", "align.pt"):
        (tmp_path / name).write_bytes((tiny_run.out / name).read_bytes())
    train.main(["--config=tiny", "--out_dir", str(tmp_path), "--stage=instruct", "--lora_rank=4", *RUN_FLAGS])
    before = load_checkpoint(str(tmp_path / "align.pt"))["model"]
    ckpt = load_checkpoint(str(tmp_path / "instruct.pt"))
    model, _, _ = generate.load_vlm(str(tmp_path / "instruct.pt"))  # strict load into a plain VLM
    after = ckpt["model"]
    assert after.keys() == before.keys()
    adapted = [k for k in after if re.search(r"^llm\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.w[123])\.weight$", k)]
    assert len(adapted) == 5 * tiny_run.cfg.llm_layers
    for key in after:
        if key.startswith("llm.") and key not in adapted:
            assert torch.equal(after[key], before[key]), key
    for key in adapted:
        delta = (after[key] - before[key]).double()
        assert delta.abs().max() > 0, key
        assert torch.linalg.matrix_rank(delta, rtol=1e-6).item() <= 4, key
    D, F_, L = tiny_run.cfg.llm_dim, tiny_run.cfg.llm_ffn_hidden, tiny_run.cfg.llm_layers
    n_projector = sum(v.numel() for k, v in before.items() if k.startswith(("projector.", "regions.")))  # + region names
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    # attention q,k,v,o (no GQA in tiny: 3D and D wide) and SwiGLU's three: r·(in + out) each
    assert metrics["instruct_trainable_params"] == L * 4 * ((D + 3 * D) + 2 * D + 3 * (D + F_)) + n_projector


# ----------------------------------------------------------------------------- checkpoints and --resume

# a whole pipeline in a few seconds: every stage long enough to be cut in the middle
RESUME_FLAGS = ["--config=tiny", "--clip_steps=12", "--lm_steps=30", "--align_steps=8", "--instruct_steps=12",
                "--checkpoint_every=5", "--log_every=1", "--eval_clip_scenes=20", "--eval_retrieval=10",
                "--eval_questions=14", "--eval_pope=4", "--eval_grounding=2", "--eval_captions=2"]


def train_process(out, *args):
    """train.py in a subprocess, one thread (bit-identical runs), stdout line by line."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *RESUME_FLAGS, "--out_dir", str(out), *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stage_files(out):
    return {stage: load_checkpoint(str(out / f"{stage}.pt")) for stage in train.STAGES}


def test_a_run_killed_mid_stage_and_resumed_equals_the_uninterrupted_run(tmp_path):
    """SIGKILL in the middle of the lm stage, then --resume: clip is skipped (finished),
    lm continues from its last checkpoint, align and instruct run afresh; every per-step loss,
    every final weight and metrics.json (but timings) equal the uninterrupted run's, bit for bit."""
    whole = tmp_path / "whole"
    run = train_process(whole, "--resume")       # --resume with nothing saved starts from the beginning
    _, err = run.communicate()
    assert run.returncode == 0, err

    cut = tmp_path / "cut"
    run = train_process(cut)
    for line in run.stdout:
        if re.match(r"lm step\s+7/30", line):    # the checkpoint of step 5 is on disk; kill during step 8
            run.kill()                           # SIGKILL: no clean-up code of any kind runs
            break
    run.wait()
    interrupted = load_checkpoint(str(cut / "lm.pt"))
    assert run.returncode == -9 and "metrics" not in interrupted and interrupted["step"] % 5 == 0
    assert not (cut / "align.pt").exists()
    run = train_process(cut, "--resume")
    out, err = run.communicate()
    assert run.returncode == 0, err
    assert "clip: finished in an earlier run, skipped" in out and f"lm: resuming at step {interrupted['step']}" in out

    a, b = stage_files(whole), stage_files(cut)
    for stage in train.STAGES:
        assert a[stage]["losses"] == b[stage]["losses"], stage       # floats, compared exactly
        assert a[stage]["model"].keys() == b[stage]["model"].keys()
        assert all(torch.equal(a[stage]["model"][k], b[stage]["model"][k]) for k in a[stage]["model"]), stage
    assert len(a["lm"]["losses"]) == 30 and a["lm"]["losses"][:interrupted["step"]] == interrupted["losses"]
    untimed = lambda out: {k: v for k, v in json.loads((out / "metrics.json").read_text()).items()
                           if not k.endswith("_seconds")}
    assert untimed(whole) == untimed(cut) and "vqa_acc" in untimed(whole)


def test_resume_refuses_another_config_and_mixed_runs(tiny_run, tmp_path):
    """--resume continues a run with its own config; a stage never starts from an unfinished
    checkpoint or from one with another tokenizer. Each is one line naming the file."""
    out = tmp_path / "run"
    out.mkdir()
    for name in ("clip.pt", "lm.pt", "tokenizer.json"):
        (out / name).write_bytes((tiny_run.out / name).read_bytes())
    flags = ["--config=tiny", "--out_dir", str(out), *RUN_FLAGS]
    with pytest.raises(ConfigError, match=re.escape(f"{out / 'clip.pt'}: written with --clip_steps=40, not 41")):
        train.main([*flags, "--resume", "--clip_steps=41"])

    lm = load_checkpoint(str(out / "lm.pt"))
    save_checkpoint(str(out / "lm.pt"), {k: v for k, v in lm.items() if k != "metrics"} | {"step": 20})
    with pytest.raises(ConfigError, match=re.escape(f"{out / 'lm.pt'}: the lm stage stopped at step 20; "
                                                    "finish it with --resume")):
        train.main([*flags, "--stage=align"])

    save_checkpoint(str(out / "lm.pt"), lm)
    with pytest.raises(ConfigError, match=re.escape(f"{out / 'lm.pt'} was written by another config (size mismatch")):
        train.main([*flags, "--stage=align", "--llm_dim=96"])
    other = Tokenizer(train_bpe(["a completely different text"], 300))
    other.save(str(out / "tokenizer.json"))
    with pytest.raises(ConfigError, match=re.escape(f"{out / 'clip.pt'}: its tokenizer does not match")):
        train.main([*flags, "--stage=align"])
    (out / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match="tokenizer.json: not a tokenizer file"):
        train.main([*flags, "--stage=align"])



def test_a_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
    """The loss turns NaN at step 5: the loop stops before that update, with a message naming
    the step, and the checkpoint of step 4 (checkpoint_every=2) is on disk, whole and finite."""
    cfg = Config(checkpoint_every=2, log_every=1000, warmup_frac=0.0)
    model = torch.nn.Linear(4, 1)
    path = str(tmp_path / "toy.pt")
    get_batch = lambda step, micro: {"x": torch.randn(8, 4), "bad": torch.tensor(step == 5)}
    loss_fn = lambda m, b: m(b["x"]).pow(2).mean() + (torch.nan if b["bad"] else 0.0)
    save = lambda state: save_checkpoint(path, {"model": model.state_dict(), **state})
    with pytest.raises(train.TrainingError, match=r"toy: loss is nan at step 5; stopped, the last checkpoint is kept"):
        train.train_loop(model, get_batch, loss_fn, name="toy", groups=[(model.parameters(), 0.1)], steps=10,
                         batch_size=8, cfg=cfg, device="cpu", dtype=torch.float32, save=save)
    saved = load_checkpoint(path)
    assert saved["step"] == 4 and len(saved["losses"]) == 4 and all(math.isfinite(x) for x in saved["losses"])
    assert all(torch.isfinite(t).all() for t in saved["model"].values())

    # the same, as a user sees it: a learning rate that blows the weights up is one line, exit 1
    result = subprocess.run([sys.executable, "train.py", "--config=tiny", "--stage=lm", "--lm_lr=1e30",
                             "--checkpoint_every=1", "--out_dir", str(tmp_path / "run")],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert re.match(r"error: lm: loss is (nan|inf) at step (\d+); stopped, the last checkpoint is kept", result.stderr)
    step = int(re.search(r"at step (\d+)", result.stderr).group(1))
    assert load_checkpoint(str(tmp_path / "run" / "lm.pt"))["step"] == step


# ----------------------------------------------------------------------------- stages that must learn


def recording(monkeypatch):
    """Patch train.train_loop to keep each stage's losses; no evaluation afterwards."""
    seen = {}
    train_loop = train.train_loop
    monkeypatch.setattr(train, "train_loop", lambda *a, **k: seen.setdefault(k["name"], train_loop(*a, **k)))
    monkeypatch.setattr(train, "evaluate_stage", lambda *a, **k: {})
    return seen


def test_clip_stage_overfits_one_batch(tmp_path, monkeypatch):
    # On fresh batches the tiny CLIP sits at the collapsed value ln(B) for its whole 40 steps
    # (all image embeddings start with pairwise cosine ~0.999), so this checks that the stage
    # can learn at all: one fixed batch of 8 pairs, 80 steps, loss from ln 8 = 2.08 to below
    # half of that (measured: 2.26 -> 0.63, mean of the last 5). A collapsed model stays at ln 8.
    cfg = parse_flags(Config, ["--config=tiny", "--out_dir", str(tmp_path), "--clip_batch_size=8",
                               "--clip_steps=80", "--log_every=1000"], PRESETS)
    tok = get_tokenizer(cfg)
    clip_batch = batches.clip_batch
    monkeypatch.setattr(batches, "clip_batch", lambda cfg, tok, step, micro, share: clip_batch(cfg, tok, 0, 0, share))
    seen = recording(monkeypatch)
    torch.manual_seed(0)
    train.train_stage("clip", cfg, tok, "cpu", torch.float32)
    losses = seen["clip"]
    assert losses[0] == pytest.approx(math.log(8), abs=0.5)
    assert sum(losses[-5:]) / 5 < 0.5 * math.log(8), losses[::10]


@pytest.mark.parametrize("projector", ["mlp", "resampler"])
def test_instruct_stage_learns_to_read_the_image(tmp_path, monkeypatch, projector):
    """The instruct stage (its batches, the image/sample pairing, the trained projector + LLM and
    the frozen ViT) learns an answer that only the image holds: "What colour is the <shape>?"
    about one-object scenes. Afterwards the loss on test scenes must be far lower with each
    sample's own image than with a blank image or with another sample's image.

    Why not the tiny pipeline itself: after all four tiny stages the instruct loss is the same
    to 4 decimals with real, blank and shuffled images (measured 1.2917 / 1.2917 / 1.2916;
    still equal after 600 instruct steps at 3e-3, 95 s), and with the default pixel_shuffle
    projector even this one-question task is not learned in 150 steps (0.361 / 0.361). The
    mlp projector from a fresh ViT learns it in 120 steps (measured over seeds 0, 1, 2: real
    0.19 / 0.17 / 0.22, blank 0.41 / 0.61 / 0.48, shuffled 0.62 / 0.71 / 0.69), and so does the
    resampler with its 16 queries (real 0.074 / 0.067 / 0.054, blank 0.54 / 0.84 / 0.50, shuffled
    0.79 / 0.89 / 1.04; its training loss falls from 5.8 to 0.1).
    Measured with 64x64 images in 8x8 patches through the patch stem, kept here: a fresh conv
    stem, frozen and so in eval mode, normalises by BatchNorm's initial statistics (mean 0,
    variance 1), which shrink the picture ~36x over its four convolutions (real = blank =
    shuffled to 6 digits; the clip stage hands over real statistics), and a fresh ViT's 9
    tokens of 16x16 patches are not read in 120 steps (0.378 / 0.381 / 0.381)."""
    # without region names: instruct would start them as long as the visual tokens of align's
    # projector, which here is a fresh one whose tokens carry nothing yet
    cfg = parse_flags(Config, ["--config=tiny", "--image_size=64", "--patch_size=8", "--vit_stem=patch", "--out_dir", str(tmp_path), "--max_objects=1",
                               f"--projector={projector}", "--region_names=false",
                               "--instruct_steps=120", "--instruct_lr=3e-3", "--instruct_projector_lr=3e-3",
                               "--log_every=1000"], PRESETS)
    tok = get_tokenizer(cfg)
    torch.manual_seed(cfg.seed)
    start = VLM(train.vlm_config(cfg, tok))   # what align would hand over: here a fresh model
    save_checkpoint(str(tmp_path / "align.pt"), {"model": start.state_dict(), "tokenizer": tok.state(),
                                                         "metrics": {}})  # a finished stage

    def colour_question(scene, rng, *n_turns):
        (obj,) = scene.objects
        return [(f"What colour is the {obj.shape}?", obj.colour)]
    monkeypatch.setattr(batches, "instruct_turns", colour_question)
    seen = recording(monkeypatch)
    model, _, _ = train.train_stage("instruct", cfg, tok, "cpu", torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(model.vision.state_dict().values(), start.vision.state_dict().values()))

    batch = batches.vlm_batch(cfg, tok, "instruct", 0, 0, model.num_image_tokens, 64, split="test")
    with torch.no_grad():
        loss = lambda images: model(batch["input_ids"], images, batch["attention_mask"], batch["labels"])[1].item()
        real, blank, shuffled = loss(batch["images"]), loss(torch.ones_like(batch["images"])), loss(batch["images"].roll(1, 0))
    assert real < 0.7 * blank and real < 0.7 * shuffled, (real, blank, shuffled)
    assert seen["instruct"][-1] < 0.5 * seen["instruct"][0]


def test_short_clip_run_learns_colour_zero_shot(tmp_path):
    """A learning check for CLIP on the real shapes world: 200 steps of a small CLIP
    (ViT 64 wide x 2, single-object scenes) must classify colour zero-shot on 100 held-out
    scenes far above chance (1/6). Measured: 0.53 in 14 s; a model that learned nothing
    scores about 0.17, and 35 or more right out of 100 at p = 1/6 has probability < 1e-5."""
    cfg = parse_flags(Config, ["--config=tiny", "--out_dir", str(tmp_path), "--clip_steps=200",
                               "--clip_single_object_prob=1", "--vit_width=64", "--vit_heads=2",
                               "--text_width=64", "--embed_dim=64", "--clip_batch_size=32",
                               "--log_every=1000"], PRESETS)
    tok = get_tokenizer(cfg)
    torch.manual_seed(cfg.seed)
    _, _, metrics = train.train_stage("clip", cfg, tok, "cpu", torch.float32)
    assert metrics["clip_zero_shot_colour_acc"] >= 0.35, metrics


def test_per_answer_loss_weighs_every_answer_once():
    """--loss_per_answer: the mean over answers of each answer's mean token loss, checked
    against a loop that finds the answers by hand (runs of labelled targets). A long answer
    no longer outweighs a short one: with one 1-token and one 3-token answer, the plain
    token mean weighs them 1:3, this loss 1:1."""
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 11)
    labels = torch.tensor([[-100, -100, 4, -100, -100, 5, 6],
                           [-100, 1, 2, 3, -100, -100, -100]])
    # position t predicts labels[t + 1]; answers are runs of labelled targets
    answers = [[(0, 1, 4)], [(0, 4, 5), (0, 5, 6)], [(1, 0, 1), (1, 1, 2), (1, 2, 3)]]
    per_answer = []
    for tokens in answers:
        losses = [-torch.log_softmax(logits[b, t], -1)[y] for b, t, y in tokens]
        per_answer.append(sum(losses) / len(losses))
    expected = sum(per_answer) / len(per_answer)
    assert per_answer_loss(logits, labels).item() == pytest.approx(expected.item(), abs=1e-6)
    # the token mean differs whenever answer lengths differ
    token_mean = sum(sum(-torch.log_softmax(logits[b, t], -1)[y] for b, t, y in a) for a in answers) / 6
    assert abs(token_mean.item() - expected.item()) > 1e-3


def test_by_length_chunks_keep_every_sample_with_its_images_and_give_the_same_loss_and_gradient():
    """train.by_length sorts a batch by length and cuts each chunk to its longest row: every
    sample comes back once, with its own ids, labels and images (none, one or two here), and
    the chunks' loss, each chunk's mean weighted by its targets, is the whole batch's loss to
    float precision, with the same gradient; the chunks hold fewer tokens."""
    torch.manual_seed(0)
    cfg = replace(Config(), **PRESETS["tiny"])
    tok = Tokenizer({bytes([b]): b for b in range(256)})
    model = VLM(train.vlm_config(cfg, tok)).eval()  # the ViT's BatchNorm at its statistics, as when frozen
    n = model.num_image_tokens
    world = batches.world_config(cfg)
    scenes = [shapes.make_scene("train", i, world) for i in range(6)]
    samples = [batches.fit_turns(tok, scenes[i:i + k], [("Which colours?" + "?" * 7 * i, "red" * (i + 1))], n, cfg)
               for i, k in enumerate((1, 0, 2, 1, 0, 1))]
    batch = data.collate(samples, tok.pad_id)
    chunks = train.by_length(batch, 3)
    assert len(chunks) == 3 and sum(c["input_ids"].size(0) for c in chunks) == len(samples)
    seen = []
    for c in chunks:
        assert c["attention_mask"][:, -1].any()  # cut to its longest row
        first = 0
        for row in range(c["input_ids"].size(0)):
            ids = c["input_ids"][row][c["attention_mask"][row].bool()].tolist()
            i = next(i for i, s in enumerate(samples) if s["input_ids"] == ids)
            views = samples[i]["images"]
            assert int(c["views"][row]) == (0 if views is None else len(views))
            if views is not None:
                assert torch.equal(c["images"][first:first + len(views)], views)
                first += len(views)
            seen.append(i)
    assert sorted(seen) == list(range(len(samples)))
    assert sum(c["input_ids"].numel() for c in chunks) < batch["input_ids"].numel()
    grads = []
    for k in (1, 3):
        model.zero_grad()
        loss = train.token_loss(model, batch, chunks=k)
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5)
    assert len(grads[0][1]) == len(grads[1][1])
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(grads[0][1], grads[1][1]))


# ----------------------------------------------------------------------------- fp16, every preset


def test_fp16_steps_whose_gradients_overflow_are_skipped():
    """The fp16 path (a T4 has no bf16): GradScaler multiplies the loss by 2^16 before backward.
    Here w = 1 (4 weights), x = 1 (2 rows), loss = sum(x w): each weight's gradient is 2, so
    2 x 65536 and 2 x 32768 overflow fp16 (max 65504) and those two steps must be skipped (the
    scale halves each time, the weights and AdamW's state stay untouched); at 16384 the third
    step is AdamW's first: w <- w (1 - lr wd) - lr, since its first update is lr x m/sqrt(v) = lr.
    Without the scaler the inf gradients would turn the weights into NaN."""
    cfg = Config(warmup_frac=0.0, log_every=1000)
    model = torch.nn.Linear(4, 1, bias=False)
    torch.nn.init.ones_(model.weight)
    at_step_start = []

    def get_batch(step, micro):
        at_step_start.append(model.weight.detach().clone())
        return {"x": torch.ones(2, 4)}

    losses = train.train_loop(model, get_batch, lambda m, b: m(b["x"]).float().sum(), name="fp16",
                              groups=[(model.parameters(), 0.1)], steps=3, batch_size=2, cfg=cfg, device="cpu",
                              dtype=torch.float16)
    assert losses == [8.0, 8.0, 8.0]
    assert all(torch.equal(w, torch.ones(1, 4)) for w in at_step_start)  # steps 0 and 1 changed nothing
    lr = 0.1 * train.lr_at(2, 3, cfg)
    torch.testing.assert_close(model.weight.detach(), torch.full((1, 4), (1 - lr * cfg.weight_decay) - lr))


@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "tiny"])
def test_every_preset_builds_and_trains_a_step_of_every_stage(preset, tmp_path, monkeypatch):
    """The real towers of each preset (colab: the default's 9 visual tokens, an LLM 384 wide x 6)
    build, train one step of every stage on a batch of 2, hand their checkpoints to the next
    stage and evaluate; the shapes come from the preset. The CLIP linear probes embed 2,000
    scenes whatever the flags (minutes for colab's ViT on this CPU), so they are skipped here."""
    monkeypatch.setattr(evaluate, "linear_probes", lambda *a, **k: {})
    flags = [f"--config={preset}", f"--out_dir={tmp_path}", "--tokenizer_scenes=50", "--log_every=1000",
             "--eval_clip_scenes=10", "--eval_retrieval=4", "--eval_questions=7", "--eval_pope=2", "--eval_grounding=2",
             "--eval_captions=2", "--eval_batch_size=8"]
    flags += [f"--{s}_steps=1" for s in train.STAGES] + [f"--{s}_batch_size=2" for s in train.STAGES]
    train.main(flags)
    ckpt = load_checkpoint(str(tmp_path / "instruct.pt"))
    cfg = Config(**ckpt["config"])
    assert asdict(cfg) == asdict(parse_flags(Config, flags, PRESETS))
    model = VLM(train.vlm_config(cfg, Tokenizer.from_state(ckpt["tokenizer"])))
    model.load_state_dict(ckpt["model"])
    expected = {"cpu": (9, 9, 192), "colab": (9, 9, 384)}[preset]  # patches, image tokens, LLM width
    assert (model.cfg.vision.num_patches, model.num_image_tokens, model.cfg.llm.dim) == expected
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert math.isfinite(metrics["lm_val_loss"]) and "vqa_acc" in metrics
