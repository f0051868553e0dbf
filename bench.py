"""
bench.py — how fast tinyvlm trains and generates, as numbers.

    python bench.py                        # the reference config + every stage of the cpu preset
    python bench.py --config=tiny --steps=3 --json=bench.json
    python bench.py --config=colab --flops_only --assume_flops=20e12   # a preset too big to time here

In one process it measures
  - the matmul peak of this machine: the median of 10 torch.mm of 2048x2048 (fp32 on CPU;
    on a GPU bf16 at 8192x8192, as 2048 is too small to keep a large GPU busy), and on a
    GPU whose datasheet we know, the vendor's dense peak too;
  - the training step of the `reference` VLM (the Reference dataclass below: 64x64 images,
    patch 8, ViT 128 wide x 4, pixel shuffle 2, LLM 256 wide x 4 with SwiGLU 683 and a tied
    1024-token vocabulary, sequence 96, batch 32, every tower trained) and of each stage's
    model (clip, lm, align, instruct of the chosen train.py preset), run through train.train_loop
    itself (forward, backward, grad clipping, AdamW) on a fixed synthetic batch of the shape
    that stage's real batches have: seconds per step (median), samples/s, tokens/s,
    achieved FLOP/s and MFU (model FLOPs utilisation) against the peak above;
  - the data pipeline: seconds to build one real batch (batches.clip_batch / batches.vlm_batch,
    the shapes world rendered on the fly) and scenes per second, beside the step time;
  - generation with VLM.generate with and without the KV cache at 16, 64 and 256 new
    tokens: tokens/s, speedup, and whether both give the same tokens;
  - peak memory: the process's max RSS on CPU (one number that only grows), the peak of
    torch.cuda.max_memory_allocated per model on a GPU.

FLOPs. The model FLOPs of a step are Σ over the towers of k × params × tokens (PaLM,
"Scaling Language Modeling with Pathways", Chowdhery et al. 2022, arXiv:2204.02311,
appendix B: a dense model does 2 FLOPs per parameter per token forward and 4 backward,
6 in all). Every parameter counts, embeddings included; the tied LLM head counts once.
Tokens: the ViT's patches (+ CLS), the projector's output tokens, the LLM's whole
sequence (padding included: it is computed), CLIP's text length, one per sample for
CLIP's two projections. k depends on what trains, because a frozen tower skips work:
    k = 6  the tower's weights train (forward 2, gradient w.r.t. inputs 2, w.r.t. weights 2)
    k = 4  frozen, but a trained tower before it needs gradients through it (no weight grads)
    k = 2  frozen, and nothing before it trains: forward only (the frozen ViT of align/instruct)
With every tower trained (the reference) this is the plain 6 × Σ(params × tokens).
Attention's own FLOPs (PaLM's 12·L·d·T per token at k = 6, here k·2·layers·width·T
per token) are reported beside it but not counted in MFU, as in PaLM and nanoGPT.
MFU = model FLOPs per second / peak FLOP/s (nanoGPT's bench.py and estimate_mfu are
the precedent: https://github.com/karpathy/nanoGPT).

--flops_only times nothing but the data: each stage's FLOPs per step and per run, the
scenes it renders, and with --assume_flops=F (model FLOP/s, i.e. peak x MFU) the seconds its
training would take, for a preset sized for hardware this machine is not (the colab preset).

Numbers are only as quiet as the machine: on CPU torch uses every core (OMP_NUM_THREADS
changes that), so run nothing else beside it.

Shapes: B batch, T sequence length, L text length, S image side.
Tests: python -m pytest -q tests/test_bench.py
"""

import contextlib
import functools
import io
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass

import torch

import batches
import data
import distributed
import train
from clip import CLIP
from flags import ConfigError, parse_flags
from model import LLMConfig, VLM, VLMConfig, count_parameters
from tokenizer import Tokenizer, train_bpe
from vit import ViTConfig

GEN_LENGTHS = (16, 64, 256)  # new tokens per generation run
GEN_PROMPT_TEXT = 16         # text tokens in the generation prompt, after the image's tokens
GEN_REPEATS = 3              # runs of each generation; the fastest counts

# Dense bf16 tensor-core peaks from NVIDIA's datasheets (fp16 for T4, which has no bf16),
# matched against torch.cuda.get_device_name(); the first match wins, so specific names come first.
VENDOR_PEAK_FLOPS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200 NVL", 835e12),
                     ("H200", 989e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("T4", 65e12))


@dataclass
class BenchConfig:
    config: str = "cpu"    # the train.py preset whose four stages are measured
    json: str = ""         # also write the results to this file
    steps: int = 6         # timed training steps per model (the median is reported)
    warmup: int = 2        # untimed steps first (allocator, thread pool, AdamW state)
    data_batches: int = 3  # real batches built per stage to time the data pipeline
    device: str = "auto"   # auto | cpu | cuda
    matmul_size: int = 0   # side of the peak-measuring matmuls; 0: 2048 on CPU, 8192 on GPU
    flops_only: bool = False    # count FLOPs and time the data only, no model timing
    assume_flops: float = 0.0   # with flops_only: model FLOP/s to turn FLOPs into seconds (0: none)
    length_chunks: int = 4      # real batches are also timed in this many train.by_length chunks


@dataclass
class Reference:
    """The reference VLM: nanoVLM's model code reaches 62% MFU at exactly this."""
    image_size: int = 64
    patch_size: int = 8       # 8x8 = 64 patches
    vit_width: int = 128
    vit_depth: int = 4
    vit_heads: int = 4
    vit_mlp_ratio: float = 4.0  # MLP 512
    shuffle_factor: int = 2   # pixel shuffle: 64 patches -> 16 image tokens
    llm_dim: int = 256
    llm_layers: int = 4
    llm_heads: int = 4
    llm_ffn_hidden: int = 683
    vocab_size: int = 1024
    seq_len: int = 96         # 16 image + 80 text tokens
    batch_size: int = 32


@dataclass
class Tower:
    """One part of a model for the FLOP count: k × params FLOPs per token it processes."""
    name: str
    params: int
    tokens: int      # tokens it processes per sample
    k: int           # 6 trained, 4 frozen with gradients through it, 2 forward only
    layers: int = 0  # attention layers (0: none), for the attention FLOPs
    width: int = 0   # attention width (heads × head size)


@dataclass
class Workload:
    """A model, what trains in it, one batch, and how its FLOPs are counted."""
    name: str
    model: torch.nn.Module
    trained: list        # the modules whose weights train, in input-to-output order
    batch: dict
    loss_fn: object      # loss_fn(model, batch) -> scalar loss, as in train.py
    towers: list
    batch_size: int
    tokens_per_sample: int


# ----------------------------------------------------------------------------- FLOPs


def model_flops(towers, batch_size):
    """Model FLOPs of one training step: Σ k × params × tokens (PaLM appendix B)."""
    return sum(t.k * t.params * t.tokens for t in towers) * batch_size


def attention_flops(towers, batch_size):
    """Attention score and mixing FLOPs (QKᵀ and AV, 2·2·T·width per token and layer forward),
    scaled by the same k as the tower; full T×T, causal masking not subtracted, as in PaLM."""
    return sum(t.k * 2 * t.layers * t.width * t.tokens * t.tokens for t in towers) * batch_size


def multipliers(trained_flags):
    """k for each tower, input to output: 6 if it trains; a frozen tower passes gradients
    (k = 4) only when a tower before it trains, otherwise it runs forward only (k = 2)."""
    ks, grad_needed = [], False
    for trains in trained_flags:
        grad_needed = grad_needed or trains
        ks.append(6 if trains else 4 if grad_needed else 2)
    return ks


def stem_convolutions(vit):
    """[(name, parameters, output positions)] of each convolution of the ViT's stem: a kernel
    is applied once per output position (not once per patch token), so each counts
    params x positions. Found by running one image through the stem with hooks."""
    convs = [(name, m) for name, m in vit.patch_embed.named_modules() if isinstance(m, torch.nn.Conv2d)]
    positions = {}
    hooks = [m.register_forward_hook(lambda m, i, out, name=name: positions.update({name: out[0, 0].numel()}))
             for name, m in convs]
    with torch.no_grad():
        vit.patch_embed(torch.zeros(1, 3, vit.cfg.image_size, vit.cfg.image_size, device=vit.pos_emb.device))
    for h in hooks:
        h.remove()
    return [(name, count_parameters(m), positions[name]) for name, m in convs]


def vision_towers(vit, k):
    """The ViT as towers: each stem convolution over its output positions, and everything
    else (blocks, norms, positions, CLS; BatchNorm's few numbers too) over the N + CLS tokens."""
    v, stem = vit.cfg, stem_convolutions(vit)
    rest = count_parameters(vit) - sum(params for _, params, _ in stem)
    return ([Tower("vision", params, positions, k) for _, params, positions in stem]  # (one per convolution)
            + [Tower("vision", rest, v.num_patches + v.use_cls, k, v.depth, v.width)])


def vlm_towers(model, seq_len, trained, with_images=True):
    """The VLM's towers: vision (its stem, then patches + CLS), projector (image tokens), LLM (the sequence)."""
    lm = model.cfg.llm
    parts = [("vision", model.vision, None, 0, 0),
             ("projector", model.projector, model.num_image_tokens, 0, 0),
             ("llm", model.llm, seq_len, lm.n_layers, lm.n_heads * lm.head_dim)]
    if not with_images:  # text only: the ViT and projector never run
        parts = parts[2:]
    ks = multipliers([any(m is module for m in trained) for _, module, *_ in parts])
    towers = []
    for (name, module, tokens, layers, width), k in zip(parts, ks):
        towers += (vision_towers(module, k) if name == "vision"
                   else [Tower(name, count_parameters(module), tokens, k, layers, width)])
    return towers


def clip_towers(model, text_len):
    """CLIP, everything trained: the ViT (its stem, then patches + CLS), the text tower over
    the text, and the two projections once per sample."""
    heads = count_parameters(model.image_projection) + count_parameters(model.text_projection) + 1
    return vision_towers(model.visual, 6) + [
        Tower("text", count_parameters(model.text), text_len, 6, model.cfg.text_depth, model.cfg.text_width),
        Tower("heads", heads, 1, 6)]


# ----------------------------------------------------------------------------- timing


def sync(device):
    """Wait for queued GPU work, so that a wall-clock time covers it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak(device, dtype, size, repeats=10):
    """FLOP/s of the median of `repeats` square torch.mm: the best this machine does."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    times = []
    for _ in range(repeats + 2):  # the first two warm up the kernel and the thread pool
        sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * size ** 3 / statistics.median(times[2:])


def vendor_peak(device):
    """The datasheet's dense peak of a known GPU, else None."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in VENDOR_PEAK_FLOPS if key in name), None)


def step_seconds(w, cfg, device, dtype, steps):
    """Seconds of each of `steps` optimizer steps of train.train_loop, the loop train.py runs.
    train_loop asks for a batch at the start of every step, so the time between two asks is
    one whole step (forward, backward, clipping, AdamW); we hand it the same batch each time."""
    starts = []

    def get_batch(step, micro):
        if micro == 0:
            sync(device)
            starts.append(time.perf_counter())
        return w.batch

    params = [p for m in w.trained for p in m.parameters()]
    trained = {id(p) for p in params}
    for p in w.model.parameters():  # frozen towers get no gradient at all, as in train.train_stage
        p.requires_grad_(id(p) in trained)
    with contextlib.redirect_stdout(io.StringIO()):  # train_loop logs its first and last step
        train.train_loop(w.model, get_batch, w.loss_fn, name=w.name, groups=[(params, 1e-4)], steps=steps,
                         batch_size=w.batch_size, cfg=cfg, device=device, dtype=dtype)
    sync(device)
    starts.append(time.perf_counter())
    return [b - a for a, b in zip(starts, starts[1:])]


def peak_memory(device):
    """Bytes: CUDA's allocator peak since the last reset, or the process's max RSS on CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    import resource  # Unix only; CPU memory is reported where it exists
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def measure_training(w, cfg, device, dtype, bench, peak, vendor):
    """The numbers of one workload, keyed `<what>_<workload>`."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = step_seconds(w, cfg, device, dtype, bench.warmup + bench.steps)[bench.warmup:]
    seconds = statistics.median(times)
    flops = model_flops(w.towers, w.batch_size)
    n = w.name
    out = {f"train_step_seconds_{n}": seconds,
           f"train_samples_per_s_{n}": w.batch_size / seconds,
           f"train_tokens_per_s_{n}": w.batch_size * w.tokens_per_sample / seconds,
           f"train_batch_size_{n}": w.batch_size,
           f"train_tokens_per_sample_{n}": w.tokens_per_sample,
           f"train_flops_per_step_{n}": flops,
           f"train_attention_flops_per_step_{n}": attention_flops(w.towers, w.batch_size),
           f"train_flops_per_s_{n}": flops / seconds,
           f"train_mfu_{n}": flops / seconds / peak,
           f"train_flop_multipliers_{n}": " ".join(dict.fromkeys(f"{t.name}x{t.k}" for t in w.towers)),
           f"peak_memory_bytes_{n}": peak_memory(device)}
    if vendor:
        out[f"train_mfu_vendor_{n}"] = flops / seconds / vendor
    return out


# ----------------------------------------------------------------------------- workloads


def vlm_loss(model, batch):
    return model(batch["input_ids"], batch["images"], labels=batch["labels"])[1]


def clip_loss(model, batch):
    return model(batch["images"], batch["ids"])[0]


def synthetic_vlm_batch(B, T, n_image_tokens, n_text_ids, image_id, image_size, device, with_images=True):
    """Random text ids (< n_text_ids, so never a special token) with one block of image slots
    per row right after the first token; labels on the text after the image, as in training."""
    ids = torch.randint(0, n_text_ids, (B, T))  # (B, T)
    labels = ids.clone()  # (B, T)
    images = None
    if with_images:
        ids[:, 1 : 1 + n_image_tokens] = image_id
        labels[:, : 1 + n_image_tokens] = data.IGNORE_INDEX
        images = torch.randn(B, 3, image_size, image_size, device=device)  # (B, 3, S, S)
    return {"input_ids": ids.to(device), "labels": labels.to(device), "images": images}


def reference_config(ref, max_seq_len):
    vision = ViTConfig(image_size=ref.image_size, patch_size=ref.patch_size, width=ref.vit_width,
                       depth=ref.vit_depth, heads=ref.vit_heads, mlp_ratio=ref.vit_mlp_ratio, use_cls=False)
    llm = LLMConfig(vocab_size=ref.vocab_size, dim=ref.llm_dim, n_layers=ref.llm_layers, n_heads=ref.llm_heads,
                    n_kv_heads=ref.llm_heads, ffn_hidden=ref.llm_ffn_hidden, max_seq_len=max_seq_len)
    return VLMConfig(vision=vision, llm=llm, projector="pixel_shuffle", shuffle_factor=ref.shuffle_factor,
                     image_token_id=ref.vocab_size - 1)


def reference_workload(ref, device):
    """The reference VLM with every tower trained, on a synthetic batch."""
    model = VLM(reference_config(ref, ref.seq_len)).to(device)
    batch = synthetic_vlm_batch(ref.batch_size, ref.seq_len, model.num_image_tokens, ref.vocab_size - 1,
                                model.cfg.image_token_id, ref.image_size, device)
    trained = [model.vision, model.projector, model.llm]
    return Workload("reference", model, trained, batch, vlm_loss, vlm_towers(model, ref.seq_len, trained),
                    ref.batch_size, ref.seq_len)


def trained_parts(model, stage):
    """The modules a VLM stage trains (train.STAGES), input to output."""
    return {"lm": [model.llm], "align": [model.projector], "instruct": [model.projector, model.llm]}[stage]


def stage_workload(stage, cfg, tok, real, device):
    """Stage `stage`'s model as train.py builds it (fresh weights: speed does not depend on
    them), on a synthetic batch of the same shape as the real batch `real`."""
    B = getattr(cfg, f"{stage}_batch_size")
    n_text_ids = len(tok.ranks)  # ids below the special tokens
    if stage == "clip":
        model = CLIP(train.clip_config(cfg, tok), eot_id=tok.eot_id).to(device)
        L = real["ids"].size(1)
        ids = torch.randint(0, n_text_ids, (B, L))  # (B, L)
        ids[:, -1] = tok.eot_id  # the text tower reads its feature at the end-of-text token
        batch = {"images": torch.randn_like(real["images"]).to(device), "ids": ids.to(device)}
        return Workload(stage, model, [model], batch, clip_loss, clip_towers(model, L), B,
                        model.cfg.vit.num_patches + model.cfg.vit.use_cls + L)
    model = VLM(train.vlm_config(cfg, tok)).to(device)
    T, with_images = real["input_ids"].size(1), stage != "lm"
    batch = synthetic_vlm_batch(B, T, model.num_image_tokens, n_text_ids, tok.image_id, cfg.image_size,
                                device, with_images)
    trained = trained_parts(model, stage)
    return Workload(stage, model, trained, batch, vlm_loss, vlm_towers(model, T, trained, with_images), B, T)


def measure_padding(stage, cfg, tok, real, device, dtype, bench):
    """A VLM stage's real batch: the share of its tokens that are pads, whole and in
    train.by_length's bench.length_chunks chunks (--length_chunks of train.py), and the seconds
    of a training step on it each way (the same loss: only the pads' compute differs)."""
    lengths = real["attention_mask"].sum(1)
    chunks = train.by_length(real, bench.length_chunks)
    out = {f"pad_share_{stage}": 1 - lengths.sum().item() / real["input_ids"].numel(),
           f"pad_share_chunked_{stage}": 1 - lengths.sum().item() / sum(c["input_ids"].numel() for c in chunks)}
    model = VLM(train.vlm_config(cfg, tok)).to(device)
    trained = trained_parts(model, stage)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in real.items()}
    for name, k in (("whole", 1), ("chunked", bench.length_chunks)):
        w = Workload(stage, model, trained, batch, functools.partial(train.token_loss, chunks=k), [], 0, 0)
        out[f"train_step_seconds_{name}_{stage}"] = statistics.median(
            step_seconds(w, cfg, device, dtype, bench.warmup + bench.steps)[bench.warmup:])
    out[f"chunk_speedup_{stage}"] = out[f"train_step_seconds_whole_{stage}"] / out[f"train_step_seconds_chunked_{stage}"]
    return out


def time_data(stage, cfg, tok, n_batches, image_tokens):
    """Build n real batches of a stage (scenes rendered, text tokenised, collated), as
    train.py does before every step. Returns (median seconds per batch, the first batch)."""
    times, first = [], None
    for step in range(n_batches):
        t0 = time.perf_counter()
        if stage == "clip":
            batch = batches.clip_batch(cfg, tok, step, 0)
        else:
            batch = batches.vlm_batch(cfg, tok, stage, step, 0, image_tokens, getattr(cfg, f"{stage}_batch_size"))
        times.append(time.perf_counter() - t0)
        first = first or batch
    return statistics.median(times), first


# ----------------------------------------------------------------------------- generation


def varied_weights(llm):
    """At the default init the tied head mostly repeats the last input token, so "identical
    tokens" would prove little. Larger weights give varied tokens with wide logit gaps (as
    tests/test_model.py does); the time a step takes does not depend on the values."""
    for p in llm.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.5)
    torch.nn.init.normal_(llm.tok_emb.weight, std=1.0)


@torch.no_grad()
def measure_generation(ref, lengths, device, autocast):
    """Greedy generation from one prompt (an image + GEN_PROMPT_TEXT text tokens) with the
    reference VLM, with and without the KV cache, each timed as the fastest of GEN_REPEATS runs.
    No stop token: every run makes n tokens."""
    torch.manual_seed(0)
    n_image = (ref.image_size // ref.patch_size // ref.shuffle_factor) ** 2
    prompt_len = 1 + n_image + GEN_PROMPT_TEXT
    model = VLM(reference_config(ref, prompt_len + max(lengths))).to(device).eval()
    varied_weights(model.llm)
    prompt = synthetic_vlm_batch(1, prompt_len, n_image, ref.vocab_size - 1, model.cfg.image_token_id,
                                 ref.image_size, device)

    def generate(n, use_cache):
        return model.generate(prompt["input_ids"], prompt["images"], max_new_tokens=n, use_cache=use_cache)[0]

    out, identical = {}, True
    with autocast:
        generate(4, True)  # warm up both paths
        generate(4, False)
        for n in lengths:
            seconds, tokens = {True: math.inf, False: math.inf}, {}
            for _ in range(GEN_REPEATS):  # the fastest of a few runs: a shared machine only ever slows one down
                for use_cache in (True, False):
                    sync(device)
                    t0 = time.perf_counter()
                    tokens[use_cache] = generate(n, use_cache)
                    sync(device)
                    seconds[use_cache] = min(seconds[use_cache], time.perf_counter() - t0)
            identical = identical and tokens[True] == tokens[False] and len(tokens[True]) == n
            out[f"generate_tokens_per_s_cache_{n}"] = n / seconds[True]
            out[f"generate_tokens_per_s_nocache_{n}"] = n / seconds[False]
            out[f"kv_cache_speedup_{n}"] = seconds[False] / seconds[True]
    out["kv_cache_identical_tokens"] = identical
    out["generate_distinct_tokens"] = len(set(tokens[True]))  # of the longest run: not one token repeated
    return out


# ----------------------------------------------------------------------------- the run


def preset_tokenizer(cfg):
    """The preset's tokenizer, trained as train.py trains it, and the VLM's visual tokens per image."""
    tok = Tokenizer(train_bpe(batches.world_texts(cfg), cfg.vocab_size))
    return tok, VLM(train.vlm_config(cfg, tok)).num_image_tokens


def run(bench, ref=None, gen_lengths=GEN_LENGTHS):
    """Every measurement; returns one flat dict (the JSON)."""
    ref = ref or Reference()
    # the timed loop marks a step where train_loop asks for its batch: build batches in the loop
    cfg = train.Config(**dict(train.PRESETS[bench.config], device=bench.device, data_workers=0))
    device, dtype = distributed.pick_device(cfg)
    torch.manual_seed(0)
    size = bench.matmul_size or (2048 if device == "cpu" else 8192)
    peak, vendor = matmul_peak(device, dtype, size), vendor_peak(device)
    results = {"config": bench.config, "device": device, "dtype": str(dtype).replace("torch.", ""),
               "threads": torch.get_num_threads(), "matmul_size": size, "matmul_peak_flops": peak,
               "length_chunks": bench.length_chunks}
    if vendor:
        results["vendor_peak_flops"] = vendor
    # the reference trains with train.py's default optimiser settings, whatever the preset
    results.update(measure_training(reference_workload(ref, device), train.Config(device=device, data_workers=0),
                                    device, dtype, bench, peak, vendor))
    tok, image_tokens = preset_tokenizer(cfg)
    for stage in train.STAGES:
        seconds, real = time_data(stage, cfg, tok, bench.data_batches, image_tokens)
        results[f"data_batch_seconds_{stage}"] = seconds
        results[f"data_scenes_per_s_{stage}"] = getattr(cfg, f"{stage}_batch_size") / seconds
        results.update(measure_training(stage_workload(stage, cfg, tok, real, device), cfg, device, dtype,
                                        bench, peak, vendor))
        # train.py builds each batch in the loop, before the step: this share of its time is data
        results[f"data_share_{stage}"] = seconds / (seconds + results[f"train_step_seconds_{stage}"])
        if stage != "clip":  # CLIP's captions are padded to a fixed length: nothing to trim
            results.update(measure_padding(stage, cfg, tok, real, device, dtype, bench))
    autocast = torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)
    results.update(measure_generation(ref, gen_lengths, device, autocast))
    per_model = [v for k, v in results.items() if k.startswith("peak_memory_bytes_")]
    results["peak_memory_bytes"] = max(per_model + [peak_memory(device)])
    return results


def count_flops(bench):
    """--flops_only: per stage of the preset, model FLOPs per step (the count above, no model
    run), the whole stage's FLOPs and scenes, and the data pipeline's rate on this machine."""
    cfg = train.Config(**train.PRESETS[bench.config])
    tok, image_tokens = preset_tokenizer(cfg)
    results = {"config": bench.config, "assume_flops": bench.assume_flops}
    for stage in train.STAGES:
        seconds, real = time_data(stage, cfg, tok, bench.data_batches, image_tokens)
        w = stage_workload(stage, cfg, tok, real, "cpu")
        steps, flops = getattr(cfg, f"{stage}_steps"), model_flops(w.towers, w.batch_size)
        results.update({f"train_steps_{stage}": steps, f"train_batch_size_{stage}": w.batch_size,
                        f"train_tokens_per_sample_{stage}": w.tokens_per_sample,
                        f"train_flops_per_step_{stage}": flops,
                        f"train_attention_flops_per_step_{stage}": attention_flops(w.towers, w.batch_size),
                        f"train_flops_{stage}": steps * flops,
                        f"data_batch_seconds_{stage}": seconds,
                        f"data_scenes_per_s_{stage}": w.batch_size / seconds})
        if bench.assume_flops:
            results[f"train_step_seconds_{stage}"] = flops / bench.assume_flops
    return results


def format_flops(r):
    """The --flops_only results as a table."""
    G = 1e9
    lines = [f"{r['config']} preset: FLOPs counted, not measured; data timed on this machine, one process", "",
             f"{'stage':<10}{'steps':>6}{'batch':>6}{'tok/smp':>8}{'GFLOP/step':>11}{'attn GF':>8}{'PFLOP':>7}"
             f"{'data s':>8}{'scn/s':>7}" + (f"{'est step s':>11}{'est s':>7}" if r["assume_flops"] else "")]
    for n in train.STAGES:
        line = (f"{n:<10}{r[f'train_steps_{n}']:6d}{r[f'train_batch_size_{n}']:6d}"
                f"{r[f'train_tokens_per_sample_{n}']:8d}{r[f'train_flops_per_step_{n}'] / G:11.1f}"
                f"{r[f'train_attention_flops_per_step_{n}'] / G:8.1f}{r[f'train_flops_{n}'] / 1e15:7.2f}"
                f"{r[f'data_batch_seconds_{n}']:8.3f}{r[f'data_scenes_per_s_{n}']:7.0f}")
        if r["assume_flops"]:
            step = r[f"train_step_seconds_{n}"]
            line += f"{step:11.3f}{step * r[f'train_steps_{n}']:7.0f}"
        lines.append(line)
    total = sum(r[f"train_flops_{n}"] for n in train.STAGES)
    at = f", {total / r['assume_flops']:.0f} s at {r['assume_flops'] / 1e12:.1f} TFLOP/s" if r["assume_flops"] else ""
    lines += ["", f"all stages: {total / 1e15:.2f} PFLOP of model FLOPs{at}",
              "data s: one batch built in one process on this machine (scn/s: its scenes per second)"]
    return "\n".join(lines)


def format_report(r, gen_lengths=GEN_LENGTHS):
    """The results as the tables a person reads."""
    G = 1e9
    size = r["matmul_size"]
    vendor = f"; vendor dense peak {r['vendor_peak_flops'] / G:.0f} GFLOP/s" if "vendor_peak_flops" in r else ""
    lines = [f"device {r['device']} ({r['threads']} threads), {r['dtype']}; matmul peak "
             f"{r['matmul_peak_flops'] / G:.1f} GFLOP/s (median of 10 torch.mm {size}x{size}){vendor}", "",
             f"{'model':<10}{'batch':>6}{'tok/smp':>8}{'step s':>8}{'smp/s':>8}{'tok/s':>8}{'GFLOP':>8}"
             f"{'GFLOP/s':>9}{'MFU':>6}{'attn GF':>8}{'data s':>8}{'scn/s':>7}{'data%':>6}{'mem MB':>8}"
             "  FLOPs: tower x k"]
    for n in ("reference", *train.STAGES):
        if n == "reference":
            data_cols = f"{'-':>8}{'-':>7}{'-':>6}"
        else:
            data_cols = (f"{r[f'data_batch_seconds_{n}']:8.3f}{r[f'data_scenes_per_s_{n}']:7.0f}"
                         f"{100 * r[f'data_share_{n}']:6.1f}")
        lines.append(f"{n:<10}{r[f'train_batch_size_{n}']:6d}{r[f'train_tokens_per_sample_{n}']:8d}"
                     f"{r[f'train_step_seconds_{n}']:8.3f}{r[f'train_samples_per_s_{n}']:8.1f}"
                     f"{r[f'train_tokens_per_s_{n}']:8.0f}{r[f'train_flops_per_step_{n}'] / G:8.1f}"
                     f"{r[f'train_flops_per_s_{n}'] / G:9.1f}{r[f'train_mfu_{n}']:6.2f}"
                     f"{r[f'train_attention_flops_per_step_{n}'] / G:8.1f}{data_cols}"
                     f"{r[f'peak_memory_bytes_{n}'] / 2 ** 20:8.0f}  {r[f'train_flop_multipliers_{n}']}")
    mem = "max RSS of the process so far" if r["device"] == "cpu" else "torch.cuda.max_memory_allocated per model"
    lines += ["",
              "GFLOP: model FLOPs per step = sum of k x params x tokens over the towers (PaLM app. B); k = 6 trained,",
              "4 frozen with gradients through it, 2 frozen forward only. MFU = GFLOP/s / matmul peak. attn GF:",
              "attention FLOPs, not in MFU. tok/smp: the LLM's sequence (CLIP: patches + CLS + text). data s: one",
              "real batch built as train.py builds it (scn/s: its scenes per second; data%: its share of a step",
              f"of train.py, data + model). mem: {mem}.", "",
              f"reference step: {r['train_step_seconds_reference']:.3f} s, MFU {r['train_mfu_reference']:.2f} "
              "(the target: 0.62, what nanoVLM's model code reaches at this config)", "",
              f"{'generate':<10}{'cache tok/s':>12}{'no-cache tok/s':>15}{'speedup':>9}"]
    for n in gen_lengths:
        lines.append(f"{n:<10}{r[f'generate_tokens_per_s_cache_{n}']:12.1f}"
                     f"{r[f'generate_tokens_per_s_nocache_{n}']:15.1f}{r[f'kv_cache_speedup_{n}']:8.1f}x")
    lines.append(f"same tokens with and without the cache: {r['kv_cache_identical_tokens']} "
                 f"({r['generate_distinct_tokens']} distinct tokens in the longest run); the target: "
                 f"the cache >= 5x faster at 256 new tokens")
    lines += ["", f"{'real batch':<10}{'pad%':>6}{'chunked pad%':>13}{'step s':>8}{'chunked s':>10}{'speedup':>9}"
              f"  (train.by_length: {r['length_chunks']} sorted chunks)"]
    for n in list(train.STAGES)[1:]:
        lines.append(f"{n:<10}{100 * r[f'pad_share_{n}']:6.1f}{100 * r[f'pad_share_chunked_{n}']:13.1f}"
                     f"{r[f'train_step_seconds_whole_{n}']:8.3f}{r[f'train_step_seconds_chunked_{n}']:10.3f}"
                     f"{r[f'chunk_speedup_{n}']:8.2f}x")
    return "\n".join(lines)


def parse_args(argv):
    """--config=NAME picks train.py's preset for the stages; the other flags are BenchConfig's."""
    return parse_flags(BenchConfig, argv, {name: {"config": name} for name in train.PRESETS})


def main(argv):
    bench = parse_args(argv)
    t0 = time.perf_counter()
    results = count_flops(bench) if bench.flops_only else run(bench)
    results["bench_seconds"] = time.perf_counter() - t0
    print(format_flops(results) if bench.flops_only else format_report(results))
    print(json.dumps(results, indent=1, sort_keys=True))
    if bench.json:
        with open(bench.json, "w") as f:
            json.dump(results, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
