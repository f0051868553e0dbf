"""Tests for bench.py: the FLOP count of a tiny VLM against parameters counted by hand from
the layer shapes (not with count_parameters), for each way a tower can train; and one run of
every measurement on a tiny config, whose JSON must hold every key bench.py reports and
numbers that agree with each other."""
import json
import math

import bench
from model import VLM, VLMConfig, LLMConfig
from vit import ViT, ViTConfig


def test_flops_match_a_hand_count():
    # ViT: 16x16 image, patch 4 -> 16 patches + CLS = 17 tokens, width 8, 1 block, MLP 32
    # pixel shuffle 2 -> 4 image tokens; LLM: width 16, 1 block, SwiGLU 24, vocab 32, tied head
    vision = ViTConfig(image_size=16, patch_size=4, width=8, depth=1, heads=2, use_cls=True)
    llm = LLMConfig(vocab_size=32, dim=16, n_layers=1, n_heads=2, n_kv_heads=2, ffn_hidden=24, max_seq_len=16)
    model = VLM(VLMConfig(vision=vision, llm=llm, projector="pixel_shuffle", shuffle_factor=2, image_token_id=31))
    vit_block = 2 * 8 + (8 * 24 + 24) + (8 * 8 + 8) + 2 * 8 + (8 * 32 + 32) + (32 * 8 + 8)  # ln1 qkv proj ln2 fc1 fc2
    vit = (3 * 4 * 4 * 8 + 8) + 8 + 17 * 8 + vit_block + 2 * 8  # conv, cls, positions, block, ln_f
    projector = (4 * 8) * 16 + 16  # Linear from 4 concatenated patches to the LLM width
    llm_block = 16 + 16 * 48 + 16 * 16 + 16 + 3 * 16 * 24  # norm, qkv, proj, norm, w1 w3 w2
    lm = 32 * 16 + llm_block + 16  # embedding (= the tied head, once), block, final norm
    assert (vit, projector, lm) == (1424, 528, 2736)
    B, T = 3, 10

    everything = [model.vision, model.projector, model.llm]
    towers = bench.vlm_towers(model, T, everything)
    patch = 3 * 4 * 4 * 8 + 8  # the patch convolution runs once per patch (16), not per token (17)
    assert [(t.params, t.tokens, t.k) for t in towers] == [(patch, 16, 6), (vit - patch, 17, 6), (projector, 4, 6),
                                                           (lm, T, 6)]
    assert bench.model_flops(towers, B) == 6 * B * (patch * 16 + (vit - patch) * 17 + projector * 4 + lm * T)
    # attention, PaLM's 12·L·d·T per token at k = 6: ViT over 17 tokens, LLM over T
    assert bench.attention_flops(towers, B) == B * (12 * 1 * 8 * 17 * 17 + 12 * 1 * 16 * T * T)

    # align: ViT frozen and nothing before it trains (forward only), the projector trains,
    # the frozen LLM passes gradients back to it (forward + input gradients, no weight gradients)
    align = bench.vlm_towers(model, T, [model.projector])
    vit_flops = patch * 16 + (vit - patch) * 17
    assert bench.model_flops(align, B) == B * (2 * vit_flops + 6 * projector * 4 + 4 * lm * T)
    instruct = bench.vlm_towers(model, T, [model.projector, model.llm])
    assert bench.model_flops(instruct, B) == B * (2 * vit_flops + 6 * projector * 4 + 6 * lm * T)
    text_only = bench.vlm_towers(model, T, [model.llm], with_images=False)
    assert bench.model_flops(text_only, B) == 6 * B * lm * T


def test_conv_stem_flops_count_each_convolution_at_its_own_resolution():
    """A 16x16 image, patch 4, width 8: two 3x3 stride-2 convolutions (3 -> 4 -> 8 channels, no
    bias: BatchNorm brings it) at 8x8 and 4x4 outputs, then a 1x1 convolution at 4x4. Each
    kernel runs once per output position, so the stem costs far more than its parameters
    times the 17 tokens would say."""
    vit = ViT(ViTConfig(image_size=16, patch_size=4, width=8, depth=1, heads=2, stem="conv"))
    conv0, conv1, proj = 3 * 3 * 3 * 4, 4 * 3 * 3 * 8, 8 * 8 + 8
    assert [(p, n) for _, p, n in bench.stem_convolutions(vit)] == [(conv0, 64), (conv1, 16), (proj, 16)]
    towers = bench.vision_towers(vit, 2)
    rest = sum(p.numel() for p in vit.parameters()) - conv0 - conv1 - proj  # BatchNorm's 2 x (4 + 8) included
    assert [(t.params, t.tokens, t.k) for t in towers] == [(conv0, 64, 2), (conv1, 16, 2), (proj, 16, 2), (rest, 17, 2)]
    assert bench.model_flops(towers, 1) == 2 * (conv0 * 64 + conv1 * 16 + proj * 16 + rest * 17)


def test_tiny_run_reports_every_key_consistently(tmp_path):
    ref = bench.Reference(image_size=16, patch_size=4, vit_width=16, vit_depth=1, vit_heads=2, llm_dim=32,
                          llm_layers=1, llm_heads=2, llm_ffn_hidden=48, vocab_size=64, seq_len=12, batch_size=2)
    cfg = bench.parse_args(["--config=tiny", "--steps", "1", "--warmup=0", "--data_batches=1", "--matmul_size=128",
                            f"--json={tmp_path / 'b.json'}"])
    assert (cfg.config, cfg.steps, cfg.json) == ("tiny", 1, str(tmp_path / "b.json"))
    r = bench.run(cfg, ref, gen_lengths=(3, 6))

    required = ["matmul_peak_flops", "train_mfu_reference", "train_step_seconds_reference",
                "kv_cache_speedup_3", "kv_cache_speedup_6"]
    required += [f"{key}_{stage}" for stage in ("clip", "lm", "align", "instruct")
                 for key in ("train_mfu", "train_tokens_per_s", "data_scenes_per_s", "data_share")]
    required += [f"{key}_{stage}" for stage in ("lm", "align", "instruct")
                 for key in ("pad_share", "pad_share_chunked", "chunk_speedup")]
    assert not [k for k in required if k not in r]
    json.dumps(r)  # the JSON has plain values only
    assert r["kv_cache_identical_tokens"] is True and r["generate_distinct_tokens"] > 1
    # the derived numbers follow from the measured ones
    for name in ("reference", "clip", "lm", "align", "instruct"):
        seconds, flops = r[f"train_step_seconds_{name}"], r[f"train_flops_per_step_{name}"]
        assert seconds > 0 and flops > 0
        assert math.isclose(r[f"train_flops_per_s_{name}"], flops / seconds)
        assert math.isclose(r[f"train_mfu_{name}"], flops / seconds / r["matmul_peak_flops"])
        assert math.isclose(r[f"train_tokens_per_s_{name}"],
                            r[f"train_batch_size_{name}"] * r[f"train_tokens_per_sample_{name}"] / seconds)
    reference = bench.reference_workload(ref, "cpu")
    assert r["train_flops_per_step_reference"] == bench.model_flops(reference.towers, 2)
    assert r["train_tokens_per_sample_reference"] == 12
    assert r["train_flop_multipliers_align"] == "visionx2 projectorx6 llmx4"
    assert "reference" in bench.format_report(r, (3, 6))
    for stage in ("lm", "align", "instruct"):  # sorted chunks never pad more than the whole batch
        assert 0 <= r[f"pad_share_chunked_{stage}"] <= r[f"pad_share_{stage}"] < 1
        assert math.isclose(r[f"chunk_speedup_{stage}"], r[f"train_step_seconds_whole_{stage}"]
                            / r[f"train_step_seconds_chunked_{stage}"])


def test_flops_only_counts_every_stage_without_timing_a_model():
    """--flops_only (for presets too big to time here, like colab): each stage's FLOPs per step
    are the count of its model as train.py builds it, times its steps; --assume_flops turns
    them into seconds; the batch sizes and steps are the preset's."""
    cfg = bench.parse_args(["--config=tiny", "--flops_only", "--assume_flops=1e12", "--data_batches=1"])
    r = bench.count_flops(cfg)
    tiny = bench.train.Config(**bench.train.PRESETS["tiny"])
    for stage in bench.train.STAGES:
        steps, batch = getattr(tiny, f"{stage}_steps"), getattr(tiny, f"{stage}_batch_size")
        assert (r[f"train_steps_{stage}"], r[f"train_batch_size_{stage}"]) == (steps, batch)
        assert r[f"train_flops_{stage}"] == steps * r[f"train_flops_per_step_{stage}"] > 0
        assert math.isclose(r[f"train_step_seconds_{stage}"], r[f"train_flops_per_step_{stage}"] / 1e12)
        assert r[f"data_scenes_per_s_{stage}"] > 0
    # a CLIP sample: 8x8 patches + CLS through the ViT, the padded caption through the text tower
    assert r["train_tokens_per_sample_clip"] == (tiny.image_size // tiny.patch_size) ** 2 + 1 + tiny.context_length
    assert "PFLOP" in bench.format_flops(r)
