"""
The vision encoder: a Vision Transformer (ViT), written out in full.

An image is cut into P x P patches, each patch becomes one token (the stem), a
learned CLS token and learned position embeddings are added, and a stack of
pre-LN transformer blocks mixes the tokens. The VLM reads the patch tokens of
one chosen layer; CLIP (clip.py) reads the pooled output.

Two stems make the patch tokens: PatchEmbed, the paper's one linear map per patch,
and ConvStem, a few strided convolutions that see edges before shapes. Which one
learns what, on the shapes world, is measured in docs/experiments.md and shown
in notebooks/01_vit.ipynb.

Papers: "An Image is Worth 16x16 Words: Transformers for Image Recognition at
Scale", Dosovitskiy et al. 2020, arXiv:2010.11929; the conv stem: "Early
Convolutions Help Transformers See Better", Xiao et al. 2021, arXiv:2106.14881.

Shapes:  B batch, N patches per image, D width, P patch side, S image side,
         T tokens (N, or 1+N with the CLS token), H heads, hs head size (D // H).

Run the tests:  python -m pytest -q tests/test_vit.py
Step through the textbook attention instead of the fused kernel:
    import vit; vit.EXPLICIT_ATTENTION = True
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# When True every Block uses the explicit softmax(QK^T/sqrt(d))V below instead of
# PyTorch's fused kernel. Same numbers (tests/test_vit.py), slower, easy to debug.
EXPLICIT_ATTENTION = False


@dataclass
class ViTConfig:
    image_size: int = 64
    patch_size: int = 8
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    use_cls: bool = True
    stem: str = "patch"  # how pixels become patch tokens: "patch" (PatchEmbed) | "conv" (ConvStem)

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")
        if self.stem not in STEMS:
            raise ValueError(f"unknown stem {self.stem!r}; valid: {', '.join(STEMS)}")
        # plain attributes, not dataclass fields: asdict(cfg) stays a valid set of
        # constructor arguments, so ViTConfig(**asdict(cfg)) rebuilds it from a checkpoint
        self.grid_size = self.image_size // self.patch_size  # patches per side
        self.num_patches = self.grid_size ** 2


def attention(q, k, v, causal=False, mask=None, explicit=False, return_weights=False):
    """Scaled dot-product attention, softmax(QK^T / sqrt(hs)) V, per head.

    q: (B, H, Tq, hs); k, v: (B, H, Tk, hs) -> (B, H, Tq, hs).
    causal: query i sees keys up to its own position. With Tq < Tk (a KV cache:
        the queries are the LAST Tq positions) the mask is aligned bottom-right.
    mask: optional bool, broadcastable to (B, H, Tq, Tk), True = may attend
        (e.g. to hide padding). A query that may attend to nothing returns NaN.
    explicit: run the textbook computation instead of F.scaled_dot_product_attention.
    return_weights: also return the softmax weights (B, H, Tq, Tk), each row summing to 1
        (forces the explicit path: the fused kernel never forms them). For attention maps.
    """
    Tq, Tk = q.size(-2), k.size(-2)
    explicit = explicit or return_weights
    if not explicit and mask is None and (not causal or Tq == Tk):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, H, Tq, hs), fused kernel
    if causal:
        # key j is visible to query i when j <= i + (Tk - Tq): i counts from the end of the keys
        visible = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)  # (Tq, Tk)
        mask = visible if mask is None else mask & visible  # (..., Tq, Tk)
    if not explicit:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, Tq, hs)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, H, Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # (B, H, Tq, Tk), exp(-inf) = 0 weight
    weights = scores.softmax(dim=-1)  # (B, H, Tq, Tk), each row sums to 1
    out = weights @ v  # (B, H, Tq, hs)
    return (out, weights) if return_weights else out


def init_weights(module):
    """N(0, 0.02) for every Linear, Conv2d and Embedding weight, zero biases, LayerNorm
    left at (1, 0): the BERT/GPT-2 recipe that the ViT paper's code also uses for its
    embeddings. Small weights keep the residual stream near its input at the start."""
    if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


class PatchEmbed(nn.Module):
    """Cut the image into P x P patches and map each to a D-dim token (ViT paper, eq. 1)."""

    def __init__(self, patch_size, width, in_channels=3):
        super().__init__()
        self.patch_size = patch_size
        # a convolution whose kernel = stride = P sees each patch exactly once: it IS
        # "flatten the patch, multiply by a matrix", done by one fast kernel
        self.proj = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        x = self.proj(x)  # (B, D, H/P, W/P)
        return x.flatten(2).transpose(1, 2)  # (B, N, D), patches in row-major order

    def forward_unfold(self, x):
        """The same map in the paper's words: flatten each patch, then a Linear layer.
        Kept for teaching; tests/test_vit.py checks it equals forward()."""
        patches = F.unfold(x, kernel_size=self.patch_size, stride=self.patch_size)  # (B, 3*P*P, N)
        patches = patches.transpose(1, 2)  # (B, N, 3*P*P), each row one patch flattened (channel, row, col)
        weight = self.proj.weight.flatten(1)  # (D, 3*P*P), the conv kernel flattened in the same order
        return patches @ weight.T + self.proj.bias  # (B, N, D)


class ConvStem(nn.Module):
    """The same (B, N, D) patch tokens from a few convolutions: log2(P) 3x3 convolutions of
    stride 2, each halving the resolution and followed by BatchNorm and ReLU, then a 1x1
    convolution to the width. The ViT paper's "hybrid" input (section 3.1) in the small form of
    "Early Convolutions Help Transformers See Better" (Xiao et al. 2021, arXiv:2106.14881).

    Why: one linear map per patch must recognise a shape from raw pixels wherever it falls in
    the patch; overlapping 3x3 kernels see edges and corners first and build the shape up,
    the inductive bias of a CNN. Each output token still covers one P x P patch.
    BatchNorm keeps running statistics: a frozen stem must run in eval mode (train.train_mode)."""

    def __init__(self, patch_size, width, in_channels=3):
        super().__init__()
        n = int(math.log2(patch_size))
        if 2 ** n != patch_size:
            raise ValueError(f"the conv stem halves the resolution log2(P) times: patch_size must be a power of 2, got {patch_size}")
        # channels double as the resolution halves, ending at the width: P=16, D=128 -> 16, 32, 64, 128
        channels = [in_channels] + [width // 2 ** (n - 1 - k) for k in range(n)]
        self.convs = nn.ModuleList(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False)  # BN brings the bias
                                   for c_in, c_out in zip(channels[:-1], channels[1:]))
        self.norms = nn.ModuleList(nn.BatchNorm2d(c) for c in channels[1:])
        self.proj = nn.Conv2d(width, width, kernel_size=1)

    def forward(self, x):
        for conv, norm in zip(self.convs, self.norms):
            x = F.relu(norm(conv(x)))  # (B, C, H/2, W/2): twice the channels, half the side
        x = self.proj(x)  # (B, D, S/P, S/P)
        return x.flatten(2).transpose(1, 2)  # (B, N, D), patches in row-major order


STEMS = {"patch": PatchEmbed, "conv": ConvStem}


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x)).
    Normalising before each sub-layer (not after, as in the 2017 Transformer) keeps an
    identity path from input to output, which trains without warm-up tricks."""

    def __init__(self, width, heads, mlp_ratio=4.0, causal=False):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)  # q, k, v for all heads in one matmul
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        # set keep_attention = True to keep each forward's softmax weights (B, H, T, T) in
        # attention_weights, e.g. to draw attention maps (notebooks/01_vit.ipynb)
        self.keep_attention, self.attention_weights = False, None

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=2)  # 3 x (B, T, D)
        q = q.view(B, T, self.heads, D // self.heads).transpose(1, 2)  # (B, H, T, hs)
        k = k.view(B, T, self.heads, D // self.heads).transpose(1, 2)  # (B, H, T, hs)
        v = v.view(B, T, self.heads, D // self.heads).transpose(1, 2)  # (B, H, T, hs)
        if self.keep_attention:
            y, self.attention_weights = attention(q, k, v, causal=self.causal, return_weights=True)  # (B, H, T, hs)
        else:
            y = attention(q, k, v, causal=self.causal, explicit=EXPLICIT_ATTENTION)  # (B, H, T, hs)
        y = y.transpose(1, 2).reshape(B, T, D)  # (B, T, D), heads side by side again
        x = x + self.proj(y)  # (B, T, D)
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))  # (B, T, D)
        return x


class ViT(nn.Module):
    """Patch embedding, optional CLS token, learned positions, blocks, final LayerNorm."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.num_patches = cfg.num_patches
        self.patch_embed = STEMS[cfg.stem](cfg.patch_size, cfg.width)
        # the CLS token is a learned input whose output summarises the image (ViT paper §3.1)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width)) if cfg.use_cls else None
        # attention is order-blind; a learned vector per position tells the model where a patch was
        self.pos_emb = nn.Parameter(torch.zeros(1, cfg.num_patches + cfg.use_cls, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.ln_f = nn.LayerNorm(cfg.width)
        self.apply(init_weights)
        nn.init.normal_(self.pos_emb, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, images, layer=-1, keep_cls=True):
        """images (B, 3, S, S) -> hidden states (B, 1+N, D) with the CLS token first, or (B, N, D).

        layer: which block's output, Python indexing over self.blocks (0 = after the
            first block, -1 = after the last, -2 = after the one before it). Only the
            LAST block's output goes through the final LayerNorm ln_f; any earlier
            layer is the raw residual stream (what LLaVA feeds its projector, with -2).
            Blocks after `layer` are not run.
        keep_cls: False drops the CLS token (no effect when cfg.use_cls is False).
        """
        depth, size = len(self.blocks), self.cfg.image_size
        if not -depth <= layer < depth:
            raise ValueError(f"layer {layer} out of range for a ViT with {depth} blocks")
        if tuple(images.shape[-2:]) != (size, size):
            raise ValueError(f"expected {size}x{size} images, got {tuple(images.shape[-2:])}")
        last = layer % depth  # the non-negative index of the block to stop after
        x = self.patch_embed(images)  # (B, N, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.size(0), -1, -1), x], dim=1)  # (B, 1+N, D)
        x = x + self.pos_emb  # (B, T, D)
        for block in self.blocks[: last + 1]:
            x = block(x)  # (B, T, D)
        if last == depth - 1:
            x = self.ln_f(x)  # (B, T, D)
        if self.cls_token is not None and not keep_cls:
            x = x[:, 1:]  # (B, N, D)
        return x

    def pooled(self, images):
        """One vector per image: the CLS output after ln_f, or the mean of the patch
        outputs (after ln_f) when there is no CLS token. (B, 3, S, S) -> (B, D)."""
        x = self(images)  # (B, T, D)
        return x[:, 0] if self.cls_token is not None else x.mean(dim=1)  # (B, D)
