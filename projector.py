"""
The multimodal projector: maps the vision encoder's patch features into the
language model's embedding space, so each becomes one "visual token" the LLM
reads like a word.

- `linear`: one Linear layer, as in LLaVA ("Visual Instruction Tuning",
  Liu et al. 2023, arXiv:2304.08485, section 4.1).
- `mlp`: Linear-GELU-Linear, as in LLaVA-1.5 ("Improved Baselines with Visual
  Instruction Tuning", Liu et al. 2023, arXiv:2310.03744, section 3.2), which
  found the extra non-linearity helps over the single Linear.
- `pixel_shuffle`: space-to-depth on the patch grid, then Linear, as in
  Idefics3 ("Building and better understanding vision-language models",
  Laurençon et al. 2024, arXiv:2408.12637) and nanoVLM: every s×s neighbourhood
  of patches is concatenated into one vector, so the LLM sees s² times fewer
  image tokens, each s² times wider before the Linear.
- `resampler`: a fixed number of learned queries cross-attend to the patches, as
  in Qwen-VL ("Qwen-VL: A Versatile Vision-Language Model for Understanding,
  Localization, Text Reading, and Beyond", Bai et al. 2023, arXiv:2308.12966,
  section 2.1; Flamingo's Perceiver Resampler, Alayrac et al. 2022,
  arXiv:2204.14198, is its multi-layer ancestor): the LLM sees n_queries tokens
  whatever the number of patches, and 2-D sin-cos position codes on the keys
  tell each query where a patch lies.

Shape legend:
    B   batch of images
    N   patch tokens per image (grid × grid, no CLS)
    N'  visual tokens per image after the projector (num_tokens)
    Dv  vision width (d_vision)
    D   language model width (d_lm)
    s   pixel-shuffle factor
    Q   learned queries of the resampler (n_queries)
    H   attention heads, hd = D / H their width

    x = torch.randn(2, 64, 128)
    proj = make_projector("pixel_shuffle", 128, 256, grid=8)
    proj(x).shape, proj.num_tokens()   # (2, 16, 256), 16
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import vit

PROJECTORS = ("linear", "mlp", "pixel_shuffle", "resampler")

# -----------------------------------------------------------------------------


class Projector(nn.Module):
    """Base class: remembers the patch grid and says how many tokens come out."""

    reduction = 1  # how many patches fold into one visual token

    def __init__(self, grid: int):
        super().__init__()
        self.grid = grid  # patches per side of the (square) image

    def num_tokens(self, n_patches: int | None = None) -> int:
        """N': visual tokens per image, i.e. how many <|image|> slots one image needs."""
        n_patches = self.grid * self.grid if n_patches is None else n_patches
        return n_patches // self.reduction


class LinearProjector(Projector):
    """LLaVA: a single Linear from vision width to LLM width, token by token."""

    def __init__(self, d_vision: int, d_lm: int, grid: int):
        super().__init__(grid)
        self.proj = nn.Linear(d_vision, d_lm)

    def forward(self, x):
        return self.proj(x)  # (B, N, D)


class MLPProjector(Projector):
    """LLaVA-1.5: two Linears with a GELU between, token by token."""

    def __init__(self, d_vision: int, d_lm: int, grid: int):
        super().__init__(grid)
        self.fc1 = nn.Linear(d_vision, d_lm)
        self.fc2 = nn.Linear(d_lm, d_lm)

    def forward(self, x):
        h = F.gelu(self.fc1(x))  # (B, N, D)
        return self.fc2(h)  # (B, N, D)


def check_shuffle(grid: int, s: int) -> None:
    """Pixel shuffle folds whole s×s neighbourhoods, so the grid must split evenly."""
    if s < 1 or grid % s != 0:
        raise ValueError(f"pixel_shuffle: the patch grid ({grid} per side) must be divisible by the shuffle factor {s}")


def pixel_shuffle(x: torch.Tensor, grid: int, s: int) -> torch.Tensor:
    """Space-to-depth: (B, N, Dv) -> (B, N/s², Dv·s²).

    Patches arrive in row-major image order (row r, column c is token r·grid + c).
    Output token (i, j) (again row-major over the (grid/s)² coarse grid) is the
    concatenation of the s×s patches in rows i·s..i·s+s-1 and columns
    j·s..j·s+s-1, themselves in row-major order within the neighbourhood.
    """
    B, N, Dv = x.shape
    if N != grid * grid:
        raise ValueError(f"pixel_shuffle: expected {grid}x{grid}={grid * grid} patches, got {N}")
    check_shuffle(grid, s)
    g = grid // s
    # split each row index into (coarse row i, row within neighbourhood a), same for columns (j, b)
    x = x.view(B, g, s, g, s, Dv)  # (B, i, a, j, b, Dv)
    # bring the two neighbourhood axes next to the channels so they fold into them
    x = x.permute(0, 1, 3, 2, 4, 5)  # (B, i, j, a, b, Dv)
    return x.reshape(B, g * g, s * s * Dv)  # (B, N/s², Dv·s²)


class PixelShuffleProjector(Projector):
    """Idefics3 / nanoVLM: pixel shuffle then Linear, s² times fewer tokens."""

    def __init__(self, d_vision: int, d_lm: int, grid: int, s: int = 2):
        super().__init__(grid)
        check_shuffle(grid, s)
        self.s = s
        self.reduction = s * s
        self.proj = nn.Linear(d_vision * s * s, d_lm)

    def forward(self, x):
        x = pixel_shuffle(x, self.grid, self.s)  # (B, N/s², Dv·s²)
        return self.proj(x)  # (B, N/s², D)


def sincos_2d(rows: int, cols: int, dim: int) -> torch.Tensor:
    """Fixed 2-D position codes (rows·cols, dim) for a row-major patch grid, as in MAE ("Masked
    Autoencoders Are Scalable Vision Learners", He et al. 2021, arXiv:2111.06377) and Qwen-VL:
    the first half of the channels encodes the row, the second half the column, each as
    sin and cos of the index at dim/4 frequencies 1/10000^(i/(dim/4)) (the Transformer's 1-D
    code, once per axis). Fixed, not learned, so any grid size has codes."""
    if dim % 4:
        raise ValueError(f"sincos_2d: dim ({dim}) must be divisible by 4 (sin and cos for two axes)")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4).float() / (dim // 4))  # (dim/4,)
    row = torch.arange(rows).repeat_interleave(cols).float()  # (rows·cols,): patch k is in row k // cols
    col = torch.arange(cols).repeat(rows).float()  # (rows·cols,): and in column k % cols
    codes = []
    for index in (row, col):
        angles = index[:, None] * omega[None, :]  # (rows·cols, dim/4)
        codes += [angles.sin(), angles.cos()]
    return torch.cat(codes, dim=1)  # (rows·cols, dim): [sin row | cos row | sin col | cos col]


class ResamplerProjector(Projector):
    """Qwen-VL: Q learned queries, one cross-attention over the patches, Q visual tokens.

    The patches are first mapped to the LLM width D (kv_proj), where the attention happens.
    Keys get the patch's 2-D position code added, values do not: a query can choose patches
    by where they are, and what it collects is their content."""

    def __init__(self, d_vision: int, d_lm: int, grid: int, n_queries: int = 16, heads: int = 4):
        super().__init__(grid)
        if n_queries < 1:
            raise ValueError(f"resampler: n_queries must be >= 1, got {n_queries}")
        if d_lm % heads:
            raise ValueError(f"resampler: the LLM width {d_lm} must be divisible by heads {heads}")
        self.n_queries, self.heads = n_queries, heads
        self.queries = nn.Parameter(0.02 * torch.randn(n_queries, d_lm))  # (Q, D), learned
        self.kv_proj = nn.Linear(d_vision, d_lm)
        self.ln_q = nn.LayerNorm(d_lm)
        self.ln_kv = nn.LayerNorm(d_lm)
        self.q = nn.Linear(d_lm, d_lm)
        self.k = nn.Linear(d_lm, d_lm)
        self.v = nn.Linear(d_lm, d_lm)
        self.out = nn.Linear(d_lm, d_lm)

    def num_tokens(self, n_patches: int | None = None) -> int:
        return self.n_queries  # the point of a resampler: the same count for any image size

    def forward(self, x):
        B, N, _ = x.shape
        side = math.isqrt(N)
        if side * side != N:
            raise ValueError(f"resampler: expected a square grid of patches, got {N}")
        kv = self.ln_kv(self.kv_proj(x))  # (B, N, D)
        D, H = kv.size(-1), self.heads
        pos = sincos_2d(side, side, D).to(kv)  # (N, D)
        q = self.q(self.ln_q(self.queries)).expand(B, -1, -1)  # (B, Q, D), the same queries for every image
        k = self.k(kv + pos)  # (B, N, D)
        v = self.v(kv)  # (B, N, D)
        q = q.reshape(B, self.n_queries, H, D // H).transpose(1, 2)  # (B, H, Q, hd)
        k = k.view(B, N, H, D // H).transpose(1, 2)  # (B, H, N, hd)
        v = v.view(B, N, H, D // H).transpose(1, 2)  # (B, H, N, hd)
        y = vit.attention(q, k, v, explicit=vit.EXPLICIT_ATTENTION)  # (B, H, Q, hd), no mask: every patch
        y = y.transpose(1, 2).reshape(B, self.n_queries, D)  # (B, Q, D)
        return self.out(y)  # (B, Q, D)


# -----------------------------------------------------------------------------


def make_projector(kind: str, d_vision: int, d_lm: int, grid: int, shuffle_factor: int = 2,
                   n_queries: int = 16) -> Projector:
    """Build the projector named `kind`; one branch per kind, so a new one is one more `if`."""
    if kind == "linear":
        return LinearProjector(d_vision, d_lm, grid)
    if kind == "mlp":
        return MLPProjector(d_vision, d_lm, grid)
    if kind == "pixel_shuffle":
        return PixelShuffleProjector(d_vision, d_lm, grid, shuffle_factor)
    if kind == "resampler":
        return ResamplerProjector(d_vision, d_lm, grid, n_queries)
    raise ValueError(f"unknown projector {kind!r}; valid kinds: {', '.join(PROJECTORS)}")
