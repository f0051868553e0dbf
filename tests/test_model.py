"""Tests for model.py. Each test checks numbers against a computation that is not the code
under test: RMSNorm against its formula, RoPE against complex multiplication, SDPA against
the explicit softmax, GQA against multi-head attention with duplicated key/value heads,
padded batches against unpadded rows, cached generation against full recomputation, the
loss against a loop over labelled positions. Two end-to-end runs must learn."""

import math
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from model import (KVCache, LanguageModel, LLMConfig, LoRALinear, RegionNames, RMSNorm, VLM, VLMConfig, add_lora,
                   apply_rope, count_parameters, filter_logits, merge_lora, rope_cache, sample_next)
from vit import ViTConfig

IMG = 3  # the <|image|> id in these tests


def tiny_llm(**kw):
    base = dict(vocab_size=40, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48, max_seq_len=64)
    return LLMConfig(**{**base, **kw})


def tiny_vlm(projector="mlp", **llm_kw):
    vision = ViTConfig(image_size=16, patch_size=4, width=24, depth=2, heads=2)  # 4x4 = 16 patches
    return VLM(VLMConfig(vision=vision, llm=tiny_llm(**llm_kw), projector=projector, image_token_id=IMG))


def test_config_validates_and_derives_head_dim():
    cfg = LLMConfig(dim=96, n_heads=6, n_kv_heads=2)
    assert cfg.head_dim == 16
    assert "head_dim" not in asdict(cfg)  # derived, so asdict(cfg) rebuilds the same config
    with pytest.raises(ValueError, match="divide"):
        LLMConfig(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="divisible"):
        LLMConfig(dim=250, n_heads=4)
    vcfg = VLMConfig(vision=ViTConfig(image_size=32), llm=LLMConfig(dim=64), image_token_id=7)
    assert VLMConfig.from_dict(asdict(vcfg)) == vcfg


def test_rmsnorm_matches_formula():
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-5)
    norm.weight.data = torch.randn(16)
    x = torch.randn(3, 5, 16) * 4
    xd, wd = x.double(), norm.weight.detach().double()
    expected = xd / torch.sqrt((xd ** 2).mean(-1, keepdim=True) + 1e-5) * wd
    torch.testing.assert_close(norm(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_rope_equals_complex_rotation_and_is_relative():
    torch.manual_seed(0)
    hd, L, theta = 8, 64, 10000.0
    cos, sin = rope_cache(hd, L, theta)
    x = torch.randn(1, 2, L, hd)  # (B, H, T, hd)
    pos = torch.arange(L)[None]  # (1, T)
    got = apply_rope(x, cos[pos], sin[pos])
    # reference: channel pairs as complex numbers, multiplied by e^{i m θ_i}, θ_i = theta^(-2i/hd)
    freqs = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)  # (hd/2,)
    rot = torch.polar(torch.ones(L, hd // 2, dtype=torch.float64), torch.arange(L)[:, None] * freqs)  # (T, hd/2)
    z = torch.view_as_complex(x.double().reshape(1, 2, L, hd // 2, 2).contiguous()) * rot
    torch.testing.assert_close(got.double(), torch.view_as_real(z).flatten(-2), atol=1e-5, rtol=1e-5)

    # the same q and k placed at positions (m, n): <q_m, k_n> depends only on m - n
    q, k = torch.randn(hd), torch.randn(hd)

    def dot(m, n):
        qm = apply_rope(q.view(1, 1, 1, hd), cos[m].view(1, 1, -1), sin[m].view(1, 1, -1))
        kn = apply_rope(k.view(1, 1, 1, hd), cos[n].view(1, 1, -1), sin[n].view(1, 1, -1))
        return (qm * kn).sum().item()

    for offset in (0, 3, 17):
        d = [dot(n + offset, n) for n in (0, 5, 30, 40)]
        assert max(d) - min(d) < 1e-4, d
    assert abs(dot(3, 0) - dot(17, 0)) > 1e-3  # and it does change with the offset


@pytest.mark.parametrize("padded", [False, True])
def test_sdpa_equals_explicit_attention(padded):
    torch.manual_seed(0)
    fast = LanguageModel(tiny_llm(n_kv_heads=2))
    slow = LanguageModel(tiny_llm(n_kv_heads=2, explicit_attention=True))
    slow.load_state_dict(fast.state_dict())
    ids = torch.randint(0, 40, (3, 12))
    mask = None
    if padded:
        mask = torch.ones(3, 12, dtype=torch.long)
        mask[0, :4] = 0
        mask[2, :7] = 0
    a, b = fast(ids, attention_mask=mask), slow(ids, attention_mask=mask)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()  # pad queries too
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_gqa_equals_multi_head_attention_with_repeated_kv_heads():
    # GQA with 2 key/value heads for 4 query heads is exactly multi-head attention whose
    # key/value heads 2g and 2g+1 are both copies of GQA's head g
    torch.manual_seed(0)
    gqa = LanguageModel(tiny_llm(n_kv_heads=2))
    mha = LanguageModel(tiny_llm(n_kv_heads=4))
    state = gqa.state_dict()
    for i in range(2):
        w = state[f"blocks.{i}.attn.qkv.weight"]  # (32 + 2·16, 32): q, then k, v with 2 heads of 8
        q, k, v = w.split([32, 16, 16])
        k, v = (t.view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32) for t in (k, v))
        state[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q, k, v])
    mha.load_state_dict(state)
    ids = torch.randint(0, 40, (2, 10))
    torch.testing.assert_close(gqa(ids), mha(ids), atol=1e-5, rtol=1e-5)


def test_padded_batch_equals_rows_alone():
    torch.manual_seed(0)
    lm = LanguageModel(tiny_llm())
    rows = [torch.randint(0, 40, (n,)) for n in (9, 4, 6)]
    alone = [lm(r[None])[0] for r in rows]  # (n, V) each
    T = 9
    for side in ("left", "right"):
        ids = torch.zeros(3, T, dtype=torch.long)
        mask = torch.zeros(3, T, dtype=torch.long)
        for b, r in enumerate(rows):
            span = slice(T - len(r), T) if side == "left" else slice(0, len(r))
            ids[b, span], mask[b, span] = r, 1
        logits = lm(ids, attention_mask=mask)
        assert torch.isfinite(logits).all()
        for b, r in enumerate(rows):
            span = slice(T - len(r), T) if side == "left" else slice(0, len(r))
            torch.testing.assert_close(logits[b, span], alone[b], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("explicit", [False, True])
def test_kv_cache_prefill_then_steps_equals_full_forward(explicit):
    torch.manual_seed(0)
    lm = LanguageModel(tiny_llm(explicit_attention=explicit))
    ids = torch.randint(0, 40, (2, 10))
    full = lm(ids)
    cache = KVCache(lm.cfg, batch_size=2, max_len=10)
    # a prefill, a 3-token chunk after it (causal, aligned to the end of the keys), then single tokens
    parts = [lm(ids[:, :4], kv_cache=cache), lm(ids[:, 4:7], kv_cache=cache)]
    parts += [lm(ids[:, t : t + 1], kv_cache=cache) for t in range(7, 10)]
    assert cache.length == 10 and not cache.padded  # no padding: the steps run without any mask
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_remembers_left_padding_of_the_prompt():
    torch.manual_seed(0)
    lm = LanguageModel(tiny_llm())
    ids = torch.randint(0, 40, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # row 1: three pads on the left
    full = lm(ids, attention_mask=mask)
    cache = KVCache(lm.cfg, batch_size=2, max_len=9)
    parts = [lm(ids[:, :6], attention_mask=mask[:, :6], kv_cache=cache)]
    assert cache.padded
    # the steps bring no mask: the cache knows which of its slots are pads
    parts += [lm(ids[:, t : t + 1], kv_cache=cache) for t in range(6, 9)]
    got = torch.cat(parts, dim=1)
    torch.testing.assert_close(got[1, 3:], full[1, 3:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[0], full[0], atol=1e-5, rtol=1e-5)
    # an all-ones mask is no padding: the cache stays on the unmasked path
    cache = KVCache(lm.cfg, batch_size=2, max_len=9)
    lm(ids, attention_mask=torch.ones_like(ids), kv_cache=cache)
    assert not cache.padded


def left_padded_prompts(vlm, gen):
    """Two prompts with one image each, of different lengths, left-padded; and the rows alone."""
    n = vlm.num_image_tokens
    rows = [torch.cat([torch.randint(4, 40, (k,), generator=gen), torch.full((n,), IMG),
                       torch.randint(4, 40, (m,), generator=gen)]) for k, m in ((2, 5), (1, 1))]
    T = max(len(r) for r in rows)
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):], mask[b, T - len(r):] = r, 1
    return ids, mask, rows


def test_generate_with_and_without_cache_gives_the_same_tokens():
    torch.manual_seed(0)
    vlm = tiny_vlm().eval()
    # large weights: wide logit gaps (no near-ties that rounding could flip) and varied tokens
    # (at the default init the tied head mostly repeats the last input token)
    for p in vlm.llm.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.5)
    torch.nn.init.normal_(vlm.llm.tok_emb.weight, std=1.0)
    ids, mask, rows = left_padded_prompts(vlm, torch.Generator().manual_seed(1))
    images = torch.randn(2, 3, 16, 16)
    kw = dict(images=images, attention_mask=mask, max_new_tokens=20)
    cached = vlm.generate(ids, use_cache=True, **kw)
    assert cached == vlm.generate(ids, use_cache=False, **kw)
    assert all(len(c) == 20 and len(set(c)) > 5 for c in cached)
    # the batched, left-padded answer is each prompt's answer when run alone
    for b, r in enumerate(rows):
        assert vlm.generate(r[None], images=images[b : b + 1], max_new_tokens=20) == [cached[b]]
    # sampling: the same generator seed draws the same tokens with and without the cache
    kw.update(temperature=1.0, top_k=10)
    sampled = vlm.generate(ids, generator=torch.Generator().manual_seed(5), **kw)
    assert sampled == vlm.generate(ids, use_cache=False, generator=torch.Generator().manual_seed(5), **kw)
    assert sampled != cached
    # stopping: a row ends just before its first stop token; the other row is unaffected unless it meets it
    stop = cached[0][3]
    stopped = vlm.generate(ids, stop_id=stop, **dict(kw, temperature=0.0, top_k=None))
    for got, full in zip(stopped, cached):
        assert got == (full[: full.index(stop)] if stop in full else full)


def test_stream_yields_every_step_and_ends_once_every_row_has_stopped():
    """VLM.stream is the decoding loop generate() collects: one (B,) tensor per step, the same
    tokens whether or not a stop id is given, and no step after every row has met it."""
    torch.manual_seed(0)
    vlm = tiny_vlm().eval()
    for p in vlm.llm.parameters():  # large weights: varied tokens (see the test above)
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.5)
    ids, mask, _ = left_padded_prompts(vlm, torch.Generator().manual_seed(1))
    images = torch.randn(2, 3, 16, 16)
    free = torch.stack(list(vlm.stream(ids, images, mask, max_new_tokens=12)))  # (steps, B)
    assert free.shape == (12, 2)
    stop = int(free[4, 0])
    stopped = torch.stack(list(vlm.stream(ids, images, mask, max_new_tokens=12, stop_id=stop)))  # (steps, B)
    first_stop = [row.tolist().index(stop) if stop in row.tolist() else 11 for row in free.T]
    assert len(stopped) == max(first_stop) + 1 and len(stopped) <= 12
    assert torch.equal(stopped, free[:len(stopped)])


def test_text_only_generation_and_max_seq_len_check():
    torch.manual_seed(0)
    vlm = tiny_vlm().eval()
    ids = torch.randint(4, 40, (2, 5))
    out = vlm.generate(ids, max_new_tokens=4)
    assert [len(o) for o in out] == [4, 4]
    with pytest.raises(ValueError, match="max_seq_len"):
        vlm.generate(ids, max_new_tokens=61)


def test_tied_embeddings_and_parameter_count():
    lm = LanguageModel(tiny_llm())
    assert lm.head.weight is lm.tok_emb.weight
    c = lm.cfg
    attn = c.dim * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim + c.dim * c.dim  # qkv, proj
    per_block = attn + 3 * c.dim * c.ffn_hidden + 2 * c.dim  # + w1, w2, w3, two RMSNorm weights
    assert count_parameters(lm) == c.vocab_size * c.dim + c.n_layers * per_block + c.dim  # embedding counted once


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    lm = LanguageModel(tiny_llm(dim=256, n_heads=4, n_kv_heads=4, ffn_hidden=512, n_layers=8))
    assert abs(lm.blocks[0].attn.qkv.weight.std().item() - 0.02) < 1e-3
    for w in (lm.blocks[3].attn.proj.weight, lm.blocks[3].mlp.w2.weight):
        assert abs(w.std().item() - 0.02 / math.sqrt(16)) < 3e-4


@pytest.mark.parametrize("projector", ["mlp", "pixel_shuffle"])
def test_visual_tokens_land_on_image_slots(projector):
    torch.manual_seed(0)
    vlm = tiny_vlm(projector)
    n = vlm.num_image_tokens
    images = torch.randn(3, 3, 16, 16)
    # row 0 holds images 0 and 1 (at different offsets), row 1 holds image 2
    ids = torch.randint(4, 40, (2, 3 * n))
    ids[0, 1 : 1 + n] = IMG
    ids[0, 2 * n : 3 * n] = IMG
    ids[1, 5 : 5 + n] = IMG
    embeds = vlm.embed(ids, images)
    visual = vlm.encode_images(images)  # (3, N', D)
    assert visual.shape == (3, n, 32)
    torch.testing.assert_close(embeds[0, 1 : 1 + n], visual[0])
    torch.testing.assert_close(embeds[0, 2 * n : 3 * n], visual[1])
    torch.testing.assert_close(embeds[1, 5 : 5 + n], visual[2])
    text = ids != IMG
    torch.testing.assert_close(embeds[text], vlm.llm.tok_emb.weight[ids[text]])


def test_region_names_start_as_the_sum_of_their_words_and_are_added_to_every_image():
    torch.manual_seed(0)
    vision = ViTConfig(image_size=12, patch_size=4, width=24, depth=2, heads=2)  # 3x3 patches
    vlm = VLM(VLMConfig(vision=vision, llm=tiny_llm(), region_names=True, image_token_id=IMG))
    assert vlm.num_image_tokens == 9 and vlm.regions.grid == 3 and not vlm.regions.weight.any()
    words = [[5 + k] if k % 2 else [5 + k, 20 + k] for k in range(9)]  # one word or two per region
    emb = vlm.llm.tok_emb.weight.detach()
    vlm.regions.name(emb, words, norm=7.0)
    for k, ids in enumerate(words):  # 3x3 visual tokens: token k is region k
        name = emb[ids].sum(0)
        torch.testing.assert_close(vlm.regions.weight[k], 7.0 * name / name.norm())
    images = torch.randn(2, 3, 12, 12)
    patches = vlm.vision(images, keep_cls=False)
    torch.testing.assert_close(vlm.encode_images(images), vlm.projector(patches) + vlm.regions.weight)


def test_a_finer_grid_of_visual_tokens_takes_the_names_of_the_regions_holding_their_centres():
    regions = RegionNames(grid=4, dim=8)  # 4x4 visual tokens over the 3x3 regions
    emb = torch.randn(20, 8)
    regions.name(emb, [[k] for k in range(9)], norm=1.0)
    third = (0, 1, 1, 2)  # centres at 1/8, 3/8, 5/8, 7/8 of the side fall in thirds 0, 1, 1, 2
    for r in range(4):
        for c in range(4):
            name = emb[3 * third[r] + third[c]]
            torch.testing.assert_close(regions.weight[4 * r + c], name / name.norm())


def test_the_resampler_has_no_region_names():
    vlm = tiny_vlm("resampler")  # its learned queries have no place in the grid
    named = VLM(VLMConfig(vision=vlm.cfg.vision, llm=vlm.cfg.llm, projector="resampler", region_names=True,
                          image_token_id=IMG))
    assert named.regions is None and not any(k.startswith("regions") for k in named.state_dict())


def test_kept_attention_weights_are_causal_hide_padding_and_leave_logits_alone():
    torch.manual_seed(0)
    vlm = tiny_vlm().eval()
    ids = torch.randint(4, 40, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0  # row 1 is left-padded by three tokens
    plain, _ = vlm(ids, attention_mask=mask)
    for block in vlm.llm.blocks:
        block.attn.keep_attention = True
    kept, _ = vlm(ids, attention_mask=mask)
    torch.testing.assert_close(kept, plain, atol=1e-5, rtol=1e-5)
    for block in vlm.llm.blocks:
        w = block.attn.attention_weights  # (B, H, T, S)
        assert w.shape == (2, 4, 10, 10)
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 10))
        assert (w.triu(1) == 0).all()  # no token reads a later one
        assert (w[1, :, 3:, :3] == 0).all()  # real tokens never read the padding


def test_image_slot_count_mismatch_raises():
    vlm = tiny_vlm()
    ids = torch.full((1, vlm.num_image_tokens + 1), IMG)
    with pytest.raises(ValueError, match="<\\|image\\|> tokens"):
        vlm.embed(ids, torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="0 images"):
        vlm(ids)


def test_loss_counts_only_labelled_tokens():
    torch.manual_seed(0)
    vlm = tiny_vlm()
    ids = torch.randint(4, 40, (2, 8))
    labels = torch.full_like(ids, -100)
    labels[0, 3:6] = ids[0, 3:6]
    labels[1, 7] = ids[1, 7]
    labels[1, 0] = ids[1, 0]  # the first label has no position before it to predict it: never counted
    logits, loss = vlm(ids, labels=labels)
    terms = [-F.log_softmax(logits[b, t - 1], -1)[labels[b, t]] for b in range(2) for t in range(1, 8)
             if labels[b, t] != -100]
    assert len(terms) == 4
    torch.testing.assert_close(loss, torch.stack(terms).mean())


def test_top_k_top_p_keep_the_right_tokens():
    probs = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]])
    logits = probs.log()

    def kept(**kw):
        return set(torch.isfinite(filter_logits(logits, **kw))[0].nonzero().flatten().tolist())

    assert kept(top_k=2) == {1, 3}
    assert kept(top_k=1) == {1}
    assert kept(top_p=0.6) == {1, 3}  # 0.4 < 0.6, 0.4 + 0.3 reaches it
    assert kept(top_p=0.75) == {1, 3, 4}
    assert kept(top_p=0.0) == {1}  # the most likely token always stays
    assert kept(top_p=1.0) == {0, 1, 2, 3, 4}
    assert kept(top_k=3, top_p=0.5) == {1, 3}  # top-p on the renormalised top-3
    # sampling draws only kept tokens, in proportion to their renormalised probabilities
    draws = sample_next(logits.expand(4000, 5), temperature=1.0, top_p=0.75, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=5).float() / 4000
    torch.testing.assert_close(freq, torch.tensor([0, 0.4, 0, 0.3, 0.15]) / 0.85, atol=0.03, rtol=0)


def overfit(lm, params, ids, steps=100, lr=1e-2):
    """AdamW on next-token loss of one sequence; the loss at every step."""
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(lm(ids)[0, :-1], ids[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_tiny_language_model_overfits_a_sequence():
    torch.manual_seed(0)
    lm = LanguageModel(tiny_llm())
    losses = overfit(lm, lm.parameters(), torch.randint(0, 40, (1, 24)))
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


def test_tiny_vlm_learns_to_read_the_colour_of_the_image():
    # toy task: a solid-colour image, then a question token; the answer token names the colour.
    # The text is identical for every colour, so only the image can tell the answer.
    torch.manual_seed(0)
    colours = torch.tensor([[1.0, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1]])  # red green blue yellow
    answers = torch.arange(10, 14)  # answer token of colour c
    vision = ViTConfig(image_size=8, patch_size=4, width=32, depth=1, heads=2)
    llm = LLMConfig(vocab_size=16, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_hidden=64, max_seq_len=16)
    vlm = VLM(VLMConfig(vision=vision, llm=llm, projector="mlp", image_token_id=IMG))
    n = vlm.num_image_tokens
    QUESTION = 5

    def batch(c):
        images = colours[c][:, :, None, None].expand(-1, 3, 8, 8)  # (B, 3, 8, 8)
        ids = torch.cat([torch.full((len(c), n), IMG), torch.full((len(c), 1), QUESTION), answers[c][:, None]], 1)
        labels = torch.full_like(ids, -100)
        labels[:, -1] = ids[:, -1]
        return images, ids, labels

    opt = torch.optim.AdamW(vlm.parameters(), lr=3e-3)
    for _ in range(150):
        images, ids, labels = batch(torch.randint(0, 4, (32,)))
        _, loss = vlm(ids, images, labels=labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

    images, ids, _ = batch(torch.arange(4).repeat(10))
    with torch.no_grad():
        right = (vlm(ids[:, :-1], images)[0][:, -1].argmax(-1) == ids[:, -1]).float().mean().item()
        blank = (vlm(ids[:, :-1], torch.zeros_like(images))[0][:, -1].argmax(-1) == ids[:, -1]).float().mean().item()
    assert right == 1.0 and blank <= 0.5, (right, blank)


# ----------------------------------------------------------------------------- LoRA


def test_lora_starts_as_the_base_layer_and_computes_its_formula():
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 20)
    lora = LoRALinear(base, rank=3, alpha=6.0)
    x = torch.randn(4, 5, 12)
    assert torch.count_nonzero(lora.lora_B) == 0 and torch.count_nonzero(lora.lora_A) > 0
    assert torch.equal(lora(x), base(x))  # B = 0: exactly the base layer at the start
    lora.lora_B.data.normal_()
    expected = x @ base.weight.T + base.bias + 2.0 * (x @ (lora.lora_B @ lora.lora_A).T)  # alpha/r = 2
    torch.testing.assert_close(lora(x), expected)
    assert not base.weight.requires_grad and not base.bias.requires_grad


def test_lora_adapts_every_attention_and_mlp_matrix_of_the_llm_only():
    torch.manual_seed(0)
    vlm = tiny_vlm()
    D, H, Hkv, hd, F_, L, r = 32, 4, 2, 8, 48, 2, 4
    adapters = add_lora(vlm, rank=r, alpha=8.0)
    wrapped = {n for n, m in vlm.named_modules() if isinstance(m, LoRALinear)}
    assert wrapped == {f"llm.blocks.{i}.{n}" for i in range(L)
                       for n in ("attn.qkv", "attn.proj", "mlp.w1", "mlp.w2", "mlp.w3")}
    # r·(in + out) per matrix: qkv D -> (H + 2·Hkv)·hd, proj H·hd -> D, w1 and w3 D -> F, w2 F -> D
    per_block = r * ((D + (H + 2 * Hkv) * hd) + (H * hd + D) + 2 * (D + F_) + (F_ + D))
    assert sum(p.numel() for p in adapters) == L * per_block == 3200
    assert all(p.requires_grad for p in adapters)


def test_merged_lora_equals_the_unmerged_model_and_loads_as_a_plain_one():
    torch.manual_seed(0)
    vlm = tiny_vlm()
    plain_keys = set(vlm.state_dict())
    add_lora(vlm, rank=4, alpha=8.0)
    for m in vlm.modules():
        if isinstance(m, LoRALinear):
            m.lora_B.data.normal_(std=0.1)  # a trained-looking adapter, not the zero start
    ids = torch.randint(4, 40, (2, 20))
    ids[:, 2:2 + vlm.num_image_tokens] = IMG
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        unmerged = vlm(ids, images)[0]
        merge_lora(vlm)
        merged = vlm(ids, images)[0]
    assert not any(isinstance(m, LoRALinear) for m in vlm.modules())
    assert (unmerged - vlm.llm.head(vlm.llm.norm(torch.zeros(1, 32)))).abs().max() > 0.1  # not trivially equal
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-4)
    assert set(vlm.state_dict()) == plain_keys
    fresh = tiny_vlm()
    fresh.load_state_dict(vlm.state_dict())  # strict: what generate.py does with instruct.pt
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids, images)[0], merged)


def test_lora_training_moves_only_the_adapters_and_learns():
    """Fine-tuning as in the instruct stage: an LLM trained on one sequence learns another
    through rank-4 adapters alone. Every base weight is unchanged bit for bit, and the loss
    falls below half its start. (From the N(0, 0.02) init instead, the frozen tied head caps
    every logit near 0.6, and no adapter can get far below the uniform loss.)"""
    torch.manual_seed(0)
    lm = LanguageModel(tiny_llm())
    overfit(lm, lm.parameters(), torch.randint(0, 40, (1, 24)))  # "pretraining"
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    adapters = add_lora(lm, rank=4, alpha=8.0)
    for p in lm.parameters():
        p.requires_grad_(False)
    for p in adapters:
        p.requires_grad_(True)
    losses = overfit(lm, adapters, torch.randint(0, 40, (1, 24)))
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
    after = {k.replace(".base.", "."): v for k, v in lm.state_dict().items() if "lora_" not in k}
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
