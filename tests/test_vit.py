"""Tests for vit.py: each checks numbers against an independent computation."""
from dataclasses import asdict

import pytest
import torch

import vit
import torch.nn.functional as F

from vit import ConvStem, PatchEmbed, ViT, ViTConfig, attention


def test_patch_embed_conv_equals_unfold_and_hand_patch():
    torch.manual_seed(0)
    pe = PatchEmbed(patch_size=4, width=16)
    x = torch.randn(2, 3, 12, 12)
    out = pe(x)
    assert out.shape == (2, 9, 16)
    torch.testing.assert_close(pe.forward_unfold(x), out, atol=1e-5, rtol=1e-5)
    # one patch by hand: token r*3+c is the patch at grid row r, column c, flattened
    # channel-first and dotted with the conv kernel -- no unfold, no conv
    r, c = 1, 2
    patch = x[:, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4].reshape(2, -1)  # (B, 3*P*P)
    by_hand = patch @ pe.proj.weight.reshape(16, -1).T + pe.proj.bias
    torch.testing.assert_close(out[:, 3 * r + c], by_hand, atol=1e-5, rtol=1e-5)


def test_conv_stem_equals_its_convolutions_run_by_hand():
    """ConvStem on a 32x32 image with P=8: three 3x3 stride-2 convolutions (3 -> 4 -> 8 -> 16
    channels) each with BatchNorm (eval mode: running statistics, here set to known values)
    and ReLU, then a 1x1 convolution; tokens in row-major order like PatchEmbed's."""
    torch.manual_seed(0)
    stem = ConvStem(patch_size=8, width=16).eval()
    assert [c.out_channels for c in stem.convs] == [4, 8, 16] and all(c.stride == (2, 2) for c in stem.convs)
    for norm in stem.norms:  # statistics and affine numbers that are not the identity
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.data.uniform_(0.5, 1.5)
        norm.bias.data.normal_()
    x = torch.randn(2, 3, 32, 32)
    h = x
    for conv, norm in zip(stem.convs, stem.norms):
        h = F.conv2d(h, conv.weight, stride=2, padding=1)
        h = (h - norm.running_mean[:, None, None]) / torch.sqrt(norm.running_var[:, None, None] + norm.eps)
        h = torch.relu(h * norm.weight[:, None, None] + norm.bias[:, None, None])
    h = torch.einsum("oc,bchw->bhwo", stem.proj.weight[:, :, 0, 0], h) + stem.proj.bias  # (B, 4, 4, 16)
    torch.testing.assert_close(stem(x), h.reshape(2, 16, 16), atol=1e-5, rtol=1e-5)


def test_conv_stem_gives_the_same_grid_as_the_patch_stem_and_needs_a_power_of_two():
    for stem in ("patch", "conv"):
        m = ViT(ViTConfig(image_size=48, patch_size=16, width=32, depth=1, heads=2, stem=stem))
        assert m(torch.randn(2, 3, 48, 48)).shape == (2, 1 + 9, 32)
    with pytest.raises(ValueError, match="power of 2"):
        ViT(ViTConfig(image_size=48, patch_size=12, width=32, depth=1, heads=2, stem="conv"))
    with pytest.raises(ValueError, match="unknown stem"):
        ViTConfig(stem="hexagon")


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_equals_explicit_attention(causal):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8) for _ in range(3))
    torch.testing.assert_close(attention(q, k, v, causal), attention(q, k, v, causal, explicit=True),
                               atol=1e-5, rtol=1e-5)
    # with a padding mask (both paths take the mask route)
    mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    mask[1, ..., 5:] = False
    a = attention(q, k, v, causal, mask=mask)
    torch.testing.assert_close(a, attention(q, k, v, causal, mask=mask, explicit=True), atol=1e-5, rtol=1e-5)
    # masked keys must not matter: change them, the output stays
    v2 = v.clone()
    v2[1, :, 5:] += 100.0
    torch.testing.assert_close(attention(q, k, v2, causal, mask=mask), a, atol=1e-5, rtol=1e-5)


def test_explicit_attention_against_loop():
    """The explicit path against a per-query loop with torch.softmax on one row at a time."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 1, 5, 4) for _ in range(3))
    out = attention(q, k, v, causal=True, explicit=True)
    for i in range(5):
        s = torch.stack([(q[0, 0, i] * k[0, 0, j]).sum() / 2.0 for j in range(i + 1)])  # sqrt(4) = 2
        ref = (s.softmax(0)[:, None] * v[0, 0, : i + 1]).sum(0)
        torch.testing.assert_close(out[0, 0, i], ref, atol=1e-6, rtol=1e-5)


def test_causal_attention_with_cache_matches_full():
    """Queries for only the last 3 positions (a KV cache) give the last 3 rows of full causal attention."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 6, 8) for _ in range(3))
    full = attention(q, k, v, causal=True)
    for explicit in (False, True):
        tail = attention(q[:, :, 3:], k, v, causal=True, explicit=explicit)
        torch.testing.assert_close(tail, full[:, :, 3:], atol=1e-5, rtol=1e-5)
    # causality: changing the future keys/values leaves the past outputs alone
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 4:] += 1.0
    v2[:, :, 4:] += 1.0
    torch.testing.assert_close(attention(q, k2, v2, causal=True)[:, :, :4], full[:, :, :4])


@pytest.mark.parametrize("causal", [False, True])
def test_returned_weights_are_the_softmax_that_mixes_v(causal):
    """return_weights gives softmax(QK^T/sqrt(hs)) computed here by hand, masked keys get
    exactly 0, and those weights times V are the (unchanged) output."""
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 3, 6, 8) for _ in range(3))
    mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    mask[0, ..., 4:] = False  # row 0: the last two keys are padding
    out, weights = attention(q, k, v, causal, mask=mask, return_weights=True)
    assert weights.shape == (2, 3, 6, 6)
    allowed = mask & (torch.ones(6, 6).tril().bool() if causal else True)  # (2, 1, 6, 6)
    by_hand = torch.exp(q @ k.transpose(-2, -1) / 8 ** 0.5) * allowed  # unnormalised
    torch.testing.assert_close(weights, by_hand / by_hand.sum(-1, keepdim=True), atol=1e-6, rtol=1e-5)
    assert (weights[~allowed.expand_as(weights)] == 0).all()
    torch.testing.assert_close(out, attention(q, k, v, causal, mask=mask), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, weights @ v)


def test_block_keeps_attention_weights_without_changing_its_output():
    torch.manual_seed(0)
    block, x = vit.Block(width=16, heads=2), torch.randn(2, 5, 16)
    plain = block(x)
    assert block.attention_weights is None  # nothing kept unless asked
    block.keep_attention = True
    torch.testing.assert_close(block(x), plain, atol=1e-5, rtol=1e-5)
    assert block.attention_weights.shape == (2, 2, 5, 5)
    torch.testing.assert_close(block.attention_weights.sum(-1), torch.ones(2, 2, 5))


def small_vit(use_cls=True):
    torch.manual_seed(0)
    return ViT(ViTConfig(image_size=16, patch_size=4, width=32, depth=3, heads=4, use_cls=use_cls)).eval()


def test_vit_shapes_and_cls():
    x = torch.randn(2, 3, 16, 16)
    m = small_vit(use_cls=True)
    assert m.num_patches == 16
    full = m(x)
    assert full.shape == (2, 17, 32)
    no_cls = m(x, keep_cls=False)
    assert no_cls.shape == (2, 16, 32)
    torch.testing.assert_close(no_cls, full[:, 1:])
    torch.testing.assert_close(m.pooled(x), full[:, 0])
    m2 = small_vit(use_cls=False)
    assert m2(x).shape == (2, 16, 32) and m2(x, keep_cls=False).shape == (2, 16, 32)
    torch.testing.assert_close(m2.pooled(x), m2(x).mean(1))


@pytest.mark.parametrize("use_cls", [True, False])
def test_vit_layer_selection_matches_blocks_run_by_hand(use_cls):
    m = small_vit(use_cls)
    x = torch.randn(2, 3, 16, 16)
    h = m.patch_embed(x)
    if use_cls:
        h = torch.cat([m.cls_token.expand(2, -1, -1), h], 1)
    h = h + m.pos_emb
    hidden = []
    for blk in m.blocks:
        h = blk(h)
        hidden.append(h)
    for i in range(3):
        torch.testing.assert_close(m(x, layer=i), hidden[i] if i < 2 else m.ln_f(hidden[i]))
    torch.testing.assert_close(m(x, layer=-2), hidden[1])           # penultimate: raw, no final LN
    torch.testing.assert_close(m(x, layer=-1), m.ln_f(hidden[2]))   # last: final LN applied
    assert not torch.allclose(m(x, layer=-1), hidden[2])
    with pytest.raises(ValueError):
        m(x, layer=3)
    with pytest.raises(ValueError):
        m(torch.randn(1, 3, 20, 20))


def test_explicit_attention_flag_gives_same_vit(monkeypatch):
    m = small_vit()
    x = torch.randn(2, 3, 16, 16)
    fast = m(x)
    monkeypatch.setattr(vit, "EXPLICIT_ATTENTION", True)
    torch.testing.assert_close(m(x), fast, atol=1e-5, rtol=1e-5)


def test_config_validation_and_roundtrip():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ViTConfig(image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="multiple of heads"):
        ViTConfig(width=130, heads=4)
    cfg = ViTConfig(image_size=48, patch_size=6)
    assert (cfg.grid_size, cfg.num_patches) == (8, 64)
    assert ViTConfig(**asdict(cfg)) == cfg  # derived attributes stay out of asdict


def test_init_stats():
    m = ViT(ViTConfig())
    w = m.blocks[0].qkv.weight
    assert abs(w.std().item() - 0.02) < 0.002 and m.blocks[0].qkv.bias.abs().max() == 0
    assert abs(m.pos_emb.std().item() - 0.02) < 0.002
