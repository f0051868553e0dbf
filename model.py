"""
The tiny decoder language model (Llama-style) and the VLM that wraps it.

LanguageModel follows LLaMA ("LLaMA: Open and Efficient Foundation Language
Models", Touvron et al. 2023, arXiv:2302.13971): pre-normalisation with RMSNorm
("Root Mean Square Layer Normalization", Zhang & Sennrich 2019,
arXiv:1910.07467), rotary position embeddings (RoFormer, "Enhanced Transformer
with Rotary Position Embedding", Su et al. 2021, arXiv:2104.09864), the SwiGLU
feed-forward ("GLU Variants Improve Transformer", Shazeer 2020,
arXiv:2002.05202), and optionally grouped-query attention ("GQA", Ainslie et
al. 2023, arXiv:2305.13245). The output head shares its weights with the token
embedding, and a KV cache makes generation cost one token per step.

VLM is LLaVA ("Visual Instruction Tuning", Liu et al. 2023, arXiv:2304.08485;
LLaVA-1.5, arXiv:2310.03744): a ViT encodes the image, the projector
(projector.py) maps its patch features to LLM-width visual tokens, and those
are written over the <|image|> placeholder tokens of the prompt. With
region_names, each visual token also carries the name of the region of the
image it covers, in the LLM's own word embeddings (RegionNames).

LoRA ("LoRA: Low-Rank Adaptation of Large Language Models", Hu et al. 2021,
arXiv:2106.09685) fine-tunes the LLM through small low-rank adapters beside its
frozen attention and MLP matrices (LoRALinear, add_lora), folded back into
plain weights afterwards (merge_lora): `python train.py --lora_rank=8`.

Shape legend:
    B   batch (sequences)        T   tokens in this forward call
    S   keys attended (cache + T)  D   LLM width (dim)
    H   query heads              Hkv key/value heads (GQA: Hkv divides H)
    hd  head_dim = D / H         F   SwiGLU hidden width (ffn_hidden)
    V   vocabulary size          M   images in the batch
    N'  visual tokens per image  r   LoRA rank

    cfg = VLMConfig(llm=LLMConfig(vocab_size=tok.vocab_size), image_token_id=tok.image_id)
    model = VLM(cfg)
    logits, loss = model(input_ids, images, attention_mask, labels)
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from projector import make_projector
from vit import ViT, ViTConfig, attention


@dataclass
class LLMConfig:
    vocab_size: int = 512
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4  # < n_heads: grouped-query attention; 1: multi-query attention
    ffn_hidden: int = 683  # LLaMA's 2/3·4·dim, so SwiGLU's three matrices cost what a 4·dim MLP's two do
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    explicit_attention: bool = False  # True: the readable softmax(QKᵀ/√d)V path instead of SDPA

    def __post_init__(self):
        if self.dim % self.n_heads != 0:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})")
        # derived, not a field: it follows any override of dim or n_heads
        self.head_dim = self.dim // self.n_heads
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim ({self.head_dim}) must be even: RoPE rotates pairs of channels")


@dataclass
class VLMConfig:
    vision: ViTConfig = field(default_factory=ViTConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    projector: str = "mlp"  # see projector.PROJECTORS
    shuffle_factor: int = 2  # only for projector="pixel_shuffle"
    resampler_queries: int = 16  # only for projector="resampler": visual tokens per image
    tile_grids: tuple = ()  # any-res: allowed (rows, cols) tile grids (data.image_input); (): one view per image
    vision_layer: int = -1  # which ViT block's patch features feed the projector (-1: the last)
    region_names: bool = False  # add RegionNames to the visual tokens (not with the resampler: its queries have no place)
    image_token_id: int = -1  # the tokenizer's <|image|> id; must be set

    @classmethod
    def from_dict(cls, d: dict) -> "VLMConfig":
        """Inverse of dataclasses.asdict, for configs stored in checkpoints."""
        d = dict(d, vision=ViTConfig(**d["vision"]), llm=LLMConfig(**d["llm"]))
        return cls(**d)


# -----------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / rms(x) · g: LayerNorm without the mean subtraction and bias (cheaper, works as well)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()  # the mean of squares in float32: bf16 would lose the small values
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)  # (..., D)
        return normed.type_as(x) * self.weight  # (..., D)


def rope_cache(head_dim: int, max_seq_len: int, theta: float = 10000.0):
    """cos and sin of the rotation angles m·θ_i for every position m and pair i (RoFormer section 3.2)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)  # (hd/2,)
    angles = torch.outer(torch.arange(max_seq_len).float(), inv_freq)  # (max_seq_len, hd/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each channel pair (x[2i], x[2i+1]) of x (B, H, T, hd) by its angle; cos, sin (B or 1, T, hd/2).

    Seen as complex numbers z_i = x[2i] + i·x[2i+1], this is z_i · e^{i m θ_i}, so
    <rope(q, m), rope(k, n)> depends only on m - n: attention sees relative position.
    """
    cos, sin = cos[:, None], sin[:, None]  # (B or 1, 1, T, hd/2): same angles for every head
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, H, T, hd/2) each: real, imaginary parts
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (B, H, T, hd/2, 2)
    return rotated.flatten(-2).type_as(x)  # (B, H, T, hd)


class KVCache:
    """Keys and values of every layer, preallocated for max_len tokens, filled left to right.

    Generation feeds one token per step; without the cache each step would recompute the
    keys and values of the whole prefix. key_mask remembers which cached positions are real
    tokens, so left padding in the prompt stays invisible to every later token.
    Stored with Hkv heads (before GQA's repeat): that memory saving is GQA's point.
    """

    def __init__(self, cfg: LLMConfig, batch_size: int, max_len: int, device=None):
        self.shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.max_len = max_len
        # k, v are allocated at the first write, in the dtype the layer produces (bf16 under autocast)
        self.k = [None] * cfg.n_layers
        self.v = [None] * cfg.n_layers
        self.key_mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # (B, max_len)
        self.padded = False  # True once a padding slot is cached: only then do queries need key_mask
        self.length = 0  # tokens cached so far; LanguageModel.forward advances it after all layers

    def update(self, layer: int, k, v):
        """Write k, v (B, Hkv, T, hd) at [length, length+T); return all keys/values (B, Hkv, S, hd)."""
        if self.k[layer] is None:
            self.k[layer] = torch.zeros(self.shape, dtype=k.dtype, device=k.device)
            self.v[layer] = torch.zeros(self.shape, dtype=v.dtype, device=v.device)
        end = self.length + k.size(2)
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        # one matmul for q, k and v; with GQA k and v have fewer heads than q
        self.qkv = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False)
        self.proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        # set keep_attention = True to keep each forward's softmax weights (B, H, T, S) in
        # attention_weights, e.g. to see which image tokens an answer reads (notebooks/03_llava.ipynb)
        self.keep_attention, self.attention_weights = False, None

    def forward(self, x, cos, sin, mask=None, kv_cache=None, layer=0):
        H, Hkv = self.cfg.n_heads, self.cfg.n_kv_heads
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, H + 2 * Hkv, -1).transpose(1, 2)  # (B, H + 2·Hkv, T, hd): q, k, v heads
        # RoPE rotates queries and keys, never values: one call rotates both
        qk = apply_rope(qkv[:, : H + Hkv], cos, sin)  # (B, H + Hkv, T, hd)
        q, k = qk.split([H, Hkv], dim=1)  # (B, H, T, hd), (B, Hkv, T, hd)
        v = qkv[:, H + Hkv :]  # (B, Hkv, T, hd)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, Hkv, S, hd)
        # GQA: query head h reads key/value head h // (H / Hkv)
        group = H // Hkv
        if group > 1:
            k = k.repeat_interleave(group, dim=1)  # (B, H, S, hd)
            v = v.repeat_interleave(group, dim=1)  # (B, H, S, hd)
        # vit.attention: SDPA, or the explicit softmax(QKᵀ/√hd)V it is tested against. Either
        # plain causal (no mask), or one mask that already holds causality (padding or cache).
        # A single query (a generation step) is the newest token: it sees every key, unmasked.
        causal = mask is None and T > 1
        if self.keep_attention:
            y, self.attention_weights = attention(q, k, v, causal=causal, mask=mask,
                                                  return_weights=True)  # (B, H, T, hd), (B, H, T, S)
        else:
            y = attention(q, k, v, causal=causal, mask=mask, explicit=self.cfg.explicit_attention)  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, H·hd)
        return self.proj(y)  # (B, T, D)


class SwiGLU(nn.Module):
    """w2(silu(w1 x) ⊙ w3 x): a gated MLP; w1 is the gate, w3 the up projection, w2 the down."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)

    def forward(self, x):
        gate = F.silu(self.w1(x))  # (B, T, F)
        up = self.w3(x)  # (B, T, F)
        return self.w2(gate * up)  # (B, T, D)


class Block(nn.Module):
    """Pre-norm block: normalise the input of each sublayer, keep the residual stream untouched."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, cos, sin, mask=None, kv_cache=None, layer=0):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, kv_cache, layer)  # (B, T, D)
        x = x + self.mlp(self.mlp_norm(x))  # (B, T, D)
        return x


def build_mask(key_mask, T: int):
    """One boolean mask (B, 1, T, S) for the last T of S slots: causal AND key is a real token.

    key_mask (B, S): True where the slot holds a real token (False: padding). A query that
    is itself padding (left padding) may see no key at all, and a softmax over nothing is
    NaN; letting every query see its own slot keeps the output finite (it is ignored anyway).
    """
    S = key_mask.size(1)
    q_slot = torch.arange(S - T, S, device=key_mask.device)[:, None]  # (T, 1)
    k_slot = torch.arange(S, device=key_mask.device)[None, :]  # (1, S)
    mask = (k_slot <= q_slot) & key_mask[:, None, :]  # (B, T, S)
    mask = mask | (k_slot == q_slot)  # (B, T, S)
    return mask[:, None]  # (B, 1, T, S): the same for every head


class LanguageModel(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # weight tying (Press & Wolf 2017, arXiv:1608.05859): reading and writing a token share
        # one vector, which saves V·D parameters, a large share of a small model
        self.head.weight = self.tok_emb.weight
        cos, sin = rope_cache(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        # not persistent: recomputed from the config, so checkpoints stay small
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, hd/2)
        self.register_buffer("rope_sin", sin, persistent=False)  # (max_seq_len, hd/2)
        self.apply(self._init_weights)
        # GPT-2 (Radford et al. 2019, section 2.3): every block adds two outputs to the residual
        # stream, so its variance grows with depth; scaling the last projection of each sublayer
        # by 1/sqrt(2·n_layers) keeps the stream's scale at init independent of depth
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.w2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None, kv_cache=None):
        """Logits (B, T, V) for input_ids (B, T) or inputs_embeds (B, T, D).

        attention_mask (B, T): 1 for real tokens, 0 for padding, for the T tokens of this call
        (the cache remembers earlier ones). position_ids (B, T) default to the count of real
        tokens before each one, so a left-padded row starts at position 0 like an unpadded one.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.tok_emb(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        T = x.size(1)
        past = 0 if kv_cache is None else kv_cache.length
        if past + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {past + T} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        key_mask = None if attention_mask is None else attention_mask.bool()  # (B, T)
        if kv_cache is not None:
            if past + T > kv_cache.max_len:
                raise ValueError(f"KV cache holds {kv_cache.max_len} tokens, {past + T} needed")
            kv_cache.key_mask[:, past : past + T] = True if key_mask is None else key_mask
            if key_mask is not None and not kv_cache.padded:
                kv_cache.padded = not bool(key_mask.all())  # a host sync, only in calls that bring a mask
            # until a pad is cached, the plain causal path is exact: no mask to build every step
            key_mask = kv_cache.key_mask[:, : past + T] if kv_cache.padded else None  # (B, S)
        if position_ids is None and key_mask is None:
            # no padding: every row's tokens sit at positions past .. past+T-1, one slice of the table
            cos, sin = self.rope_cos[None, past : past + T], self.rope_sin[None, past : past + T]  # (1, T, hd/2)
        else:
            if position_ids is None:
                position_ids = (key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]  # (B, T)
            cos, sin = self.rope_cos[position_ids], self.rope_sin[position_ids]  # (B, T, hd/2) each
        # no padding (none cached either): plain causal attention (mask None -> SDPA's is_causal)
        mask = None if key_mask is None else build_mask(key_mask, T)  # (B, 1, T, S)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, mask, kv_cache, i)  # (B, T, D)
        if kv_cache is not None:
            kv_cache.length += T
        x = self.norm(x)  # (B, T, D)
        return self.head(x)  # (B, T, V)


# -----------------------------------------------------------------------------


class RegionNames(nn.Module):
    """A learned vector per visual token, added to it: where in the image the token is.

    Why: RoPE rotates queries and keys, never values. A head that finds "the red circle" by
    its colour and shape reads back that token's content, and the ViT's position embedding
    has faded from the tokens that hold an object, so the LLM learns to answer "where?" from
    the empty cells instead, and gets it right only when they tell. The vector starts as the
    name of the token's region of a 3x3 grid ("top left", ...) in the LLM's own word
    embeddings, words it already reads in its context and writes (its output head shares
    those weights): finding the object is then enough to say where it is.
    """

    def __init__(self, grid: int, dim: int):
        super().__init__()
        self.grid = grid  # visual tokens per side
        self.weight = nn.Parameter(torch.zeros(grid * grid, dim))  # (N', D): adds nothing until named

    def forward(self, tokens):
        return tokens + self.weight  # (M, N', D): the same places in every image (and every tile)

    @torch.no_grad()
    def name(self, embeddings, word_ids, norm):
        """Start token (r, c) at the name of the 3x3 region that holds its centre: the sum of the
        embeddings (V, D) of that region's words, word_ids[region] (row-major: the ids of " top"
        and " left" first), rescaled to `norm`."""
        g = self.grid
        # row (or column) i of g has its centre at (i + 1/2) / g of the side: in third floor(3 (i + 1/2) / g)
        third = [3 * (2 * i + 1) // (2 * g) for i in range(g)]
        region = [3 * third[r] + third[c] for r in range(g) for c in range(g)]  # (N',), row-major
        names = torch.stack([embeddings[word_ids[k]].sum(0) for k in region])  # (N', D)
        self.weight.copy_(names if norm is None else norm * names / names.norm(dim=-1, keepdim=True))


class VLM(nn.Module):
    def __init__(self, cfg: VLMConfig, vision: ViT | None = None):
        super().__init__()
        if not 0 <= cfg.image_token_id < cfg.llm.vocab_size:
            raise ValueError(f"VLMConfig.image_token_id={cfg.image_token_id}: set it to the tokenizer's <|image|> id")
        self.cfg = cfg
        self.vision = ViT(cfg.vision) if vision is None else vision
        if self.vision.num_patches != cfg.vision.num_patches:
            raise ValueError(f"vision encoder has {self.vision.num_patches} patches, cfg.vision {cfg.vision.num_patches}")
        self.projector = make_projector(cfg.projector, cfg.vision.width, cfg.llm.dim, cfg.vision.grid_size,
                                        cfg.shuffle_factor, cfg.resampler_queries)
        self.llm = LanguageModel(cfg.llm)
        self.num_image_tokens = self.projector.num_tokens()  # N': <|image|> slots per image
        named = cfg.region_names and cfg.projector != "resampler"
        self.regions = RegionNames(math.isqrt(self.num_image_tokens), cfg.llm.dim) if named else None

    def encode_images(self, images):
        """Visual tokens (M, N', D) for images (M, 3, H, W)."""
        # patch tokens only: LLaVA feeds the grid features, the CLS summary adds nothing spatial
        patches = self.vision(images, layer=self.cfg.vision_layer, keep_cls=False)  # (M, N, Dv)
        tokens = self.projector(patches)  # (M, N', D)
        return tokens if self.regions is None else self.regions(tokens)  # (M, N', D)

    def embed(self, input_ids, images=None):
        """Token embeddings (B, T, D) with image m's visual tokens written over the m-th block
        of N' <|image|> slots, counting slots row by row through the batch."""
        embeds = self.llm.tok_emb(input_ids)  # (B, T, D)
        slots = input_ids == self.cfg.image_token_id  # (B, T)
        n_slots = int(slots.sum())
        n_images = 0 if images is None else images.size(0)
        if n_slots != n_images * self.num_image_tokens:
            raise ValueError(
                f"{n_slots} <|image|> tokens in input_ids but {n_images} images x {self.num_image_tokens} "
                f"visual tokens = {n_images * self.num_image_tokens}")
        if n_images == 0:
            return embeds
        if images.dtype == torch.long:  # SCENE_TOKENS: cells of word ids -> sum of their embeddings
            visual = (self.llm.tok_emb(images.clamp(min=0)) * (images >= 0).unsqueeze(-1)).sum(2)
        else:
            visual = self.encode_images(images)  # (M, N', D)
        # boolean-mask assignment fills the True slots in row-major order, one visual row each
        embeds[slots] = visual.reshape(-1, visual.size(-1)).to(embeds.dtype)  # (B, T, D)
        return embeds

    def forward(self, input_ids, images=None, attention_mask=None, labels=None):
        """(logits (B, T, V), loss or None); labels (B, T) are aligned with input_ids, -100 = ignored."""
        embeds = self.embed(input_ids, images)  # (B, T, D)
        logits = self.llm(inputs_embeds=embeds, attention_mask=attention_mask)  # (B, T, V)
        loss = None
        if labels is not None:
            # position t predicts token t+1: shift the labels left (the last position predicts
            # nothing) rather than slicing the logits, which would copy all B·T·V of them
            target = F.pad(labels[:, 1:], (0, 1), value=-100)  # (B, T)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100)
        return logits, loss

    @torch.inference_mode()  # no_grad, and no autograd bookkeeping at all: less overhead per small op
    def stream(self, input_ids, images=None, attention_mask=None, max_new_tokens=32, temperature=0.0,
               top_k=None, top_p=None, stop_id=None, use_cache=True, generator=None):
        """Yield the next token of every row, (B,), one decoding step at a time: the loop that
        generate() collects and a chat page shows as it runs. Stops after max_new_tokens
        steps, or as soon as every row has produced stop_id at least once.

        use_cache=False recomputes the whole sequence every step (the reference the cache is
        tested against).
        """
        B, T = input_ids.shape
        if T + max_new_tokens - 1 > self.cfg.llm.max_seq_len:
            raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len "
                             f"({self.cfg.llm.max_seq_len}) by more than one")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = attention_mask.bool()  # (B, T)
        embeds = self.embed(input_ids, images)  # (B, T, D)
        cache = KVCache(self.cfg.llm, B, T + max_new_tokens, input_ids.device) if use_cache else None
        logits = self.llm(inputs_embeds=embeds, attention_mask=mask, kv_cache=cache)[:, -1]  # (B, V)
        stopped = torch.zeros(B, dtype=torch.bool, device=input_ids.device)  # (B,)
        for step in range(max_new_tokens):
            next_id = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
            yield next_id
            stopped |= next_id == stop_id
            # the last token needs no forward pass: nothing will be sampled after it
            if stopped.all() or step == max_new_tokens - 1:
                return
            new = next_id[:, None]  # (B, 1)
            if use_cache:
                logits = self.llm(new, kv_cache=cache)[:, -1]  # (B, V): the cache knows the prompt's padding
            else:
                embeds = torch.cat([embeds, self.llm.tok_emb(new)], dim=1)  # (B, T+step+1, D)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # (B, T+step+1)
                logits = self.llm(inputs_embeds=embeds, attention_mask=mask)[:, -1]  # (B, V)

    def generate(self, input_ids, images=None, attention_mask=None, max_new_tokens=32, stop_id=None, **sampling):
        """New token ids for each row of a left-padded prompt batch, without the stop token.

        A row that has produced stop_id is finished: stream() keeps feeding it its sampled
        tokens so the batch stays rectangular, but nothing more is recorded for it.
        `sampling`: temperature, top_k, top_p, use_cache, generator, as for stream().
        """
        out = [[] for _ in range(input_ids.size(0))]
        done = [False] * input_ids.size(0)
        for next_id in self.stream(input_ids, images, attention_mask, max_new_tokens, stop_id=stop_id, **sampling):
            for b, t in enumerate(next_id.tolist()):
                if done[b]:
                    continue
                if t == stop_id:
                    done[b] = True
                else:
                    out[b].append(t)
        return out


# -----------------------------------------------------------------------------
# the loss of --loss_per_answer (VLM.forward's is the mean over all answer tokens)

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


# -----------------------------------------------------------------------------


def filter_logits(logits, top_k=None, top_p=None):
    """Set to -inf every logit outside the top-k and outside the top-p nucleus (Holtzman et al.
    2019, arXiv:1904.09751: the smallest set of most likely tokens whose probability reaches p).
    The most likely token is always kept. Ties with the k-th logit are kept too."""
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))  # (B, V)
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V) each
        probs = sorted_logits.softmax(dim=-1)  # (B, V)
        # drop a token when the more likely ones before it already reach top_p
        before = probs.cumsum(dim=-1) - probs  # (B, V)
        drop = before >= top_p  # (B, V)
        drop[:, 0] = False
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))  # (B, V)
    return logits


def sample_next(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """The next token (B,) from last-position logits (B, V): argmax when temperature is 0."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)  # (B,)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)  # (B, V)
    probs = logits.softmax(dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters; a tied weight counts once (parameters() yields it once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# -----------------------------------------------------------------------------
# LoRA: fine-tune the LLM through low-rank adapters (Hu et al. 2021, arXiv:2106.09685)

LORA_TARGETS = ("qkv", "proj", "w1", "w2", "w3")  # fused q,k,v and output of attention; SwiGLU's three


class LoRALinear(nn.Module):
    """base(x) + (alpha / r) · B A x, with the base Linear frozen and only A (r, in), B (out, r) trained.

    The paper's premise (section 4): the change fine-tuning makes to a weight matrix has a low
    intrinsic rank, so writing it as B·A costs r·(in + out) numbers instead of in·out. B starts
    at zero, so the wrapped layer starts as exactly the base layer; A starts random
    (Kaiming-uniform, as the paper's code does) so that B gets a gradient at the first step.
    alpha / r keeps the update's scale steady when r changes (section 4.1).
    On a fused qkv matrix one adapter covers q, k and v together: a rank-r change of the
    whole (H + 2·Hkv)·hd x D matrix."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.base.requires_grad_(False)
        self.scale = alpha / rank
        weight = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=weight.device, dtype=weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=weight.device, dtype=weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x):
        down = x @ self.lora_A.T  # (..., r): through the rank-r bottleneck, never an out x in matrix
        return self.base(x) + self.scale * (down @ self.lora_B.T)  # (..., out)

    def merged(self) -> nn.Linear:
        """The base Linear with W + (alpha / r)·B·A folded in: the same function, and no adapter
        left to cost time at inference (section 4.1: "no additional inference latency")."""
        with torch.no_grad():
            self.base.weight += self.scale * (self.lora_B @ self.lora_A)  # (out, in)
        return self.base


def add_lora(model: nn.Module, rank: int, alpha: float) -> list[nn.Parameter]:
    """Wrap the attention and MLP Linears of every LLM block in `model` (a LanguageModel or a
    VLM: the ViT and the projector are left alone) in LoRALinears; their base weights are
    frozen. Returns the adapters' parameters, the only LLM weights that train from here on."""
    adapters = []
    for block in [m for m in model.modules() if isinstance(m, Block)]:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if name in LORA_TARGETS and isinstance(child, nn.Linear):
                    lora = LoRALinear(child, rank, alpha)
                    setattr(parent, name, lora)
                    adapters += [lora.lora_A, lora.lora_B]
    return adapters


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear in `model` by its merged plain Linear, in place: the state dict
    then has the keys and shapes of a model that never had adapters (what generate.py loads)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())
    return model
