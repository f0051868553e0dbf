"""
train.py — the one entry point: CLIP pretraining, a tiny LLM, then LLaVA's two stages.

    python train.py                        # all four stages, CPU default config, writes out/
    python train.py --stage clip           # one stage, from the checkpoints before it
    python train.py --config=tiny          # the whole pipeline in about half a minute
    python train.py --clip_steps=200 --device=cpu   # any config field is a flag
    python train.py --export=shapes_data            # the shapes world as PNG + LLaVA JSON files
    python train.py --caption_data=captions.json --instruct_data=instruct.json   # your own data
    python train.py --config=colab --compile        # one 16 GB GPU (a Colab T4): 128x128 images, bigger towers
    torchrun --nproc_per_node=2 train.py --grad_accum=2   # DDP: each rank runs half of every step's micro-batches

The stages (DESIGN.md; LLaVA = "Visual Instruction Tuning", Liu et al. 2023, arXiv:2304.08485):
  clip      ViT + text tower learn a joint embedding from image-caption pairs
            ("Learning Transferable Visual Models From Natural Language Supervision",
            Radford et al. 2021, arXiv:2103.00020)
  lm        the decoder LLM learns the world's language from text alone
  align     LLaVA stage 1: only the projector trains (ViT and LLM frozen), image -> caption
  instruct  LLaVA stage 2: projector + LLM train on multi-turn visual conversations

Every stage writes out/<stage>.pt (config + weights + tokenizer) and adds its figures to
out/metrics.json (one flat JSON object; fractions in [0, 1]; timings end in _seconds).
Flags: --key=value or --key value; a bare --flag sets a boolean; unknown keys are refused.

Under torchrun (DistributedDataParallel: "PyTorch Distributed: Experiences on Accelerating
Data Parallel Training", Li et al. 2020, arXiv:2006.15704) a step is the same global batch as
in one process, batch_size x grad_accum samples: rank r builds micro-batches r, r + N, ...
of the N ranks, gradients are averaged over the ranks, and rank 0 alone logs, evaluates and
writes. So grad_accum must be a multiple of the number of ranks.
"""

import contextlib
import functools
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
import evaluate
import shapes
from clip import CLIP, CLIPConfig, tokenize as clip_tokenize
from model import LLMConfig, VLM, VLMConfig, add_lora, merge_lora
from vit import ViTConfig

STAGES = ("clip", "lm", "align", "instruct")


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
    image_size: int = 64                  # the encoder's input side: every image (or tile) is squashed to it
    max_objects: int = 3
    world_size: int = 0                   # the world's canvas side; 0: image_size (a larger one is downscaled,
                                          # or tiled with tile_grids)
    object_scale: float = 1.0             # < 1: smaller shapes (a high-resolution world of small objects)
    # your own data instead of the shapes world: LLaVA JSON / JSONL (README "Train on your own data")
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
    patch_size: int = 8
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
    clip_steps: int = 1000
    clip_batch_size: int = 64
    clip_lr: float = 1e-3
    clip_drop_prob: float = 0.3           # each caption attribute but the shape noun is dropped with this probability
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
    lm_steps: int = 60
    lm_batch_size: int = 32
    lm_lr: float = 2e-3
    # VLM: how vision meets language
    projector: str = "mlp"                # linear | mlp | pixel_shuffle | resampler
    tile_grids: str = ""                  # any-res tiling: allowed grids "RxC,..." (e.g. "1x2,2x1,2x2"), up to 4x4;
                                          # "": one squashed view per image
    resampler_queries: int = 16           # projector=resampler: learned queries = visual tokens per image
    vision_layer: int = -1                # which ViT block's hidden states feed the projector
    # stage align (LLaVA stage 1)
    align_steps: int = 100
    align_batch_size: int = 32
    align_lr: float = 2e-3
    # stage instruct (LLaVA stage 2): per-module learning rates
    instruct_steps: int = 500
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
    # One 16 GB GPU, sized for a Colab T4 (about 15 minutes: the estimate is in the README).
    # 128x128 scenes cut into 8x8 patches (256 per image), pixel shuffle back down to 64 image
    # tokens, and towers 2-4x wider and deeper than the CPU default.
    "colab": dict(
        image_size=128, vit_width=256, vit_depth=6, vit_heads=8,
        text_width=256, text_depth=4, text_heads=8, embed_dim=256,
        clip_steps=3000, clip_batch_size=128, clip_lr=5e-4,
        llm_dim=384, llm_layers=6, llm_heads=6, llm_kv_heads=6, llm_ffn_hidden=1024,
        lm_steps=300, lm_batch_size=64, lm_lr=1e-3,
        projector="pixel_shuffle", align_steps=400, align_batch_size=64, align_lr=1e-3,
        instruct_steps=2500, instruct_batch_size=32, instruct_lr=5e-4, instruct_projector_lr=1e-3,
        log_every=100,
    ),
}


class ConfigError(ValueError):
    """A user mistake on the command line: reported in one line, never a traceback."""


class TrainingError(RuntimeError):
    """A run that cannot go on (a NaN loss): reported in one line, its last checkpoint kept."""


# -----------------------------------------------------------------------------
# flags -> config

def parse_bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def parse_flags(cls, argv, presets):
    """Build a `cls` dataclass from argv: --config=NAME picks a preset, then every
    --key=value / --key value / bare --key (boolean true) overrides one field."""
    types = {f.name: f.type for f in fields(cls)}
    pairs, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}; flags look like --key=value")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key != "config" and key not in types:
            raise ConfigError(f"unknown flag --{key}; valid: --config, " + ", ".join(f"--{k}" for k in types))
        if not eq:  # --key value, or a bare boolean --key
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if types.get(key) is bool and (nxt is None or nxt.startswith("--")):
                value = "true"
            elif nxt is None or nxt.startswith("--"):
                raise ConfigError(f"--{key} needs a value")
            else:
                value, i = nxt, i + 1
        pairs.append((key, value))
        i += 1
    preset = dict(pairs).get("config", next(iter(presets)))
    if preset not in presets:
        raise ConfigError(f"unknown --config={preset}; presets: {', '.join(presets)}")
    values = dict(presets[preset])
    for key, value in pairs:
        if key == "config":
            continue
        typ = types[key]
        try:
            values[key] = parse_bool(value) if typ is bool else typ(value)
        except ValueError:
            raise ConfigError(f"--{key} expects {typ.__name__}, got {value!r}") from None
    return cls(**values)


# -----------------------------------------------------------------------------
# device, precision, checkpoints, metrics

def pick_device(cfg):
    """CUDA when present (bf16 autocast where the GPU supports it, fp16 otherwise), else CPU fp32."""
    if cfg.device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device={cfg.device} but no CUDA GPU is visible")
    else:
        device = cfg.device
    if device.startswith("cuda"):
        # TF32 (Ampere and later): fp32 matmuls and convolutions run on tensor cores with 10-bit
        # mantissa inputs and fp32 sums; it serves what runs outside autocast, or --dtype=float32
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg.dtype == "auto":
        if device.startswith("cuda"):
            # bf16 tensor cores from Ampere (compute capability 8.0) on. Not is_bf16_supported():
            # it also says yes for a T4 (7.5), which can only emulate bf16, slowly
            dtype = "bfloat16" if torch.cuda.get_device_capability(device)[0] >= 8 else "float16"
        else:
            dtype = "float32"  # bf16 matmuls are very slow on most CPUs
    else:
        dtype = cfg.dtype
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"--dtype must be auto, float32, bfloat16 or float16, not {dtype!r}")
    return device, getattr(torch, dtype)


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


# -----------------------------------------------------------------------------
# DDP under torchrun, and batches built ahead of the step

def init_distributed(cfg, device):
    """Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK in the environment) join the process group:
    NCCL between GPUs, gloo between CPU processes; rank r drives GPU LOCAL_RANK. Returns the
    device. Only rank 0 prints: the others' stdout goes to /dev/null (errors still show)."""
    if "RANK" not in os.environ:
        return device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if cfg.grad_accum % dist.get_world_size() != 0:
        raise ConfigError(f"--grad_accum={cfg.grad_accum} must be a multiple of the {dist.get_world_size()} "
                          "ranks: each rank runs grad_accum / ranks micro-batches of every step")
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")
    return device


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def training_model(model, cfg, device):
    """What the training step calls: the model, inside DistributedDataParallel under torchrun
    (its backward averages the gradients over the ranks), compiled with --compile."""
    if dist.is_initialized():
        device_ids = [device] if device.startswith("cuda") else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return torch.compile(model) if cfg.compile else model


def gradient_sync(step_model, last_micro):
    """DDP averages gradients in every backward; during gradient accumulation only the last
    micro-batch's backward needs to (no_sync: the others just add into .grad locally)."""
    if dist.is_initialized() and not last_micro:
        return step_model.no_sync()
    return contextlib.nullcontext()


def mean_over_ranks(x):
    """The mean of a tensor over all ranks, the same on each (x itself in one process)."""
    if dist.is_initialized():
        dist.all_reduce(x)  # a sum: gloo has no average
        x = x / dist.get_world_size()
    return x


def check_replicas(model, name):
    """Every rank started from rank 0's weights (DDP broadcasts them) and applied the same
    averaged gradients, so all must end with the same weights. A fingerprint of every tensor
    (its sum and sum of squares, in float64) is compared across ranks; a difference stops all."""
    if not dist.is_initialized():
        return
    tensors = [t.double() for t in model.state_dict().values() if t.is_floating_point()]
    fingerprint = torch.stack([s for t in tensors for s in (t.sum(), t.pow(2).sum())])  # (2 x tensors,)
    everyone = [torch.empty_like(fingerprint) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, fingerprint)
    differ = [r for r, f in enumerate(everyone) if not torch.equal(f, everyone[0])]
    if differ:
        raise RuntimeError(f"{name}: the weights of ranks {differ} differ from rank 0's after training")
    print(f"{name}: weights identical on all {len(everyone)} ranks")


class MicroBatches(torch.utils.data.Dataset):
    """Item i is the batch of the i-th (step, micro) pair: get_batch stays the pure function of
    (step, micro) it is; only which process calls it, and when, changes."""

    def __init__(self, get_batch, pairs):
        self.get_batch, self.pairs = get_batch, pairs

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        return self.get_batch(*self.pairs[i])


def batch_loader(get_batch, steps, micros, cfg, device):
    """This rank's micro-batches of every step, in training order. On CUDA, data_workers
    processes render them ahead of the GPU into pinned (page-locked) memory, whose copy to the
    GPU runs asynchronously (non_blocking=True). On CPU they are built in the loop: the model
    needs every core there, and a batch costs 1.5-10 % of a step (bench.py, column data%)."""
    cuda = device.startswith("cuda")
    workers = cfg.data_workers if cfg.data_workers >= 0 else 2 if cuda else 0
    pairs = [(step, micro) for step in steps for micro in micros]
    loader = torch.utils.data.DataLoader(
        MicroBatches(get_batch, pairs), batch_size=None, num_workers=workers, pin_memory=cuda,
        prefetch_factor=4 if workers else None,
        # fork: the stages' get_batch are closures, which spawn and forkserver cannot pickle
        multiprocessing_context="fork" if workers else None,
        # its own generator: the loader draws a worker seed, which must not move torch's global RNG
        generator=torch.Generator().manual_seed(cfg.seed))
    return iter(loader)


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


def train_loop(name, model, groups, get_batch, loss_fn, steps, batch_size, cfg, device, dtype,
               resume=None, checkpoint=None):
    """Run `steps` optimizer steps; get_batch(step, micro) returns a dict of tensors for
    that micro-batch (a pure function of its arguments, so a run is reproducible).
    resume: a checkpoint of this loop to continue from (optimizer moments, step, losses, RNG).
    checkpoint(state): called with that state every cfg.checkpoint_every steps and at the end.
    Returns the per-step losses."""
    opt = make_optimizer(groups, cfg, device)
    autocast = torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)
    # fp16 (a T4) overflows where bf16 does not: the scaler multiplies the loss before backward,
    # divides the gradients back (unscale_, before clipping) and skips a step whose gradients hold inf
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=dtype == torch.float16)
    trainable = [p for g in opt.param_groups for p in g["params"]]
    step_model = training_model(model, cfg, device)
    losses, start = [], 0
    if resume is not None:  # the data stream needs no state: batch `step` is a pure function of step
        opt.load_state_dict(resume["optimizer"])
        scaler.load_state_dict(resume["scaler"])
        torch.set_rng_state(resume["rng"])
        losses, start = list(resume["losses"]), resume["step"]
    # this rank's micro-batches of each step: all of them in one process, every N-th of N ranks
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    micros = range(rank, cfg.grad_accum, world)
    batches = batch_loader(get_batch, range(start, steps), micros, cfg, device)
    t0 = time.time()
    model.train()
    for step in range(start, steps):
        for group in opt.param_groups:
            group["lr"] = group["peak_lr"] * lr_at(step, steps, cfg)
        total = torch.zeros((), device=device)
        for i in range(len(micros)):
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                     for k, v in next(batches).items()}
            with gradient_sync(step_model, last_micro=i == len(micros) - 1):
                with autocast:
                    loss = loss_fn(step_model, batch) / len(micros)
                scaler.scale(loss).backward()
            total += loss.detach()
        total = mean_over_ranks(total).item()  # one sync per step; every rank sees the same number
        if not math.isfinite(total):  # before the update, on every rank: the weights and the last checkpoint stay good
            raise TrainingError(f"{name}: loss is {total} at step {step}; stopped, the last checkpoint is kept")
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
        if step % cfg.log_every == 0 or step == steps - 1:
            elapsed, done = time.time() - t0, step + 1 - start
            rate = done * batch_size * cfg.grad_accum / elapsed
            eta = elapsed / done * (steps - step - 1)
            print(f"{name} step {step:5d}/{steps} | loss {total:.4f} | lr {opt.param_groups[0]['lr']:.2e} "
                  f"| {rate:6.1f} samples/s | eta {eta:5.0f}s", flush=True)
        every = cfg.checkpoint_every
        if checkpoint is not None and ((every > 0 and (step + 1) % every == 0) or step + 1 == steps):
            checkpoint({"step": step + 1, "losses": losses, "optimizer": opt.state_dict(),
                        "scaler": scaler.state_dict(), "rng": torch.get_rng_state()})
    model.eval()
    check_replicas(model, name)
    return losses


# -----------------------------------------------------------------------------
# data: every batch is built from the shapes world on the fly, a pure function of (stage, step)

def scene_rng(cfg, stage, step, micro, i):
    """Sample i of a micro-batch draws its scene and its text from its own seeded RNG, so a
    batch is a pure function of (stage, step, micro): runs are reproducible and resumable.
    Micro-batches are 4096 indices apart, more than any batch holds, so none share a scene."""
    index = (step * cfg.grad_accum + micro) * 4096 + i
    return index, random.Random(f"{cfg.seed}/{stage}/{index}")


def world_texts(cfg):
    """The text the tokenizer learns from: captions, questions and answers, descriptions
    and conversations of training scenes (or your own data's text: user_texts)."""
    if cfg.caption_data or cfg.instruct_data:
        return user_texts(cfg)
    world, texts = evaluate.world_config(cfg), []
    for i in range(cfg.tokenizer_scenes):
        scene, rng = shapes.make_scene("train", i, world), random.Random(i)
        texts.append(shapes.caption(scene, rng))
        texts.append(shapes.describe(scene))
        texts.append("user\nassistant\n")  # the chat template's role names, so they become whole tokens
        for _, question, answer in shapes.questions(scene, rng):
            texts += [question, answer]
        for question, answer in shapes.conversation(scene, rng):
            texts += [question, answer]
    return texts


def get_tokenizer(cfg):
    """The run's tokenizer, kept in out/tokenizer.json (and inside every checkpoint). A new
    `--stage all` run trains it; a single stage or --resume reuses the saved one, so that
    every stage of a run shares the same ids."""
    path = os.path.join(cfg.out_dir, "tokenizer.json")
    if (cfg.resume or cfg.stage != "all") and os.path.isfile(path):
        try:
            return data.Tokenizer.load(path)
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSON errors are ValueErrors
            raise ConfigError(f"{path}: not a tokenizer file ({e})") from None
    t0 = time.time()
    tok = data.Tokenizer(data.train_bpe(world_texts(cfg), cfg.vocab_size))
    print(f"tokenizer: {tok.vocab_size} tokens trained in {time.time() - t0:.1f}s")
    if is_main():  # every rank trained the same tokenizer; one writes it
        tok.save(path)
    return tok


def clip_batch(cfg, tok, step, micro):
    """Image-caption pairs. A share of them come as hard-negative twins: the same scene with
    one shape changed and the same caption but for that word, so the batch cannot be
    solved from colour and position alone."""
    world, scenes, texts = evaluate.world_config(cfg), [], []
    while len(scenes) < cfg.clip_batch_size:
        index, rng = scene_rng(cfg, "clip", step, micro, len(scenes))
        n = 1 if rng.random() < cfg.clip_single_object_prob else None
        scene = shapes.make_scene("train", index, world, n_objects=n)
        twin = shapes.hard_negative(scene, rng) if rng.random() < cfg.clip_hard_negative_prob else None
        caption_seed = rng.random()
        for s in (scene, twin) if twin is not None else (scene,):
            scenes.append(s)
            texts.append(shapes.caption(s, random.Random(caption_seed), drop_prob=cfg.clip_drop_prob))
    scenes, texts = scenes[:cfg.clip_batch_size], texts[:cfg.clip_batch_size]
    images = torch.stack([data.preprocess(shapes.render(s), cfg.image_size) for s in scenes])
    return {"images": images, "ids": clip_tokenize(tok, texts, cfg.context_length)}


def chat_messages(turns, n_images=1):
    """Chat messages of (question, answer) turns; the n_images images, if any, come before
    the first question (LLaVA's convention, evaluate.question's layout)."""
    messages = []
    for k, (question, answer) in enumerate(turns):
        content = evaluate.question(question, n_images if k == 0 else 0)[0]["content"]
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
    return messages


def fit_messages(tok, messages, image_tokens, max_seq_len):
    """(ids, labels, n) of the first n messages: as many whole exchanges as fit in max_seq_len.
    A conversation is cut at a turn boundary (DESIGN.md), never inside an answer; the first
    exchange is always kept (your data's rows whose first exchange is too long are dropped
    when they are loaded). image_tokens: one block size for every image, or one block (ids)
    per image of the whole conversation, in order: the blocks of cut turns are dropped."""
    for n in range(len(messages), 0, -2):
        blocks = image_tokens if isinstance(image_tokens, int) else image_tokens[:data.count_images(messages[:n])]
        ids, labels = data.encode_chat(tok, messages[:n], blocks)
        if len(ids) <= max_seq_len or n <= 2:
            return ids, labels, n


def fit_turns(tok, scenes, turns, image_tokens, cfg):
    """One training sample of the shapes world: the images of `scenes` (a list, in order;
    empty for text only) and as many whole turns as fit in max_seq_len."""
    inputs = [data.image_input(tok, shapes.render(s), cfg.image_size, image_tokens, tile_grids(cfg)) for s in scenes]
    messages = chat_messages(turns, len(scenes))
    ids, labels, _ = fit_messages(tok, messages, [block for _, block in inputs], cfg.max_seq_len)
    images = torch.cat([views for views, _ in inputs]) if inputs else None  # (V, 3, S, S), in marker order
    return {"input_ids": ids, "labels": labels, "images": images}


def instruct_turns(scene, rng, n_turns, types=()):
    """Several answers per image per forward pass: n_turns questions of the scene (every
    type, and a POPE-style probe with any kind of negative) in a random order, or one of
    LLaVA's conversation types (QA, detailed description, reasoning). With `types`, a
    focused run: questions of those types only (or, for a scene that has none, any)."""
    if types:
        asked = shapes.questions(scene, rng)
        turns = [(q, a) for t, q, a in asked if t in types] or [(q, a) for _, q, a in asked]
        return rng.sample(turns, min(n_turns, len(turns)))
    if rng.random() < 0.8:
        turns = [(q, a) for _, q, a in shapes.questions(scene, rng)]
        kind = rng.choice(shapes.POPE_KINDS)
        turns.append(shapes.pope_question(scene, kind, rng, answer_yes=rng.random() < 0.5))
        return rng.sample(turns, min(n_turns, len(turns)))
    return shapes.conversation(scene, rng)


def vlm_batch(cfg, tok, stage, step, micro, image_tokens, batch_size, split="train"):
    """lm: text only (conversations without the image); align: image -> caption;
    instruct: multi-turn visual conversations, two_image_share of them about two images."""
    world, samples = evaluate.world_config(cfg), []
    for i in range(batch_size):
        index, rng = scene_rng(cfg, stage, step, micro, i)
        scene = shapes.make_scene(split, index, world)
        if stage == "lm":
            turns = instruct_turns(scene, rng, cfg.instruct_turns) + [("Describe the image.", shapes.caption(scene, rng))]
            sample = fit_turns(tok, [], turns, image_tokens, cfg)
            sample["labels"] = list(sample["input_ids"])  # language modelling: every token is a target
            samples.append(sample)
        elif stage == "align":
            turns = [(rng.choice(evaluate.CAPTION_PROMPTS), shapes.caption(scene, rng))]
            samples.append(fit_turns(tok, [scene], turns, image_tokens, cfg))
        elif cfg.two_image_share > 0 and rng.random() < cfg.two_image_share:  # (a default run draws as before)
            first, second, questions = shapes.two_image_pair(split, index, world)
            turns = [(q, a) for _, q, a in rng.sample(questions, len(questions))]
            samples.append(fit_turns(tok, [first, second], turns, image_tokens, cfg))
        else:
            turns = instruct_turns(scene, rng, cfg.instruct_turns, evaluate.focus_types(cfg))
            samples.append(fit_turns(tok, [scene], turns, image_tokens, cfg))
    for s in samples:  # only a first turn longer than the context is still cut
        s["input_ids"], s["labels"] = s["input_ids"][: cfg.max_seq_len], s["labels"][: cfg.max_seq_len]
    return data.collate(samples, tok.pad_id)


# -----------------------------------------------------------------------------
# your own data: LLaVA JSON / JSONL files instead of the shapes world (DESIGN.md "User data")

@dataclass
class UserData:
    """Your data files after checking: the rows to train on, and the rows held out for scoring."""
    captions: list                # data.Row: one image, its caption the first answer
    instructions: list            # data.Row: conversations, any number of images
    held_out_captions: list
    held_out_instructions: list

    def rows(self, stage, held_out=False):
        """What a stage trains on (or is scored on): clip and align read the captions,
        instruct the conversations (the captions, as one-turn ones, when there are none),
        lm the text of both."""
        captions = self.held_out_captions if held_out else self.captions
        instructions = self.held_out_instructions if held_out else self.instructions
        if stage in ("clip", "align"):
            return captions
        if stage == "instruct":
            return instructions or captions
        return captions + instructions


def check_data_flags(cfg):
    """Refuse what the data flags cannot do, before anything is loaded or trained."""
    if cfg.image_folder and not (cfg.caption_data or cfg.instruct_data):
        raise ConfigError("--image_folder is for the images of --caption_data / --instruct_data; give one of them")
    if cfg.holdout < 0:
        raise ConfigError(f"--holdout must be >= 0, got {cfg.holdout}")
    if cfg.vision_from and cfg.stage == "clip":
        raise ConfigError("--vision_from replaces the clip stage: there is nothing to train with --stage=clip")
    if cfg.instruct_data and not cfg.caption_data and not cfg.vision_from and cfg.stage in ("all", "clip", "align"):
        raise ConfigError("--instruct_data without --caption_data: the clip and align stages have no image-caption "
                          "pairs to learn from; add --caption_data, or --vision_from=CKPT to take the ViT and "
                          "projector from an earlier run's align.pt or instruct.pt")


def check_vision_from(cfg, tok):
    """Load --vision_from into a model of this config now, so that a wrong checkpoint stops
    the run before anything trains rather than when the align stage starts."""
    if cfg.vision_from:
        load_vision(VLM(vlm_config(cfg, tok)), load_checkpoint(cfg.vision_from), cfg.vision_from)


def user_texts(cfg):
    """The text of your data files, for the tokenizer: every message of every row whose text
    is usable, <image> markers removed (images are not opened here), and the chat template's
    role names. Held-out rows are included: the tokenizer learns spellings, not answers."""
    texts = ["user\nassistant\n"]
    for path in (cfg.caption_data, cfg.instruct_data):
        if path:
            rows, _ = data.load_llava(path, cfg.image_folder, check_images=False)
            texts += [m["content"] for row in rows for m in data.without_images(row.messages)]
    return texts


def load_user_data(cfg, tok):
    """Your data files, read and checked row by row (data.load_llava: every image decoded
    once), then a caption row needs exactly one image and any row a first exchange that fits
    in max_seq_len. One line per file says what was used and what was skipped, by reason.
    `holdout` rows of each (a seeded choice) are set aside for scoring. None for the shapes
    world. A file with no usable row stops the run here, before any training."""
    if not (cfg.caption_data or cfg.instruct_data):
        return None
    image_tokens = data.image_tokens_at_most(tok, VLM(vlm_config(cfg, tok)).num_image_tokens, tile_grids(cfg))
    parts = {}
    for name, path in (("captions", cfg.caption_data), ("instructions", cfg.instruct_data)):
        parts[name], parts[f"held_out_{name}"] = [], []
        if not path:
            continue
        rows, skipped = data.load_llava(path, cfg.image_folder)
        if name == "captions":
            rows = data.drop_rows(rows, skipped, data.NOT_ONE_IMAGE, lambda r: len(r.images) == 1)
        rows = data.drop_rows(rows, skipped, data.FIRST_EXCHANGE_TOO_LONG,
                              lambda r: len(data.encode_chat(tok, r.messages[:2], image_tokens)[0]) <= cfg.max_seq_len)
        report = data.report_rows(len(rows), skipped)
        if not rows:
            raise data.DataError(path, f"no usable row ({report})")
        if cfg.holdout >= len(rows):
            raise ConfigError(f"--holdout={cfg.holdout} leaves none of the {len(rows)} usable rows of {path} to train on; lower it")
        held = set(random.Random(f"{cfg.seed}/holdout").sample(range(len(rows)), cfg.holdout))
        parts[name] = [r for k, r in enumerate(rows) if k not in held]
        parts[f"held_out_{name}"] = [r for k, r in enumerate(rows) if k in held]
        print(f"{path}: {report}; {len(held)} held out for scoring", flush=True)
    return UserData(**parts)


def row_indices(cfg, stage, step, micro, batch_size, n_rows):
    """Which rows a micro-batch reads: the run's k-th sample is row order[k % n_rows] of
    epoch k // n_rows, each epoch a seeded shuffle. Every row is seen once per epoch, and a
    batch is still a pure function of (stage, step, micro), like scene_rng's."""
    start = (step * cfg.grad_accum + micro) * batch_size
    orders = {}
    for k in range(start, start + batch_size):
        epoch = k // n_rows
        if epoch not in orders:
            orders[epoch] = random.Random(f"{cfg.seed}/{stage}/{epoch}").sample(range(n_rows), n_rows)
    return [orders[k // n_rows][k % n_rows] for k in range(start, start + batch_size)]


def row_images(paths, cfg):
    """A row's images read from disk and preprocessed: (n, 3, S, S), or None for none."""
    return torch.stack([data.preprocess(data.load_image(p), cfg.image_size) for p in paths]) if paths else None


def user_clip_batch(cfg, tok, rows, step, micro):
    """Image-caption pairs from your caption rows: each row's image and its first answer."""
    chosen = [rows[k] for k in row_indices(cfg, "clip", step, micro, cfg.clip_batch_size, len(rows))]
    return {"images": torch.cat([row_images(r.images, cfg) for r in chosen]),                    # (B, 3, S, S)
            "ids": clip_tokenize(tok, [r.messages[1]["content"] for r in chosen], cfg.context_length)}


def user_vlm_batch(cfg, tok, stage, rows, indices, image_tokens):
    """The rows[indices] as a batch. lm: a row's text without its images, every token a
    target; align: a caption row's first exchange; instruct: a whole conversation with its
    images, cut at a turn boundary (the images of the turns cut go too)."""
    samples = []
    for row in (rows[k] for k in indices):
        if stage == "lm":
            ids, _, _ = fit_messages(tok, data.without_images(row.messages), image_tokens, cfg.max_seq_len)
            samples.append({"input_ids": ids, "labels": list(ids), "images": None})
            continue
        messages = row.messages[:2] if stage == "align" else row.messages
        inputs = [data.image_input(tok, data.load_image(p), cfg.image_size, image_tokens, tile_grids(cfg))
                  for p in row.images[:data.count_images(messages)]]  # [(views, block ids)], tiled or not
        ids, labels, n = fit_messages(tok, messages, [block for _, block in inputs], cfg.max_seq_len)
        kept = inputs[:data.count_images(messages[:n])]  # the images of the cut turns go too
        images = torch.cat([views for views, _ in kept]) if kept else None  # (V, 3, S, S)
        samples.append({"input_ids": ids, "labels": labels, "images": images})
    return data.collate(samples, tok.pad_id)


def evaluate_held_out(stage, model, tok, rows, cfg, device, max_new_tokens=48):
    """Figures on your held-out rows: clip retrieval among their image-caption pairs, lm
    perplexity on their text, instruct vqa_acc (the last answer of each row, exact match
    after evaluate.normalize_answer, the earlier turns given as history). None for align."""
    if not rows or stage == "align":
        return {}
    if stage == "clip":
        return evaluate.retrieval(model, tok, [data.load_image(r.images[0]) for r in rows],
                                  [r.messages[1]["content"] for r in rows], cfg, device)
    if stage == "lm":
        batch = user_vlm_batch(cfg, tok, "lm", rows, range(min(64, len(rows))), model.num_image_tokens)
        return lm_validation(model, tok, cfg, device, batch)
    fit = [r for r in rows if evaluate.prompt_fits(model, tok, evaluate.split_question(r)[0], cfg.max_seq_len, max_new_tokens)]
    answers = evaluate.answer_rows(model, tok, fit, cfg.image_size, device, cfg.eval_batch_size, max_new_tokens)
    return {"vqa_acc": evaluate.exact_match(answers, [evaluate.split_question(r)[1] for r in fit])["exact_match"]}


def export_world(cfg):
    """--export=DIR: the shapes world written the way your own data would be, to look at, edit
    and train on. images/ holds export_scenes training scenes as PNG; captions.json gives each
    one caption exchange (as the align stage asks for it) and instruct.json one conversation
    (instruct_turns, as the instruct stage builds them); questions.json holds the VQA test
    questions of evaluate.vqa_items on test-split scenes (grounding left out: a box is scored
    by IoU, not by exact match), one per row, its reference answer the last gpt turn."""
    root = Path(cfg.export)
    (root / "images").mkdir(parents=True, exist_ok=True)
    world, captions, instructions, questions = evaluate.world_config(cfg), [], [], []
    for i in range(cfg.export_scenes):
        scene, rng = shapes.make_scene("train", i, world), random.Random(f"{cfg.seed}/export/{i}")
        image = f"images/train_{i:06d}.png"
        shapes.render(scene).save(root / image)
        caption = [(rng.choice(evaluate.CAPTION_PROMPTS), shapes.caption(scene, rng))]
        captions.append(data.llava_row(f"train_{i:06d}", [image], chat_messages(caption)))
        conversation = instruct_turns(scene, rng, cfg.instruct_turns)
        instructions.append(data.llava_row(f"train_{i:06d}", [image], chat_messages(conversation)))
    for scene, qtype, question, answer in evaluate.vqa_items(cfg):
        if qtype != "grounding":
            image = f"images/test_{len(questions):06d}.png"
            shapes.render(scene).save(root / image)
            row_id = f"test_{len(questions):06d}_{qtype}"   # the type in the id: per-type scores stay possible
            questions.append(data.llava_row(row_id, [image], chat_messages([(question, answer)])))
    for name, rows in (("captions.json", captions), ("instruct.json", instructions), ("questions.json", questions)):
        data.save_llava(root / name, rows)
    print(f"wrote {root}: {cfg.export_scenes} training images with captions.json and instruct.json, "
          f"{len(questions)} test questions in questions.json")


# -----------------------------------------------------------------------------
# model builders

def clip_config(cfg, tok):
    vit = ViTConfig(image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.vit_width,
                    depth=cfg.vit_depth, heads=cfg.vit_heads, use_cls=cfg.vit_cls)
    return CLIPConfig(vit=vit, vocab_size=tok.vocab_size, context_length=cfg.context_length,
                      text_width=cfg.text_width, text_depth=cfg.text_depth, text_heads=cfg.text_heads,
                      embed_dim=cfg.embed_dim)


def tile_grids(cfg):
    """--tile_grids="1x2,2x1,2x2" -> ((1, 2), (2, 1), (2, 2)): (rows, cols) of each allowed grid."""
    grids = []
    for text in filter(None, cfg.tile_grids.split(",")):
        rows, x, cols = text.strip().partition("x")
        if not (x and rows.isdigit() and cols.isdigit() and 1 <= int(rows) <= 4 and 1 <= int(cols) <= 4):
            raise ConfigError(f"--tile_grids: {text!r} is not a grid RxC with 1 <= R, C <= 4 (e.g. 2x2)")
        grids.append((int(rows), int(cols)))
    return tuple(grids)


def vlm_config(cfg, tok):
    llm = LLMConfig(vocab_size=tok.vocab_size, dim=cfg.llm_dim, n_layers=cfg.llm_layers,
                    n_heads=cfg.llm_heads, n_kv_heads=cfg.llm_kv_heads,
                    ffn_hidden=cfg.llm_ffn_hidden, max_seq_len=cfg.max_seq_len)
    return VLMConfig(vision=clip_config(cfg, tok).vit, llm=llm, projector=cfg.projector,
                     resampler_queries=cfg.resampler_queries, tile_grids=tile_grids(cfg),
                     vision_layer=cfg.vision_layer, image_token_id=tok.image_id)


def build_vlm(cfg, tok, stage, device):
    """The VLM a stage starts from: lm starts fresh; align takes the ViT from clip.pt (or
    --vision_from) and the LLM from lm.pt; instruct continues from align.pt."""
    model = VLM(vlm_config(cfg, tok))
    if stage == "align":
        if cfg.vision_from:   # an earlier run's ViT (and projector) instead of this run's clip stage
            load_vision(model, load_checkpoint(cfg.vision_from), cfg.vision_from)
        else:
            load_vision(model, finished_checkpoint(cfg, "clip", tok), os.path.join(cfg.out_dir, "clip.pt"))
        load_weights(model.llm, finished_checkpoint(cfg, "lm", tok)["model"], os.path.join(cfg.out_dir, "lm.pt"))
    elif stage == "instruct":
        load_weights(model, finished_checkpoint(cfg, "align", tok)["model"], os.path.join(cfg.out_dir, "align.pt"))
    return model.to(device)


def load_vision(model, ckpt, path):
    """A checkpoint's ViT into model.vision: CLIP's image tower from a clip.pt, or the ViT and
    the projector of an align.pt / instruct.pt."""
    prefixes = ("visual.",) if ckpt.get("stage") == "clip" else ("vision.", "projector.")
    for prefix, module in zip(prefixes, (model.vision, model.projector)):
        part = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
        if not part:
            raise ConfigError(f"{path}: a {ckpt.get('stage')!r} checkpoint holds no {prefix.rstrip('.')} weights; "
                              f"use a clip.pt, align.pt or instruct.pt")
        load_weights(module, part, path)


def trained_module(stage, model):
    """What a stage's checkpoint holds: the lm stage trains (and saves) the LLM alone."""
    return model.llm if stage == "lm" else model


def load_weights(module, state, path):
    """Strict loading: a checkpoint from another config is one clear line, not a traceback."""
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0] if lines else "shapes differ"
        raise ConfigError(f"{path} was written by another config ({detail[:160]})") from None


def check_tokenizer(ckpt, tok, path):
    """A checkpoint's ids mean something only with its own tokenizer: refuse to mix runs."""
    try:
        same = data.Tokenizer.from_state(ckpt["tokenizer"]).ranks == tok.ranks
    except (KeyError, ValueError):
        same = False
    if not same:
        raise ConfigError(f"{path}: its tokenizer does not match tokenizer.json in the same folder; "
                          "it comes from another run")


def finished_checkpoint(cfg, stage, tok):
    """An earlier stage's checkpoint, checked: that stage finished, with this run's tokenizer."""
    path = os.path.join(cfg.out_dir, f"{stage}.pt")
    ckpt = load_checkpoint(path)
    if "metrics" not in ckpt:
        raise ConfigError(f"{path}: the {stage} stage stopped at step {ckpt.get('step')}; "
                          "finish it with --resume")
    check_tokenizer(ckpt, tok, path)
    return ckpt


# -----------------------------------------------------------------------------
# the stages

def stage_clip(cfg, tok, device, dtype, resume=None, save=None, user=None):
    """Contrastive pretraining of both towers on image-caption pairs, then zero-shot,
    retrieval and linear-probe evaluation (on your data: retrieval among held-out pairs).
    resume / save: see run_stage."""
    model = CLIP(clip_config(cfg, tok), eot_id=tok.eot_id).to(device)
    if resume is not None:
        load_weights(model, resume["model"], os.path.join(cfg.out_dir, "clip.pt"))
    if user is None:
        get_batch = lambda step, micro: clip_batch(cfg, tok, step, micro)
    else:
        get_batch = lambda step, micro: user_clip_batch(cfg, tok, user.rows("clip"), step, micro)
    loss_fn = lambda m, b: m(b["images"], b["ids"])[0]
    checkpoint = (lambda state: save(model, state)) if save else None
    losses = train_loop("clip", model, [(model.parameters(), cfg.clip_lr)], get_batch, loss_fn,
                        cfg.clip_steps, cfg.clip_batch_size, cfg, device, dtype, resume, checkpoint)
    if not is_main():  # rank 0 alone evaluates
        return model, losses, {}
    if user is not None:
        return model, losses, evaluate_held_out("clip", model, tok, user.rows("clip", held_out=True), cfg, device)
    return model, losses, evaluate.evaluate_clip(model, tok, cfg, device)


def stage_vlm(stage, cfg, tok, device, dtype, resume=None, save=None, user=None):
    """lm, align or instruct: the same VLM, the same loop; what differs is which towers
    train (the rest is frozen), at which learning rates, and on which conversations
    (the shapes world's, or your data's when `user` holds it)."""
    try:  # a typo in --question_types stops the run now, not after training
        evaluate.focus_types(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    model = build_vlm(cfg, tok, stage, device)
    lora = stage == "instruct" and cfg.lora_rank > 0
    if lora:  # before a resume: a checkpoint taken mid-stage holds the adapters
        adapters = add_lora(model.llm, cfg.lora_rank, cfg.lora_alpha)
    if resume is not None:
        load_weights(trained_module(stage, model), resume["model"], os.path.join(cfg.out_dir, f"{stage}.pt"))
    image_tokens = model.num_image_tokens
    if stage == "lm":
        groups, steps, bs = [(list(model.llm.parameters()), cfg.lm_lr)], cfg.lm_steps, cfg.lm_batch_size
    elif stage == "align":
        groups, steps, bs = [(list(model.projector.parameters()), cfg.align_lr)], cfg.align_steps, cfg.align_batch_size
    else:
        groups = [(adapters if lora else list(model.llm.parameters()), cfg.instruct_lr),
                  (list(model.projector.parameters()), cfg.instruct_projector_lr)]
        if cfg.instruct_vision_lr > 0:  # LLaVA keeps the ViT frozen; later VLMs often tune it too
            groups.append((list(model.vision.parameters()), cfg.instruct_vision_lr))
        steps, bs = cfg.instruct_steps, cfg.instruct_batch_size
    trained = {id(p) for params, _ in groups for p in params}
    for p in model.parameters():  # frozen towers get no gradient at all
        p.requires_grad_(id(p) in trained)
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if user is None:
        get_batch = lambda step, micro: vlm_batch(cfg, tok, stage, step, micro, image_tokens, bs)
    else:
        rows = user.rows(stage)
        if not rows:   # align without caption rows: the projector of --vision_from goes on as it is
            print(f"{stage}: no caption rows to train on; 0 steps")
            steps = 0
        get_batch = lambda step, micro: user_vlm_batch(cfg, tok, stage, rows, row_indices(
            cfg, stage, step, micro, bs, len(rows)), image_tokens)
    # Batches are right-padded: under causal attention no real token ever sees a pad, so the
    # model needs no padding mask and SDPA takes its fast causal path (pads carry no label).
    if cfg.loss_per_answer and stage != "lm":
        loss_fn = lambda m, b: per_answer_loss(m(b["input_ids"], b["images"])[0], b["labels"])
    else:
        loss_fn = lambda m, b: m(b["input_ids"], b["images"], labels=b["labels"])[1]
    checkpoint = (lambda state: save(model, state)) if save else None
    losses = train_loop(stage, model, groups, get_batch, loss_fn, steps, bs, cfg, device, dtype, resume, checkpoint)
    if lora:  # fold the adapters into the weights: instruct.pt holds a plain model, evaluated as such
        merge_lora(model.llm)
    if not is_main():  # rank 0 alone evaluates
        return model, losses, {}
    if user is not None:
        metrics = evaluate_held_out(stage, model, tok, user.rows(stage, held_out=True), cfg, device)
    elif stage == "lm":
        metrics = lm_validation(model, tok, cfg, device)
    else:
        metrics = evaluate.evaluate_vlm(stage, model, tok, cfg, device)
    metrics[f"{stage}_trainable_params"] = n_trained
    return model, losses, metrics


def per_answer_loss(logits, labels):
    """Cross-entropy where every answer counts once, whatever its length: a 15-token box or
    a 40-token description would otherwise outweigh a one-word colour answer 15-40 times."""
    target = F.pad(labels[:, 1:], (0, 1), value=-100)                 # (B, T): position t predicts t+1
    labelled = target != -100                                         # (B, T)
    starts = labelled & ~F.pad(labelled[:, :-1], (1, 0), value=False)  # first token of each answer
    answer = torch.cumsum(starts.flatten(), 0) - 1                    # (B*T,) answer index per token
    tokens = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100,
                             reduction="none")                        # (B*T,)
    n_answers = int(starts.sum())
    keep = labelled.flatten()
    per_answer = torch.zeros(n_answers, device=logits.device).index_add_(0, answer[keep], tokens[keep])
    lengths = torch.zeros(n_answers, device=logits.device).index_add_(0, answer[keep], torch.ones_like(tokens[keep]))
    return (per_answer / lengths).mean()


@torch.no_grad()
def lm_validation(model, tok, cfg, device, batch=None):
    """The lm stage is measured by perplexity on conversations of validation scenes (or on
    the batch given: your held-out rows' text)."""
    if batch is None:
        batch = vlm_batch(cfg, tok, "lm", 0, 0, model.num_image_tokens, 64, split="val")
    _, loss = model(batch["input_ids"].to(device), None, batch["attention_mask"].to(device),
                    batch["labels"].to(device))
    return {"lm_val_loss": loss.item(), "lm_val_ppl": math.exp(loss.item())}


# flags that change how a run is driven, not what it computes: --resume may change them
RUN_ONLY = ("stage", "out_dir", "device", "resume", "log_every", "checkpoint_every")


def resume_point(stage, cfg, tok):
    """With --resume: this stage's checkpoint if there is one (None: start the stage afresh),
    checked to come from the same run."""
    path = os.path.join(cfg.out_dir, f"{stage}.pt")
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


def run_stage(stage, cfg, tok, device, dtype, user=None):
    """Train one stage, or with --resume skip it (finished) or continue it (cut short); its
    checkpoint out/<stage>.pt is written every cfg.checkpoint_every steps and at the end:

      stage, config, tokenizer, model (the trained weights), step, losses (one per step so far)
      + optimizer, scaler, rng      while the stage runs (what --resume needs to go on)
      + metrics, seconds            once it has finished and been evaluated

    user: your data (load_user_data), None for the shapes world. Returns the stage's figures."""
    path = os.path.join(cfg.out_dir, f"{stage}.pt")
    resume = resume_point(stage, cfg, tok)
    if resume is not None and "metrics" in resume:
        print(f"{stage}: finished in an earlier run, skipped")
        return resume["metrics"]
    if resume is not None:
        print(f"{stage}: resuming at step {resume['step']}")
    torch.manual_seed(cfg.seed + STAGES.index(stage))  # each stage starts from its own seed, so a
    t0 = time.time()                                   # resumed run draws the same numbers

    def save(model, state):
        save_checkpoint(path, {"stage": stage, "config": asdict(cfg), "tokenizer": tok.state(),
                               "model": trained_module(stage, model).state_dict(), **state})

    run = stage_clip if stage == "clip" else functools.partial(stage_vlm, stage)
    model, losses, metrics = run(cfg, tok, device, dtype, resume, save, user)
    metrics[f"{stage}_train_seconds"] = time.time() - t0 + (resume or {}).get("seconds", 0.0)
    save(model, {"step": len(losses), "losses": losses, "metrics": metrics,
                 "seconds": metrics[f"{stage}_train_seconds"]})
    return metrics


def main(argv):
    cfg = parse_flags(Config, argv, PRESETS)
    if cfg.stage not in STAGES + ("all",):
        raise ConfigError(f"--stage must be one of {', '.join(STAGES)}, all; not {cfg.stage!r}")
    if cfg.export:
        return export_world(cfg)
    check_data_flags(cfg)
    device, dtype = pick_device(cfg)
    device = init_distributed(cfg, device)
    print(f"device {device}, dtype {str(dtype).replace('torch.', '')}")
    t0 = time.time()
    os.makedirs(cfg.out_dir, exist_ok=True)
    if cfg.stage == "all" and not cfg.resume and is_main() and os.path.isfile(os.path.join(cfg.out_dir, "metrics.json")):
        os.remove(os.path.join(cfg.out_dir, "metrics.json"))  # a new run: no figures of an old one
    tok = get_tokenizer(cfg)
    check_vision_from(cfg, tok)
    user = load_user_data(cfg, tok)   # your own data (None: the shapes world), checked before any training
    for stage in STAGES if cfg.stage == "all" else (cfg.stage,):
        if stage == "clip" and cfg.vision_from:
            print(f"clip: not trained, the ViT comes from {cfg.vision_from}")
            continue
        metrics = update_metrics(cfg.out_dir, run_stage(stage, cfg, tok, device, dtype, user))
    if cfg.stage == "all":
        metrics = update_metrics(cfg.out_dir, {"total_seconds": time.time() - t0})
    evaluate.print_table(metrics)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ConfigError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
