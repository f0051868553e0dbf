"""
train.py — the one entry point: CLIP pretraining, a tiny LLM, then LLaVA's two stages.

    python train.py                        # all four stages, CPU default config, writes out/
    python train.py --stage clip           # one stage, from the checkpoints before it
    python train.py --config=tiny          # the whole pipeline in about half a minute
    python train.py --clip_steps=200 --device=cpu   # any config field is a flag (flags.py)
    python train.py --export=shapes_data            # the shapes world as PNG + LLaVA JSON files
    python train.py --caption_data=captions.json --instruct_data=instruct.json   # your own data (user_data.py)
    python train.py --config=colab --compile        # one 16 GB GPU (a Colab T4): bigger towers, longer stages
    torchrun --nproc_per_node=2 train.py   # DDP (distributed.py): each rank builds half of every batch

The stages (LLaVA = "Visual Instruction Tuning", Liu et al. 2023, arXiv:2304.08485), each
a row of the STAGES table below, which says what it trains and freezes, on which data, with
which loss, learning rates, steps and batch size, and how it is scored:
  clip      ViT + text tower learn a joint embedding from image-caption pairs
            ("Learning Transferable Visual Models From Natural Language Supervision",
            Radford et al. 2021, arXiv:2103.00020)
  lm        the decoder LLM learns the world's language from text alone
  align     LLaVA stage 1: only the projector trains (ViT and LLM frozen), image -> caption
  instruct  LLaVA stage 2: projector + LLM train on multi-turn visual conversations

Every stage writes out/<stage>.pt (config + weights + tokenizer; checkpoint.py) and adds its
figures to out/metrics.json (one flat JSON object; fractions in [0, 1]; timings end in
_seconds). The training step itself is train_loop: forward, backward, clipping, AdamW.

Run the tests:  python -m pytest -q tests/test_train.py
"""

import functools
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import batches
import checkpoint
import data
import distributed
import evaluate
import shapes
import user_data
from clip import CLIP, CLIPConfig
from flags import ConfigError, parse_flags, tile_grids
from model import LLMConfig, VLM, VLMConfig, add_lora, merge_lora, per_answer_loss
from vit import ViTConfig


@dataclass
class Config:
    # run
    stage: str = "all"            # clip | lm | align | instruct | all
    out_dir: str = "out"
    device: str = "auto"          # auto (cuda if present, else cpu) | cpu | cuda
    dtype: str = "auto"           # auto (bf16 on capable GPUs, fp16 on others, fp32 on CPU) | float32 | bfloat16 | float16
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 100   # a stage saves its checkpoint every N steps, and at its end
    resume: bool = False          # continue the run in out_dir: finished stages are skipped,
                                  # a stage cut short goes on from its last checkpoint
    compile: bool = False         # torch.compile the model for training (worth it on a GPU, after ~1 min of compiling)
    data_workers: int = -1        # processes building batches ahead of the step; -1: 2 on CUDA, 0 (in the loop) on CPU
    # the shapes world
    image_size: int = 48                  # the encoder's input side: every image (or tile) is squashed to it
    max_objects: int = 3
    world_size: int = 64                  # the world's canvas side; 0: image_size (a larger one is downscaled,
                                          # or tiled with tile_grids)
    object_scale: float = 1.0             # < 1: smaller shapes (a high-resolution world of small objects)
    # your own data instead of the shapes world: LLaVA JSON / JSONL (docs/own-data.md)
    caption_data: str = ""        # image-caption rows: clip and align (and instruct, without --instruct_data)
    instruct_data: str = ""       # conversations: instruct
    image_folder: str = ""        # where relative image paths point; default: each data file's own folder
    vision_from: str = ""         # a clip.pt / align.pt / instruct.pt whose ViT (and projector) replace the clip stage
    holdout: int = 100            # rows of each data file kept out of training and scored at the end
    export: str = ""              # write the shapes world to this folder as PNG + LLaVA JSON, then stop
    export_scenes: int = 5000
    # tokenizer: a byte-level BPE trained on the world's text
    vocab_size: int = 512
    tokenizer_scenes: int = 2000
    # vision tower (ViT) and CLIP's text tower
    patch_size: int = 16                  # 48 / 16: a 3x3 grid of patches, one per region of the world
    vit_stem: str = "conv"                # patch (one linear map per patch, the ViT paper's) | conv (vit.ConvStem)
    vit_width: int = 128
    vit_depth: int = 4
    vit_heads: int = 4
    vit_cls: bool = True
    text_width: int = 128
    text_depth: int = 2
    text_heads: int = 4
    embed_dim: int = 128
    context_length: int = 32
    # stage clip
    clip_steps: int = 1600
    clip_batch_size: int = 64
    clip_lr: float = 1e-3
    clip_drop_prob: float = 0.5           # each size and position word of a caption is left out with this probability
    clip_drop_colour: bool = False        # colour words too (then CLIP learns colour or shape, not both)
    clip_single_object_prob: float = 0.5  # share of single-object scenes: shape must be seen alone too
    clip_hard_negative_prob: float = 0.0  # share of scenes that bring a twin with one shape changed
    # decoder LLM
    llm_dim: int = 192
    llm_layers: int = 4
    llm_heads: int = 4
    llm_kv_heads: int = 4
    llm_ffn_hidden: int = 512
    max_seq_len: int = 256
    # stage lm
    lm_steps: int = 300
    lm_batch_size: int = 16
    lm_lr: float = 2e-3
    lm_context: bool = True               # the scene in words before the questions: the LLM learns to read its context
    # VLM: how vision meets language
    projector: str = "mlp"                # linear | mlp | pixel_shuffle | resampler
    tile_grids: str = ""                  # any-res tiling: allowed grids "RxC,..." (e.g. "1x2,2x1,2x2"), up to 4x4;
                                          # "": one squashed view per image
    resampler_queries: int = 16           # projector=resampler: learned queries = visual tokens per image
    shuffle_factor: int = 2               # projector=pixel_shuffle: s x s patches fold into one visual token
    vision_layer: int = -1                # which ViT block's hidden states feed the projector
    region_names: bool = True             # instruct adds to each visual token a learned vector that starts as
                                          # its 3x3 region's name in the LLM's words (model.RegionNames)
    # stage align (LLaVA stage 1)
    align_steps: int = 300
    align_batch_size: int = 32
    align_lr: float = 2e-3
    # stage instruct (LLaVA stage 2): per-module learning rates
    instruct_steps: int = 1400
    instruct_batch_size: int = 16
    instruct_lr: float = 1e-3             # the LLM
    instruct_projector_lr: float = 2e-3   # the projector
    instruct_vision_lr: float = 0.0       # the ViT: 0 keeps it frozen, as LLaVA does
    instruct_turns: int = 4               # questions per conversation: answers per image per forward pass
    loss_per_answer: bool = False         # align/instruct: each answer weighs the same, not each token
    two_image_share: float = 0.0          # instruct: share of samples that are two-image conversations
    question_types: str = ""              # instruct and VQA evaluation: only these shapes.QUESTION_TYPES,
                                          # comma-separated (e.g. "colour,shape"); "": all, POPE and conversations
    lora_rank: int = 0                    # instruct: > 0 trains LoRA adapters of this rank (at instruct_lr)
                                          # instead of the whole LLM; merged into the weights at the end
    lora_alpha: float = 16.0              # LoRA's update is scaled by lora_alpha / lora_rank
    # optimisation, shared by every stage
    warmup_frac: float = 0.05
    min_lr_frac: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    grad_accum: int = 1
    length_chunks: int = 1                # > 1: a micro-batch runs as this many chunks of similar length (by_length):
                                          # the same loss with less padding; 4 makes one-thread steps ~15 % faster
                                          # here, two-thread steps no faster (bench.py measures both ways)
    # evaluation on the test split
    eval_clip_scenes: int = 1000
    eval_retrieval: int = 100
    eval_questions: int = 1000
    eval_pope: int = 300                  # per negative kind, balanced yes/no
    eval_grounding: int = 200
    eval_captions: int = 200
    eval_two_image: int = 200             # two-image questions (when two_image_share > 0)
    eval_batch_size: int = 100


PRESETS = {
    "cpu": {},
    "tiny": dict(
        tokenizer_scenes=200, vocab_size=320, vit_width=32, vit_depth=2, vit_heads=2,
        text_width=32, text_depth=1, text_heads=2, embed_dim=32,
        clip_steps=40, clip_batch_size=32, llm_dim=64, llm_layers=2, llm_heads=2, llm_kv_heads=2,
        llm_ffn_hidden=172, lm_steps=40, align_steps=30, instruct_steps=60,
        lm_batch_size=16, align_batch_size=16, instruct_batch_size=16, log_every=20,
        eval_clip_scenes=100, eval_retrieval=50, eval_questions=100, eval_pope=40,
        eval_grounding=20, eval_captions=20, eval_batch_size=50,
    ),
    # One 16 GB GPU, sized for a Colab T4 (docs/gpu.md's time is an estimate until run on one).
    # The CPU default's recipe (48x48 input, 16x16 patches through the conv stem: the 3x3 regions,
    # one visual token each), with towers 2x wider and deeper and about 4x the steps.
    "colab": dict(
        vit_width=256, vit_depth=6, vit_heads=8, text_width=256, text_depth=4, text_heads=8, embed_dim=256,
        clip_steps=3000, clip_batch_size=128, clip_lr=5e-4,
        llm_dim=384, llm_layers=6, llm_heads=6, llm_kv_heads=6, llm_ffn_hidden=1024,
        lm_steps=1000, lm_batch_size=32, lm_lr=1e-3, align_steps=1000, align_batch_size=64, align_lr=1e-3,
        instruct_steps=4000, instruct_batch_size=32, instruct_lr=5e-4, instruct_projector_lr=1e-3,
        log_every=100,
    ),
}


@dataclass(frozen=True)
class Stage:
    """What one stage does, one row of STAGES: the stage code reads it, never a stage's name."""
    model: str          # "clip" (CLIP's two towers) or "vlm" (ViT + projector + LLM)
    trains: dict        # part -> the Config field of its learning rate ("": the whole model); the rest is frozen
    starts_from: tuple  # the earlier stages whose trained parts it starts from (none: fresh weights)
    saves: str          # the part its checkpoint holds ("": the whole model)
    data: str           # a sample (batches.py): "pairs" (image, caption), "text" (a conversation without its
                        # image), "captions" (image -> caption), "conversations" (images -> several answers)
    loss: str           # "contrastive" (CLIP's), "tokens" (every token a target), "answers" (each answer's
                        # tokens; --loss_per_answer: each answer weighs the same)
    steps: str          # Config field: optimizer steps
    batch_size: str     # Config field: samples per micro-batch; a step takes grad_accum micro-batches
    metrics: object     # f(model, tok, cfg, device): the figures it adds to metrics.json
    held_out: object    # f(model, tok, rows, cfg, device): the same on your held-out rows (None: none)
    optional: dict = field(default_factory=dict)  # part -> lr field: trains only when that lr > 0
    lora: bool = False  # --lora_rank > 0 trains LoRA adapters in place of the whole LLM


STAGES = {
    "clip": Stage(  # contrastive pretraining of both towers
        model="clip", trains={"": "clip_lr"}, starts_from=(), saves="", data="pairs", loss="contrastive",
        steps="clip_steps", batch_size="clip_batch_size",
        metrics=evaluate.evaluate_clip, held_out=evaluate.held_out_retrieval),
    "lm": Stage(  # the LLM alone, on text; ViT and projector are not used
        model="vlm", trains={"llm": "lm_lr"}, starts_from=(), saves="llm", data="text", loss="tokens",
        steps="lm_steps", batch_size="lm_batch_size",
        metrics=evaluate.lm_validation, held_out=evaluate.held_out_perplexity),
    "align": Stage(  # LLaVA stage 1: the projector learns to speak the LLM's language; ViT, LLM frozen
        model="vlm", trains={"projector": "align_lr"}, starts_from=("clip", "lm"), saves="", data="captions",
        loss="answers", steps="align_steps", batch_size="align_batch_size",
        metrics=functools.partial(evaluate.evaluate_vlm, "align"), held_out=None),
    "instruct": Stage(  # LLaVA stage 2: projector + LLM; the ViT stays frozen unless --instruct_vision_lr > 0
        model="vlm", trains={"llm": "instruct_lr", "projector": "instruct_projector_lr",
                             "regions": "instruct_projector_lr"},
        optional={"vision": "instruct_vision_lr"}, lora=True, starts_from=("align",), saves="",
        data="conversations", loss="answers", steps="instruct_steps", batch_size="instruct_batch_size",
        metrics=functools.partial(evaluate.evaluate_vlm, "instruct"), held_out=evaluate.held_out_vqa),
}


class TrainingError(RuntimeError):
    """A run that cannot go on (a NaN loss): reported in one line, its last checkpoint kept."""


# -----------------------------------------------------------------------------
# the models of a config

def clip_config(cfg, tok):
    vit = ViTConfig(image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.vit_width,
                    depth=cfg.vit_depth, heads=cfg.vit_heads, use_cls=cfg.vit_cls, stem=cfg.vit_stem)
    return CLIPConfig(vit=vit, vocab_size=tok.vocab_size, context_length=cfg.context_length,
                      text_width=cfg.text_width, text_depth=cfg.text_depth, text_heads=cfg.text_heads,
                      embed_dim=cfg.embed_dim)


def vlm_config(cfg, tok):
    llm = LLMConfig(vocab_size=tok.vocab_size, dim=cfg.llm_dim, n_layers=cfg.llm_layers,
                    n_heads=cfg.llm_heads, n_kv_heads=cfg.llm_kv_heads,
                    ffn_hidden=cfg.llm_ffn_hidden, max_seq_len=cfg.max_seq_len)
    return VLMConfig(vision=clip_config(cfg, tok).vit, llm=llm, projector=cfg.projector, shuffle_factor=cfg.shuffle_factor,
                     resampler_queries=cfg.resampler_queries, tile_grids=tile_grids(cfg),
                     vision_layer=cfg.vision_layer, region_names=cfg.region_names, image_token_id=tok.image_id)


# -----------------------------------------------------------------------------
# the losses: each a mean over the global batch, whichever rank computes it (distributed.py)

def contrastive_loss(model, batch):
    """CLIP's symmetric InfoNCE over the global batch: under torchrun each rank builds the whole
    similarity matrix from all ranks' embeddings, so every pair is a negative of all the others."""
    if distributed.world_size() == 1:
        return model(batch["images"], batch["ids"])[0]
    loss = model(batch["images"], batch["ids"], gather=distributed.gather_rows)[0]
    # Every rank now holds the same global loss L, but its backward reaches the weights only
    # through its own rows (the others' are gathered without gradient): rank r's gradient is the
    # part g_r of dL/dθ that flows through its samples, and g_1 + ... + g_N = dL/dθ. DDP averages
    # the ranks' gradients, (g_1 + ... + g_N) / N, so each rank backpropagates N·L. Its value
    # stays L (the logged loss): (N - 1)·(L - L) adds 0, and N - 1 more copies of L's gradient.
    return loss + (distributed.world_size() - 1) * (loss - loss.detach())


def by_length(batch, n_chunks):
    """The batch as up to n_chunks batches of samples of similar length, each cut to its own
    longest row: the same samples, labels and images, with less padding. A right-padded
    shapes-world batch spends a quarter of its tokens on pads; sorted into 4 chunks, under a
    tenth (bench.py measures both and the step time). A ViT trained with BatchNorm
    (--instruct_vision_lr > 0) normalises each chunk by its own statistics."""
    lengths = batch["attention_mask"].sum(1)  # (B,)
    first_view = F.pad(batch["views"].cumsum(0), (1, 0)).tolist()  # sample b's images: rows first_view[b]:[b+1]
    chunks = []
    for rows in lengths.argsort(stable=True).chunk(n_chunks):
        T = int(lengths[rows].max())
        chunk = {k: batch[k][rows, :T] for k in ("input_ids", "attention_mask", "labels")}
        views = [v for b in rows.tolist() for v in range(first_view[b], first_view[b + 1])]  # in row order
        chunk["images"] = batch["images"][views] if views else None  # (n, 3, S, S)
        chunk["views"] = batch["views"][rows]
        chunks.append(chunk)
    return chunks


def count_targets(labels):
    """Labelled targets of a batch (a tensor): position t predicts label t+1."""
    return (labels[:, 1:] != data.IGNORE_INDEX).sum()


def token_loss(model, batch, chunks=1):
    """Cross-entropy over the labelled tokens of the global batch. Batches are right-padded: under
    causal attention no real token ever sees a pad, so the model needs no padding mask and SDPA
    takes its fast causal path (pads carry no label). chunks > 1 runs the batch as by_length's
    chunks: each chunk's mean weighted by its share of the targets is the batch's mean."""
    n_targets = count_targets(batch["labels"])
    if chunks == 1 or n_targets == 0:  # a batch without targets runs whole: its NaN loss stops the run
        loss = model(batch["input_ids"], batch["images"], labels=batch["labels"])[1]
    else:  # a chunk without targets has no mean (0/0) and adds nothing
        counted = [(part, count_targets(part["labels"])) for part in by_length(batch, chunks)]
        loss = sum(model(part["input_ids"], part["images"], labels=part["labels"])[1] * n
                   for part, n in counted if n > 0) / n_targets
    return distributed.share_of_mean(loss, n_targets)


def answer_loss(model, batch):
    """--loss_per_answer: per_answer_loss averaged over the answers of the global batch."""
    loss = per_answer_loss(model(batch["input_ids"], batch["images"])[0], batch["labels"])
    labelled = batch["labels"][:, 1:] != data.IGNORE_INDEX  # (B, T - 1) targets; an answer is a run of them
    return distributed.share_of_mean(loss, (labelled & ~F.pad(labelled[:, :-1], (1, 0), value=False)).sum())


def loss_function(stage, cfg):
    """The loss_fn(model, batch) of a stage: its STAGES loss, answers weighed per answer or per token."""
    loss = STAGES[stage].loss
    if loss == "contrastive":
        return contrastive_loss
    if loss == "answers" and cfg.loss_per_answer:
        return answer_loss
    # DDP's wrapper syncs gradients for one forward per backward: under torchrun a batch runs whole
    return functools.partial(token_loss, chunks=cfg.length_chunks if distributed.world_size() == 1 else 1)


# -----------------------------------------------------------------------------
# the training loop every stage shares

def lr_at(step, steps, cfg):
    """Linear warmup, then cosine decay to min_lr_frac of the peak (multiplier in [0, 1])."""
    warmup = max(1, int(cfg.warmup_frac * steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(groups, cfg, device):
    """AdamW with per-module learning rates; weight decay only on matrices (>= 2-D),
    never on norms, biases or the temperature."""
    param_groups = []
    for params, lr in groups:
        params = [p for p in params if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        param_groups += [dict(params=decay, lr=lr, weight_decay=cfg.weight_decay, peak_lr=lr),
                         dict(params=no_decay, lr=lr, weight_decay=0.0, peak_lr=lr)]
    return torch.optim.AdamW(param_groups, betas=(0.9, 0.95), fused=device.startswith("cuda"))


def train_mode(model):
    """model.train() for the parts that train; a frozen part keeps behaving as it will at
    inference: a frozen BatchNorm must not normalise by each batch nor update its statistics."""
    model.train()
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if own and not any(p.requires_grad for p in own):
            module.eval()


def train_loop(model, get_batch, loss_fn, *, name, groups, steps, batch_size, cfg, device, dtype,
               resume=None, save=None):
    """Run `steps` optimizer steps on [(parameters, learning rate)] groups; returns each step's loss.
    get_batch(step, micro): that micro-batch, a dict of tensors (a pure function of its arguments:
    runs are reproducible); loss_fn(model, batch): its loss. batch_size: samples per micro-batch, all
    ranks together. resume: a checkpoint of this loop to go on from (optimizer moments, step, losses,
    RNG). save(state): called with that state every cfg.checkpoint_every steps and at the end."""
    opt = make_optimizer(groups, cfg, device)
    autocast = torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)
    # fp16 (a T4) overflows where bf16 does not: the scaler multiplies the loss before backward,
    # divides the gradients back (unscale_, before clipping) and skips a step whose gradients hold inf
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=dtype == torch.float16)
    trainable = [p for g in opt.param_groups for p in g["params"]]
    step_model = distributed.training_model(model, cfg, device)
    losses, start = [], 0
    if resume is not None:  # the data stream needs no state: batch `step` is a pure function of step
        opt.load_state_dict(resume["optimizer"])
        scaler.load_state_dict(resume["scaler"])
        torch.set_rng_state(resume["rng"])
        losses, start = list(resume["losses"]), resume["step"]
    stream = batches.micro_batches(get_batch, range(start, steps), cfg, device)
    t0 = time.time()
    train_mode(model)
    for step in range(start, steps):
        for group in opt.param_groups:
            group["lr"] = group["peak_lr"] * lr_at(step, steps, cfg)  # each group's own peak, scheduled
        total = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum):
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in next(stream).items()}
            with distributed.gradient_sync(step_model, last_micro=micro == cfg.grad_accum - 1):
                with autocast:
                    loss = loss_fn(step_model, batch) / cfg.grad_accum  # the step's loss: the micro-batches' mean
                scaler.scale(loss).backward()  # adds into .grad: the gradients of the micro-batches sum up
            total += loss.detach()
        total = distributed.mean_over_ranks(total).item()  # one sync per step; every rank sees the same number
        if not math.isfinite(total):  # before the update, on every rank: the weights and the last checkpoint stay good
            raise TrainingError(f"{name}: loss is {total} at step {step}; stopped, the last checkpoint is kept")
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)  # one norm over all the trained weights
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)  # None, not zeros: the next backward writes instead of adding
        losses.append(total)
        if step % cfg.log_every == 0 or step == steps - 1:
            elapsed, done = time.time() - t0, step + 1 - start
            rate = done * batch_size * cfg.grad_accum / elapsed
            eta = elapsed / done * (steps - step - 1)
            print(f"{name} step {step:5d}/{steps} | loss {total:.4f} | lr {opt.param_groups[0]['lr']:.2e} "
                  f"| {rate:6.1f} samples/s | eta {eta:5.0f}s", flush=True)
        every = cfg.checkpoint_every
        if save is not None and ((every > 0 and (step + 1) % every == 0) or step + 1 == steps):
            save({"step": step + 1, "losses": losses, "optimizer": opt.state_dict(),
                  "scaler": scaler.state_dict(), "rng": torch.get_rng_state()})
    model.eval()
    distributed.check_replicas(model, name)
    return losses


# -----------------------------------------------------------------------------
# the stages, as the STAGES table says

def build_model(stage, cfg, tok, device):
    """A fresh CLIP, or a VLM whose parts come from the stages it starts from (align: the ViT of
    clip.pt, or of --vision_from with its projector, and the LLM of lm.pt; instruct: align.pt)."""
    if STAGES[stage].model == "clip":
        return CLIP(clip_config(cfg, tok), eot_id=tok.eot_id).to(device)
    model = VLM(vlm_config(cfg, tok))
    for earlier in STAGES[stage].starts_from:
        path = checkpoint.stage_path(cfg, earlier)
        if STAGES[earlier].model == "clip" and cfg.vision_from:  # an earlier run's ViT (and projector)
            checkpoint.load_vision(model, checkpoint.load_checkpoint(cfg.vision_from), cfg.vision_from)
        elif STAGES[earlier].model == "clip":  # CLIP's image tower becomes the VLM's ViT
            checkpoint.load_vision(model, checkpoint.finished_checkpoint(cfg, earlier, tok), path)
        else:
            checkpoint.load_weights(model.get_submodule(STAGES[earlier].saves),
                                    checkpoint.finished_checkpoint(cfg, earlier, tok)["model"], path)
    if "regions" in STAGES[stage].trains and model.regions is not None and not model.regions.weight.any():
        name_regions(model, cfg, tok)
    return model.to(device)


@torch.no_grad()
def name_regions(model, cfg, tok):
    """Instruct starts each visual token's RegionNames vector at its region's name, as long as
    align has made the visual tokens on average (measured on a batch of the shapes world):
    place and content then weigh the same. At half that length the LLM did not use it."""
    images = batches.vlm_batch(cfg, tok, "instruct", 0, 0, model.num_image_tokens, 16)["images"]  # 16 scenes
    model.eval()  # the frozen ViT's BatchNorm keeps its statistics
    norm = model.encode_images(images).norm(dim=-1).mean()  # regions still zero: the projector's tokens
    model.regions.name(model.llm.tok_emb.weight, [tok.encode(" " + name) for name in shapes.REGIONS], norm)


def param_groups(stage, model, cfg, adapters=None):
    """[(parameters, learning rate)] of the parts a stage trains; LoRA's adapters stand in for the LLM."""
    spec, groups = STAGES[stage], []
    lrs = {**spec.trains, **{part: f for part, f in spec.optional.items() if getattr(cfg, f) > 0}}
    for part, lr_field in lrs.items():
        if part and getattr(model, part) is None:  # a part this config leaves out (regions)
            continue
        params = adapters if part == "llm" and adapters else list(model.get_submodule(part).parameters())
        groups.append((params, getattr(cfg, lr_field)))
    return groups


def batch_source(stage, cfg, tok, user, model):
    """(get_batch(step, micro), steps) of a stage: its data from the shapes world or from your
    rows (user), this rank's share of the samples of every micro-batch (all in one process)."""
    spec = STAGES[stage]
    steps, batch_size = getattr(cfg, spec.steps), getattr(cfg, spec.batch_size)
    share = distributed.rank_share(batch_size)
    if spec.data == "pairs":
        if user is None:
            return functools.partial(batches.clip_batch, cfg, tok, share=share), steps
        return functools.partial(batches.user_clip_batch, cfg, tok, user.rows(spec.data), share=share), steps
    sizes = dict(image_tokens=model.num_image_tokens, batch_size=batch_size, share=share)
    if user is None:
        return functools.partial(batches.vlm_batch, cfg, tok, stage, **sizes), steps
    rows = user.rows(spec.data)
    if not rows:   # align without caption rows: the projector of --vision_from goes on as it is
        print(f"{stage}: no caption rows to train on; 0 steps")
        steps = 0
    return functools.partial(batches.user_vlm_batch, cfg, tok, stage, rows, **sizes), steps


def evaluate_stage(stage, model, tok, cfg, device, user):
    """A stage's figures: its STAGES metrics on the shapes world, or on your held-out rows."""
    spec = STAGES[stage]
    if user is None:
        return spec.metrics(model, tok, cfg, device)
    rows = user.rows(spec.data, held_out=True)
    return spec.held_out(model, tok, rows, cfg, device) if spec.held_out and rows else {}


def train_stage(stage, cfg, tok, device, dtype, *, resume=None, save=None, user=None):
    """Train a stage as STAGES[stage] says, then (rank 0) evaluate it: (model, losses, figures).
    resume: its checkpoint to go on from; save(module, state): checkpoint.save_stage; user: your data."""
    spec = STAGES[stage]
    model = build_model(stage, cfg, tok, device)
    adapters = None
    if spec.lora and cfg.lora_rank > 0:  # before a resume: a checkpoint taken mid-stage holds the adapters
        adapters = add_lora(model.llm, cfg.lora_rank, cfg.lora_alpha)
    saved = model.get_submodule(spec.saves)
    if resume is not None:
        checkpoint.load_weights(saved, resume["model"], checkpoint.stage_path(cfg, stage))
    groups = param_groups(stage, model, cfg, adapters)
    trained = {id(p) for params, _ in groups for p in params}
    for p in model.parameters():  # frozen towers get no gradient at all
        p.requires_grad_(id(p) in trained)
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    get_batch, steps = batch_source(stage, cfg, tok, user, model)
    losses = train_loop(model, get_batch, loss_function(stage, cfg), name=stage, groups=groups, steps=steps,
                        batch_size=getattr(cfg, spec.batch_size), cfg=cfg, device=device, dtype=dtype,
                        resume=resume, save=functools.partial(save, saved) if save else None)
    if adapters is not None:  # fold the adapters into the weights: instruct.pt holds a plain model, evaluated as such
        merge_lora(model.llm)
    if not distributed.is_main():  # rank 0 alone evaluates
        return model, losses, {}
    metrics = evaluate_stage(stage, model, tok, cfg, device, user)
    if spec.model == "vlm":  # the VLM stages train some parts of one model: how much of it
        metrics[f"{stage}_trainable_params"] = n_trained
    return model, losses, metrics


def run_stage(stage, cfg, tok, device, dtype, user=None):
    """Train one stage, or with --resume skip it (finished) or continue it (cut short); its
    checkpoint out/<stage>.pt (checkpoint.py) is written every cfg.checkpoint_every steps and at
    the end. user: your data (None: the shapes world). Returns the stage's figures."""
    resume = checkpoint.resume_point(stage, cfg, tok)
    if resume is not None and "metrics" in resume:
        print(f"{stage}: finished in an earlier run, skipped")
        return resume["metrics"]
    if resume is not None:
        print(f"{stage}: resuming at step {resume['step']}")
    torch.manual_seed(cfg.seed + list(STAGES).index(stage))  # each stage starts from its own seed, so a
    t0 = time.time()                                          # resumed run draws the same numbers
    save = functools.partial(checkpoint.save_stage, stage, cfg, tok)
    model, losses, metrics = train_stage(stage, cfg, tok, device, dtype, resume=resume, save=save, user=user)
    metrics[f"{stage}_train_seconds"] = time.time() - t0 + (resume or {}).get("seconds", 0.0)
    save(model.get_submodule(STAGES[stage].saves), {"step": len(losses), "losses": losses, "metrics": metrics,
                                                    "seconds": metrics[f"{stage}_train_seconds"]})
    return metrics


# -----------------------------------------------------------------------------
# the run

def check_flags(cfg):
    """Refuse a --stage or --question_types that does not exist, before anything runs."""
    if cfg.stage not in (*STAGES, "all"):
        raise ConfigError(f"--stage must be one of {', '.join(STAGES)}, all; not {cfg.stage!r}")
    try:  # a typo in --question_types stops the run now, not after training
        batches.focus_types(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def main(argv):
    cfg = parse_flags(Config, argv, PRESETS)
    check_flags(cfg)
    if cfg.export:
        return user_data.export_world(cfg, evaluate.vqa_items(cfg))
    user_data.check_data_flags(cfg)
    stages = list(STAGES) if cfg.stage == "all" else [cfg.stage]
    device, dtype = distributed.pick_device(cfg)
    device = distributed.init_distributed(device)
    distributed.check_batch_sizes({STAGES[s].batch_size: getattr(cfg, STAGES[s].batch_size) for s in stages})
    print(f"device {device}, dtype {str(dtype).replace('torch.', '')}")
    t0 = time.time()
    os.makedirs(cfg.out_dir, exist_ok=True)
    metrics_file = os.path.join(cfg.out_dir, "metrics.json")
    if cfg.stage == "all" and not cfg.resume and distributed.is_main() and os.path.isfile(metrics_file):
        os.remove(metrics_file)  # a new run: no figures of an old one
    tok = checkpoint.get_tokenizer(cfg)
    if cfg.vision_from:  # loaded into a model of this config now: a wrong checkpoint stops the run before any training
        checkpoint.load_vision(VLM(vlm_config(cfg, tok)), checkpoint.load_checkpoint(cfg.vision_from), cfg.vision_from)
    user = None
    if cfg.caption_data or cfg.instruct_data:  # your own data instead of the shapes world, checked before any training
        image_tokens = VLM(vlm_config(cfg, tok)).num_image_tokens
        user = user_data.load_user_data(cfg, tok, data.image_tokens_at_most(tok, image_tokens, tile_grids(cfg)))
    for stage in stages:
        if stage == "clip" and cfg.vision_from:
            print(f"clip: not trained, the ViT comes from {cfg.vision_from}")
            continue
        metrics = checkpoint.update_metrics(cfg.out_dir, run_stage(stage, cfg, tok, device, dtype, user))
    if cfg.stage == "all":
        metrics = checkpoint.update_metrics(cfg.out_dir, {"total_seconds": time.time() - t0})
    evaluate.print_table(metrics)
    distributed.finish()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ConfigError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
