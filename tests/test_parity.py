"""Parity tests: tinyvlm's modules against the reference implementations in Hugging Face
`transformers`, on random weights and random inputs.

What is checked, and against what:
- the language model (model.LanguageModel, and greedy decoding through VLM.generate)
  against LlamaForCausalLM, with multi-head and grouped-query attention;
- the vision transformer (vit.ViT) against ViTModel, block by block;
- CLIP (clip.py): the loss against transformers' CLIP loss, the text tower against
  CLIPTextModel, and the logits and loss of the whole model against CLIPModel;
- the pixel shuffle of projector.py against torch's pixel_unshuffle.

Why this convinces: the two sides share no code. transformers builds each reference model
from a config with random weights (nothing is downloaded), tinyvlm's weights are copied
into it through one mapping function per tower, written below as a table of "our name ->
their name", and the outputs must then agree to 1e-5 (absolute, fp32) wherever the test
does not say why it needs more. Every parameter is first given its own random value
(`scramble`), so a weight copied to the wrong place, or not copied at all, cannot hide
behind an initialisation of ones or zeros; and loading with strict=True means no
reference weight is left at its own random init. Each reference computes attention the
textbook way (attn_implementation="eager"), not with the fused kernel tinyvlm calls.

Where tinyvlm deliberately differs from the reference, the difference is set aside where
the reference is built (a config setting, a reordering of weight rows, a layer removed),
the comment there says so, and a test asserts that it is real: with the reference's own
default the numbers change. They are: RMSNorm's epsilon (Llama), the RoPE channel layout
(Llama), LayerNorm's epsilon (ViT), the GELU form, the LayerNorm before the blocks and the
legacy pooling rule (CLIP). The temperature clamp cannot be set aside; its test shows what
each side does above it. tinyvlm's initialisations differ from transformers' too, which
none of this sees: every weight is copied.
"""
import math
import os

# nothing in this file may touch the network: the reference models are built from configs
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers as hf  # noqa: E402
from transformers.models.clip import modeling_clip  # noqa: E402

import clip  # noqa: E402
from model import VLM, LanguageModel, LLMConfig, RMSNorm, VLMConfig  # noqa: E402
from projector import pixel_shuffle  # noqa: E402
from vit import ViT, ViTConfig  # noqa: E402

ATOL = 1e-5  # absolute, on fp32 outputs
EXACT = dict(atol=ATOL, rtol=0)


def scramble(module, seed=0, std=0.2):
    """Give every parameter of `module` its own random values, in place: norm weights near 1
    (1 + 0.1·N(0, 1)), norm biases 0.1·N(0, 1), every other tensor std·N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    norms = [m for m in module.modules() if isinstance(m, (nn.LayerNorm, RMSNorm))]
    in_norms = {id(p) for m in norms for p in m.parameters()}
    with torch.no_grad():
        for m in norms:
            m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
            if getattr(m, "bias", None) is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
        for p in module.parameters():
            if id(p) not in in_norms:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return module


# ------------------------------------------------------------------ the weight mappings


def renamed(ours, table):
    """Their state dict from ours: each of our tensors goes to table[its name], or, when its
    full name is not in the table, to table[its module path] + its last name part (weight,
    bias). Every tensor must be placed: a KeyError names the one that is not."""
    out = {}
    for name, tensor in ours.items():
        if name in table:
            out[table[name]] = tensor
        else:
            module, leaf = name.rsplit(".", 1)
            out[f"{table[module]}.{leaf}"] = tensor
    return out


def split_qkv(state, prefix, sizes):
    """Replace prefix+'qkv.weight'/'qkv.bias' (q, k and v stacked by rows) by prefix+'q.',
    'k.', 'v.' entries of `sizes` rows each, so the tables below can name them one by one."""
    for leaf in ("weight", "bias"):
        fused = state.pop(f"{prefix}qkv.{leaf}", None)
        if fused is not None:
            for part, tensor in zip("qkv", fused.split(sizes)):
                state[f"{prefix}{part}.{leaf}"] = tensor


def pairs_to_halves(w, heads):
    """Reorder the rows of a q or k projection (heads·hd, D) within each head, from tinyvlm's
    RoPE layout to Llama's in transformers.

    tinyvlm (apply_rope) rotates the interleaved pairs (x[2i], x[2i+1]) of a head by the
    angle m·θ_i; transformers' Llama rotates (x[i], x[i + hd/2]) by the same angle (its
    rotate_half). Both are the same rotation of the same pairs once channel 2i moves to slot
    i and channel 2i+1 to slot i + hd/2, i.e. the head's rows are taken in the order
    0, 2, 4, ..., hd-2, 1, 3, ..., hd-1. Applying one permutation to the channels of both q
    and k leaves every dot product q·k, so every attention weight, unchanged; v and the
    output projection are not touched. The logits tests prove it, and prove that the
    permutation is needed (without it the logits differ)."""
    D = w.size(1)
    per_head = w.view(heads, -1, 2, D)  # (heads, hd/2 pairs, 2 members, D)
    return per_head.transpose(1, 2).reshape(-1, D)  # (heads·hd, D): evens first, then odds


LLAMA_BLOCK = {  # our module in blocks.{i} -> theirs in model.layers.{i}
    "attn_norm": "input_layernorm",
    "attn.q": "self_attn.q_proj",  # rows reordered by pairs_to_halves
    "attn.k": "self_attn.k_proj",  # rows reordered by pairs_to_halves
    "attn.v": "self_attn.v_proj",
    "attn.proj": "self_attn.o_proj",
    "mlp_norm": "post_attention_layernorm",
    "mlp.w1": "mlp.gate_proj",  # SwiGLU's gate
    "mlp.w3": "mlp.up_proj",
    "mlp.w2": "mlp.down_proj",
}


def llama_state_dict(llm, rope_layout=True):
    """tinyvlm LanguageModel -> LlamaForCausalLM state dict. rope_layout=False skips the
    q/k row reordering (only to show that it is needed)."""
    cfg = llm.cfg
    H, Hkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    ours = dict(llm.state_dict())  # head.weight and tok_emb.weight: the same tied tensor
    table = {"tok_emb": "model.embed_tokens", "norm": "model.norm", "head": "lm_head"}
    for i in range(cfg.n_layers):
        split_qkv(ours, f"blocks.{i}.attn.", [H * hd, Hkv * hd, Hkv * hd])
        if rope_layout:
            ours[f"blocks.{i}.attn.q.weight"] = pairs_to_halves(ours[f"blocks.{i}.attn.q.weight"], H)
            ours[f"blocks.{i}.attn.k.weight"] = pairs_to_halves(ours[f"blocks.{i}.attn.k.weight"], Hkv)
        table |= {f"blocks.{i}.{o}": f"model.layers.{i}.{t}" for o, t in LLAMA_BLOCK.items()}
    return renamed(ours, table)


VIT_BLOCK = {  # our module in blocks.{i} -> theirs in layers.{i}
    "ln1": "layernorm_before",
    "q": "attention.q_proj",
    "k": "attention.k_proj",
    "v": "attention.v_proj",
    "proj": "attention.o_proj",
    "ln2": "layernorm_after",
    "fc1": "mlp.fc1",
    "fc2": "mlp.fc2",
}


def vit_state_dict(vit):
    """tinyvlm ViT -> ViTModel (add_pooling_layer=False) state dict."""
    ours = dict(vit.state_dict())
    table = {"cls_token": "embeddings.cls_token", "pos_emb": "embeddings.position_embeddings",
             "patch_embed.proj": "embeddings.patch_embeddings.projection", "ln_f": "layernorm"}
    for i in range(vit.cfg.depth):
        split_qkv(ours, f"blocks.{i}.", [vit.cfg.width] * 3)
        table |= {f"blocks.{i}.{o}": f"layers.{i}.{t}" for o, t in VIT_BLOCK.items()}
    return renamed(ours, table)


CLIP_BLOCK = {  # our module in blocks.{i} -> theirs in encoder.layers.{i}, both CLIP towers
    "ln1": "layer_norm1",
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "proj": "self_attn.out_proj",
    "ln2": "layer_norm2",
    "fc1": "mlp.fc1",
    "fc2": "mlp.fc2",
}


def clip_text_state_dict(text):
    """tinyvlm clip.TextTransformer -> CLIPTextModel state dict."""
    ours = dict(text.state_dict())
    ours["pos_emb"] = ours["pos_emb"][0]  # (1, L, W) -> an Embedding table (L, W)
    table = {"token_emb": "embeddings.token_embedding", "pos_emb": "embeddings.position_embedding.weight",
             "ln_f": "final_layer_norm"}
    for i in range(len(text.blocks)):
        split_qkv(ours, f"blocks.{i}.", [text.blocks[i].proj.in_features] * 3)
        table |= {f"blocks.{i}.{o}": f"encoder.layers.{i}.{t}" for o, t in CLIP_BLOCK.items()}
    return renamed(ours, table)


def clip_vision_state_dict(vit):
    """tinyvlm ViT -> CLIPVisionModel state dict. Two differences of layout, none of function:
    CLIP's patch convolution has no bias, so ours is folded into the position embeddings of
    the patch tokens (the CLS token does not pass through the convolution); CLIP has a LayerNorm before the blocks
    (pre_layrnorm) that tinyvlm's ViT does not: it gets weight 1 and bias 0 here, and the
    tests that need the two towers equal replace it by nn.Identity (and check that this
    replacement is needed)."""
    ours = dict(vit.state_dict())
    D = vit.cfg.width
    pos = ours["pos_emb"][0].clone()  # (1+N, D)
    pos[1:] += ours.pop("patch_embed.proj.bias")  # conv(x) + b + pos == conv(x) + (pos + b)
    ours["pos_emb"] = pos
    ours["cls_token"] = ours["cls_token"].view(D)
    ours["pre_ln.weight"], ours["pre_ln.bias"] = torch.ones(D), torch.zeros(D)  # no counterpart in tinyvlm
    table = {"cls_token": "embeddings.class_embedding", "pos_emb": "embeddings.position_embedding.weight",
             "patch_embed.proj": "embeddings.patch_embedding", "pre_ln": "pre_layrnorm", "ln_f": "post_layernorm"}
    for i in range(vit.cfg.depth):
        split_qkv(ours, f"blocks.{i}.", [D] * 3)
        table |= {f"blocks.{i}.{o}": f"encoder.layers.{i}.{t}" for o, t in CLIP_BLOCK.items()}
    return renamed(ours, table)


def clip_model_state_dict(model):
    """tinyvlm CLIP -> CLIPModel state dict: the two towers above, the projections, the temperature."""
    return ({f"text_model.{k}": v for k, v in clip_text_state_dict(model.text).items()}
            | {f"vision_model.{k}": v for k, v in clip_vision_state_dict(model.visual).items()}
            | {"text_projection.weight": model.text_projection.weight,
               "visual_projection.weight": model.image_projection.weight,
               "logit_scale": model.logit_scale})


# ------------------------------------------------------------------ the reference models


def llama_config(cfg: LLMConfig, **overrides):
    """The LlamaConfig of a tinyvlm LLMConfig. Everything that differs from transformers'
    defaults is set here: rms_norm_eps (theirs 1e-6, ours 1e-5), tie_word_embeddings
    (theirs False), no end-of-sequence id (theirs 2: generation must not stop)."""
    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_hidden,
              num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
              max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
              hidden_act="silu", attention_bias=False, mlp_bias=False, tie_word_embeddings=True,
              bos_token_id=None, eos_token_id=None, pad_token_id=None, attn_implementation="eager")
    return hf.LlamaConfig(**(kw | overrides))


def llama_like(llm, rope_layout=True, **overrides):
    """A LlamaForCausalLM holding llm's weights."""
    ref = hf.LlamaForCausalLM(llama_config(llm.cfg, **overrides)).eval()
    ref.load_state_dict(llama_state_dict(llm, rope_layout), strict=True)
    return ref


def tiny_llm(n_kv_heads, seed=0, std=0.2):
    """A scrambled LanguageModel, not tinyvlm's defaults where a default would hide a mistake:
    rope_theta 500 (a reference that ignored it would use 10000), 8-wide heads (4 RoPE pairs)."""
    torch.manual_seed(seed)
    cfg = LLMConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, ffn_hidden=48,
                    max_seq_len=48, rope_theta=500.0)
    return scramble(LanguageModel(cfg), seed, std).eval()


def vit_config(cfg: ViTConfig, **overrides):
    """The transformers ViTConfig of a tinyvlm ViTConfig. layer_norm_eps is ours (nn.LayerNorm's
    1e-5; transformers' ViT defaults to 1e-12); hidden_act="gelu" is the exact, erf form, which
    is F.gelu's default and transformers' ViT default, set explicitly all the same."""
    kw = dict(image_size=cfg.image_size, patch_size=cfg.patch_size, num_channels=3, hidden_size=cfg.width,
              num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads,
              intermediate_size=int(cfg.width * cfg.mlp_ratio), hidden_act="gelu", layer_norm_eps=1e-5,
              qkv_bias=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager")
    return hf.ViTConfig(**(kw | overrides))


EOT = 5  # the text tower's end-of-text id in these tests; not 2 (see test_clip_text_tower_...)


def tiny_clip(seed=0):
    """A scrambled tinyvlm CLIP (towers and projections), temperature 1/0.07 as initialised."""
    torch.manual_seed(seed)
    cfg = clip.CLIPConfig(vit=ViTConfig(image_size=16, patch_size=4, width=32, depth=2, heads=4),
                          vocab_size=24, context_length=10, text_width=32, text_depth=2, text_heads=4, embed_dim=16)
    model = clip.CLIP(cfg, eot_id=EOT)
    for part in (model.visual, model.text, model.image_projection, model.text_projection):
        scramble(part, seed)
    return model.eval()


def clip_text_config(cfg: clip.CLIPConfig, eot_id, **overrides):
    """The CLIPTextConfig of a tinyvlm text tower. hidden_act="gelu": tinyvlm's blocks use the
    exact GELU, transformers' CLIP defaults to OpenAI's quick_gelu, x·sigmoid(1.702x).
    eos_token_id: ours, which must not be 2 (2 selects transformers' legacy pooling rule, see
    the text tower test). layer_norm_eps 1e-5 is also transformers' CLIP default."""
    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.text_width, intermediate_size=4 * cfg.text_width,
              num_hidden_layers=cfg.text_depth, num_attention_heads=cfg.text_heads,
              max_position_embeddings=cfg.context_length, hidden_act="gelu", layer_norm_eps=1e-5,
              eos_token_id=eot_id, bos_token_id=None, pad_token_id=None, attn_implementation="eager")
    return hf.CLIPTextConfig(**(kw | overrides))


def clip_text_like(cfg, text, **overrides):
    """A CLIPTextModel holding the weights of tinyvlm's TextTransformer `text` (built from cfg)."""
    ref = hf.CLIPTextModel(clip_text_config(cfg, text.eot_id, **overrides)).eval()
    ref.load_state_dict(clip_text_state_dict(text), strict=True)
    return ref


def clip_vision_config(model):
    v = model.cfg.vit
    return hf.CLIPVisionConfig(image_size=v.image_size, patch_size=v.patch_size, num_channels=3,
                               hidden_size=v.width, intermediate_size=int(v.width * v.mlp_ratio),
                               num_hidden_layers=v.depth, num_attention_heads=v.heads, hidden_act="gelu",
                               layer_norm_eps=1e-5, attn_implementation="eager")


def clip_model_like(model, keep_pre_layernorm=False):
    """A CLIPModel holding the weights of tinyvlm's CLIP `model`, with CLIP's pre-block
    LayerNorm removed (tinyvlm's ViT has none) unless keep_pre_layernorm."""
    config = hf.CLIPConfig(text_config=clip_text_config(model.cfg, model.text.eot_id).to_dict(),
                           vision_config=clip_vision_config(model).to_dict(),
                           projection_dim=model.cfg.embed_dim, attn_implementation="eager")
    ref = hf.CLIPModel(config).eval()
    ref.load_state_dict(clip_model_state_dict(model), strict=True)
    if not keep_pre_layernorm:
        ref.vision_model.pre_layrnorm = nn.Identity()
    return ref


def random_text(B, L, vocab, seed=0):
    """(B, L) ids in [0, vocab) with EOT at a different place in each row and, after it, any
    ids, EOT again included: only the first EOT may count."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, L), generator=g)
    ids[ids == EOT] = EOT + 1  # no EOT before the chosen one
    for b in range(B):
        first = b % (L - 1)
        ids[b, first] = EOT
        if first + 2 < L:
            ids[b, first + 2] = EOT  # a second EOT that must not be read
    return ids


# ------------------------------------------------------------------ LLM against Llama


@pytest.mark.parametrize("n_kv_heads", [4, 2], ids=["multi_head", "grouped_query"])
@torch.no_grad()
def test_llm_logits_equal_llama_logits_and_need_the_rope_reordering(n_kv_heads):
    """tinyvlm's LanguageModel computes the function of transformers' LlamaForCausalLM:
    RMSNorm, RoPE with theta 500, causal attention with 4 query heads and 4 or 2 key/value
    heads, SwiGLU (w1 = gate, w3 = up, w2 = down), tied embeddings, logits equal to 1e-5.
    The q/k row permutation of pairs_to_halves is what maps the RoPE layouts onto each other:
    without it the logits differ. And rms_norm_eps is a real setting: transformers' default
    (1e-6) against tinyvlm's 1e-5 gives other logits."""
    llm = tiny_llm(n_kv_heads)
    assert llm.head.weight is llm.tok_emb.weight  # tied on our side...
    ref = llama_like(llm)
    assert ref.lm_head.weight is ref.model.embed_tokens.weight  # ...and on theirs
    torch.testing.assert_close(ref.model.rotary_emb.inv_freq, 1 / 500.0 ** (torch.arange(0, 8, 2) / 8), **EXACT)
    ids = torch.randint(0, 64, (3, 40), generator=torch.Generator().manual_seed(1))
    ours = llm(ids)  # (3, 40, 64)
    theirs = ref(ids).logits
    assert ours.abs().max() > 1  # logits of a real size, not a near-zero output that matches anything
    torch.testing.assert_close(ours, theirs, **EXACT)

    # the permutation is needed: the same weights in tinyvlm's own row order give other logits
    unpermuted = llama_like(llm, rope_layout=False)(ids).logits
    assert (unpermuted - ours).abs().max() > 100 * ATOL
    # position 0 is rotated by angle 0, so there the layouts cannot differ
    torch.testing.assert_close(unpermuted[:, 0], ours[:, 0], **EXACT)

    # the difference we set aside: transformers' default rms_norm_eps against ours
    assert llm.cfg.norm_eps == 1e-5 and hf.LlamaConfig().rms_norm_eps == 1e-6
    with_their_eps = llama_like(llm, rms_norm_eps=1e-6)(ids).logits
    assert (with_their_eps - ours).abs().max() > 10 * ATOL


@torch.no_grad()
def test_greedy_decoding_equals_llama_generate_with_and_without_the_kv_cache():
    """20 greedy tokens through tinyvlm's own decoding path (VLM.generate, text only) are the
    20 tokens transformers' generate(do_sample=False) picks, with tinyvlm's KV cache on and
    off, for a batch of three prompts of 9, 7 and 5 tokens, left-padded (both sides hide
    the padding with the attention mask and count positions from each row's first real
    token). No end-of-sequence id is set, so neither side can stop early.
    At every step our logits equal theirs to STEP_ATOL and the two largest differ by more
    than 2·STEP_ATOL, so no rounding-sized error could have flipped a choice: the equal
    tokens are not the luck of a near tie. STEP_ATOL is 1e-4, not 1e-5: these weights are
    larger (std 0.3, so that the 20 tokens vary rather than repeat one id), the logits reach
    about 7, and two fp32 computations of the same logit in a different order (theirs one
    token at a time through their cache, ours in one pass) differ by 1e-5 to 2e-5 here,
    a few parts in a million."""
    STEP_ATOL = 1e-4
    llm = tiny_llm(n_kv_heads=2, std=0.3)
    vision = ViTConfig(image_size=8, patch_size=4, width=8, depth=1, heads=1)  # unused: no images
    vlm = VLM(VLMConfig(vision=vision, llm=llm.cfg, image_token_id=63)).eval()
    vlm.llm.load_state_dict(llm.state_dict())
    ref = llama_like(llm)
    prompt = torch.randint(0, 63, (3, 9), generator=torch.Generator().manual_seed(8))  # no <|image|> id
    mask = torch.ones_like(prompt)
    mask[1, :2] = mask[2, :4] = 0  # rows of 9, 7 and 5 real tokens
    prompt[mask == 0] = 0  # the padding id; the mask hides it

    out = ref.generate(prompt, attention_mask=mask, do_sample=False, max_new_tokens=20, min_new_tokens=20,
                       pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    theirs = out.sequences[:, prompt.size(1):]  # (3, 20)
    assert theirs.shape == (3, 20)
    step_logits = torch.stack(out.logits, dim=1)  # (3, 20, V): their logits at each step
    top2 = step_logits.topk(2, dim=-1).values
    assert (top2[..., 0] - top2[..., 1]).min() > 2 * STEP_ATOL
    # our logits over the whole decoded sequence, read at the 20 positions that chose a token
    full = torch.cat([prompt, theirs], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(theirs)], dim=1)
    ours_at_steps = llm(full, attention_mask=full_mask)[:, prompt.size(1) - 1 : -1]  # (3, 20, V)
    torch.testing.assert_close(ours_at_steps, step_logits, atol=STEP_ATOL, rtol=0)

    for use_cache in (True, False):
        ours = vlm.generate(prompt, attention_mask=mask, max_new_tokens=20, use_cache=use_cache)
        assert ours == theirs.tolist(), f"use_cache={use_cache}"
    assert min(len(set(row)) for row in theirs.tolist()) >= 10  # varied tokens, not one id repeated


# ------------------------------------------------------------------ ViT against ViTModel


@torch.no_grad()
def test_vit_every_block_and_the_final_layernorm_equal_vit_model():
    """tinyvlm's ViT (patch embedding by one convolution, CLS token, learned positions,
    pre-LN blocks with exact GELU, final LayerNorm) computes transformers' ViTModel: its
    embeddings, the raw output of every block (ViT.forward(images, layer=k) against
    hidden_states[k+1], the last block run by hand since forward normalises it) and the
    output of the final LayerNorm (layer=-1 against last_hidden_state), all to 1e-5."""
    torch.manual_seed(0)
    vit = scramble(ViT(ViTConfig(image_size=16, patch_size=4, width=32, depth=3, heads=4))).eval()
    ref = hf.ViTModel(vit_config(vit.cfg), add_pooling_layer=False).eval()
    ref.load_state_dict(vit_state_dict(vit), strict=True)
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    out = ref(images, output_hidden_states=True)
    depth = vit.cfg.depth
    assert len(out.hidden_states) == depth + 1

    embedded = torch.cat([vit.cls_token.expand(2, -1, -1), vit.patch_embed(images)], dim=1) + vit.pos_emb
    torch.testing.assert_close(embedded, out.hidden_states[0], **EXACT)
    for k in range(depth - 1):
        torch.testing.assert_close(vit(images, layer=k), out.hidden_states[k + 1], **EXACT)
    last_block = vit.blocks[-1](vit(images, layer=depth - 2))  # raw: before ln_f
    torch.testing.assert_close(last_block, out.hidden_states[depth], **EXACT)
    torch.testing.assert_close(vit(images), out.last_hidden_state, **EXACT)
    assert out.last_hidden_state.abs().max() > 1


@torch.no_grad()
def test_vit_layernorm_epsilon_is_set_aside_not_shared():
    """The one default of transformers' ViT that tinyvlm does not share: its layer_norm_eps is
    1e-12, tinyvlm's LayerNorms use nn.LayerNorm's 1e-5. At tinyvlm's own initialisation,
    where the tokens are small (variance about 0.02), the two give measurably different
    outputs (by about 0.02), so the explicit layer_norm_eps=1e-5 in vit_config is needed;
    with it they agree to 1e-5."""
    torch.manual_seed(0)
    vit = ViT(ViTConfig(image_size=16, patch_size=4, width=32, depth=2, heads=4)).eval()  # not scrambled
    assert hf.ViTConfig().layer_norm_eps == 1e-12 and vit.ln_f.eps == 1e-5
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    ours = vit(images)
    for eps, same in ((1e-5, True), (1e-12, False)):
        ref = hf.ViTModel(vit_config(vit.cfg, layer_norm_eps=eps), add_pooling_layer=False).eval()
        ref.load_state_dict(vit_state_dict(vit), strict=True)
        gap = (ref(images).last_hidden_state - ours).abs().max()
        assert (gap <= ATOL) if same else (gap > 100 * ATOL), (eps, gap)


# ------------------------------------------------------------------ CLIP


def test_clip_loss_equals_transformers_clip_loss():
    """clip.clip_loss is transformers' CLIP loss on the same logits, to 1e-5. transformers
    takes logits_per_text, the transpose of our logits_per_image; the symmetric loss is the
    same either way, and on a non-symmetric matrix both directions are checked."""
    reference = modeling_clip.image_text_contrastive_loss  # named clip_loss before transformers 5
    logits = 5 * torch.randn(6, 6, generator=torch.Generator().manual_seed(0))  # rows: images
    ours = clip.clip_loss(logits)
    torch.testing.assert_close(ours, reference(logits.T), **EXACT)
    torch.testing.assert_close(ours, reference(logits), **EXACT)
    assert ours > 1


@torch.no_grad()
def test_clip_text_tower_equals_clip_text_model_pooled_at_the_first_eot():
    """tinyvlm's TextTransformer computes transformers' CLIPTextModel: the final LayerNorm's
    output at every position, and the pooled feature at each row's FIRST end-of-text token
    (rows hold a second EOT and arbitrary ids after the first), to 1e-5.
    Two defaults of transformers' are set aside, and both matter:
    - hidden_act: transformers' CLIP defaults to OpenAI's quick_gelu; tinyvlm uses exact GELU.
    - eos_token_id == 2 selects transformers' legacy pooling (the original CLIP rule): the
      position of the LARGEST id in the row, which is the eot only when the eot is the
      vocabulary's last id. tinyvlm pools at the first eot whatever its id."""
    model = tiny_clip()
    text, cfg = model.text, model.cfg
    ref = clip_text_like(cfg, text)
    ids = random_text(5, 10, cfg.vocab_size)
    out = ref(ids)
    x = text.token_emb(ids) + text.pos_emb[:, : ids.size(1)]  # tinyvlm's forward, stopped before it pools
    for block in text.blocks:
        x = block(x)
    torch.testing.assert_close(text.ln_f(x), out.last_hidden_state, **EXACT)
    ours = text(ids)  # (B, W)
    torch.testing.assert_close(ours, out.pooler_output, **EXACT)

    assert hf.CLIPTextConfig().hidden_act == "quick_gelu"
    assert (clip_text_like(cfg, text, hidden_act="quick_gelu")(ids).pooler_output - ours).abs().max() > 100 * ATOL

    # the legacy rule, on a tower whose eot id is 2: it reads the largest id's position instead
    text2 = clip.TextTransformer(cfg, eot_id=2).eval()
    text2.load_state_dict(text.state_dict())
    ids2 = torch.tensor([[7, 2, 23, 4, 2], [9, 11, 2, 0, 1]])  # a larger id after the eot, and before it
    rows, first_eot, largest = torch.arange(2), torch.tensor([1, 2]), torch.tensor([2, 1])
    legacy = clip_text_like(cfg, text2)(ids2)
    torch.testing.assert_close(legacy.pooler_output, legacy.last_hidden_state[rows, largest], **EXACT)
    ours = text2(ids2)
    torch.testing.assert_close(ours, legacy.last_hidden_state[rows, first_eot], **EXACT)
    assert (ours - legacy.pooler_output).abs().max() > 100 * ATOL


@torch.no_grad()
def test_clip_logits_and_loss_equal_clip_model():
    """tinyvlm's CLIP.forward gives the logits and the loss of transformers' CLIPModel holding
    the same weights, on the same images and token ids, to 1e-5: both towers (CLIP's vision
    transformer, its text transformer pooled at the first eot), both projections, the L2
    normalisation, the temperature and the symmetric loss all run as transformers' code.
    One layer of theirs is set aside: the LayerNorm CLIP applies to the embeddings before
    the first block (pre_layrnorm; tinyvlm's ViT has none). Keeping it, even at its
    initial weight 1 and bias 0, gives other logits."""
    model = tiny_clip()
    ref = clip_model_like(model)
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    ids = random_text(4, 10, model.cfg.vocab_size, seed=2)
    loss, logits = model(images, ids)  # logits per image (B, B)
    out = ref(input_ids=ids, pixel_values=images, return_loss=True)
    assert logits.abs().max() > 1
    torch.testing.assert_close(logits, out.logits_per_image, **EXACT)
    torch.testing.assert_close(logits.T, out.logits_per_text, **EXACT)
    torch.testing.assert_close(loss, out.loss, **EXACT)
    torch.testing.assert_close(model.encode_image(images), out.image_embeds, **EXACT)
    torch.testing.assert_close(model.encode_text(ids), out.text_embeds, **EXACT)

    with_pre_ln = clip_model_like(model, keep_pre_layernorm=True)
    assert (with_pre_ln(input_ids=ids, pixel_values=images).logits_per_image - logits).abs().max() > 100 * ATOL


@torch.no_grad()
def test_temperature_is_clamped_at_100_where_clip_model_does_not_clamp():
    """Both models learn log(1/temperature) and start it at log(1/0.07). Below log 100 their
    logits agree; above it tinyvlm clamps (CLIP.scale(), as the CLIP paper does during
    training) and transformers does not: with log(1/temperature) = log 400 its logits are
    4 times ours. The logits are cosines times the scale, and so is their fp32 rounding, so
    they are compared as cosines (divided by each side's scale) to 1e-5."""
    model = tiny_clip()
    ref = clip_model_like(model)
    assert ref.logit_scale.item() == pytest.approx(math.log(1 / 0.07), abs=1e-4)  # the same start
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    ids = random_text(3, 10, model.cfg.vocab_size, seed=2)
    for scale, ours_scale in ((50, 50), (400, 100)):
        model.logit_scale.fill_(math.log(scale))
        ref.logit_scale.fill_(math.log(scale))
        ours = model(images, ids)[1]
        theirs = ref(input_ids=ids, pixel_values=images).logits_per_image
        assert model.scale().item() == pytest.approx(ours_scale)
        torch.testing.assert_close(ours / ours_scale, theirs / scale, **EXACT)
    assert (theirs - ours).abs().max() > 1  # at log 400 the two really differ


# ------------------------------------------------------------------ pixel shuffle


@pytest.mark.parametrize("grid, s", [(4, 2), (6, 3), (8, 4)])
def test_pixel_shuffle_is_pixel_unshuffle_with_channels_reordered(grid, s):
    """projector.pixel_shuffle is torch's pixel_unshuffle (space-to-depth) on the patch grid
    seen as a (B, Dv, grid, grid) map, up to one fixed reordering of the s²·Dv channels:
    tinyvlm concatenates the s×s neighbourhood patch by patch, channel (a·s + b)·Dv + c for
    the patch in row a, column b of the neighbourhood; pixel_unshuffle puts channel
    c·s² + a·s + b. Swapping the two channel factors maps one onto the other exactly (the
    same numbers moved, no arithmetic), and pixel_shuffle (depth-to-space) undoes it."""
    B, Dv = 2, 5
    x = torch.randn(B, grid * grid, Dv, generator=torch.Generator().manual_seed(0))  # tokens in row-major order
    ours = pixel_shuffle(x, grid, s)  # (B, (grid/s)², s²·Dv)
    g = grid // s
    fmap = x.transpose(1, 2).reshape(B, Dv, grid, grid)  # token r·grid + c -> pixel (r, c)
    unshuffled = F.pixel_unshuffle(fmap, s)  # (B, Dv·s², g, g), channel c·s² + a·s + b
    reordered = unshuffled.view(B, Dv, s * s, g, g).transpose(1, 2).reshape(B, s * s * Dv, g, g)  # (a·s+b)·Dv + c
    theirs = reordered.flatten(2).transpose(1, 2)  # (B, g², s²·Dv), coarse cells in row-major order
    assert torch.equal(ours, theirs)
    # and back: undo the reordering, then depth-to-space gives the original map
    back = ours.transpose(1, 2).reshape(B, s * s, Dv, g, g).transpose(1, 2).reshape(B, Dv * s * s, g, g)
    assert torch.equal(F.pixel_shuffle(back, s), fmap)
    # the reordering is needed (for Dv > 1): pixel_unshuffle's own channel order is another one
    assert not torch.equal(ours, unshuffled.flatten(2).transpose(1, 2))
