"""
data.py — everything between an image or a conversation and the model's tensors: the chat
template and its labels, image loading and preprocessing (any-res tiling included), and the
batch collator.

Chat template: ChatML-style turns with LLaVA's `<image>` marker (Liu et al., "Visual
Instruction Tuning", 2023, arXiv:2304.08485); only the assistant's answers carry labels.
Any-res tiling: LLaVA-NeXT ("LLaVA-NeXT: Improved reasoning, OCR, and world knowledge",
Liu et al. 2024) and nanoVLM. The tokenizer itself is tokenizer.py; LLaVA JSON files,
your own data, are user_data.py.

Shape legend: B batch, T tokens, n images in a batch, S image side in pixels.
Run the tests: python -m pytest -q tests/test_data.py
"""
import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_MARKER = "<image>"   # what people write in a prompt (LLaVA's convention)
IGNORE_INDEX = -100        # label of positions without loss (F.cross_entropy's default)
MEAN = (0.5, 0.5, 0.5)     # per-channel normalisation: [0, 1] -> [-1, 1]
STD = (0.5, 0.5, 0.5)

# ----------------------------------------------------------------------------- chat template


def image_block(tok, n_tokens, grid=None):
    """The ids one image occupies in the sequence: n_tokens <|image|> slots that the model
    overwrites with the projector's visual tokens. With grid=(rows, cols), a tiled image
    (any-res, see image_input): <global_image> and the global view's slots, then for each
    tile in row-major order <row_i_col_j> (1-based) and its slots, the tags telling the LLM
    where each group of visual tokens comes from (nanoVLM's layout)."""
    slots = [tok.image_id] * n_tokens
    if grid is None:
        return slots
    rows, cols = grid
    ids = [tok.global_image_id] + slots
    for i in range(1, rows + 1):
        for j in range(1, cols + 1):
            ids += [tok.row_col_id(i, j)] + slots
    return ids


def count_images(messages):
    """How many images a conversation shows: the <image> markers in its user turns."""
    return sum(m["content"].count(IMAGE_MARKER) for m in messages if m["role"] == "user")


def without_images(messages):
    """The conversation as text only: the <image> markers of its user turns removed (for the
    text-only lm stage)."""
    return [{**m, "content": m["content"].replace(IMAGE_MARKER + "\n", "").replace(IMAGE_MARKER, "")}
            if m["role"] == "user" else m for m in messages]


def _check_roles(messages):
    if not messages:
        raise ValueError("a conversation needs at least one message")
    for k, m in enumerate(messages):
        expected = ("user", "assistant")[k % 2]
        if m["role"] != expected:
            raise ValueError(f"message {k} has role {m['role']!r}; roles must alternate user, assistant, ...")


def _user_content(tok, text, blocks):
    """Encode user text, expanding each <image> marker into the next image's block: a size
    (that many <|image|> slots) or the block's ids as they are (a tiled image's layout)."""
    pieces = text.split(IMAGE_MARKER)
    ids = tok.encode(pieces[0])
    for piece in pieces[1:]:
        block = next(blocks)
        ids += (image_block(tok, block) if isinstance(block, int) else list(block)) + tok.encode(piece)
    return ids


def encode_chat(tok, messages, image_tokens, system=None):
    """Token ids and labels of a conversation in the chat template.

    Pieces are encoded separately and concatenated, so a label boundary is always a token
    boundary. Labels: the ids of each assistant answer and its <|im_end|> (the model must
    learn to stop); IGNORE_INDEX everywhere else. image_tokens: one int for every image,
    or a list with one entry per <image> marker in order of appearance: a block size, or
    the block's ids (from image_block or image_input).
    """
    _check_roles(messages)
    n_images = count_images(messages)
    sizes = [image_tokens] * n_images if isinstance(image_tokens, int) else list(image_tokens)
    if len(sizes) != n_images:
        raise ValueError(f"{n_images} {IMAGE_MARKER} markers in the conversation "
                         f"but {len(sizes)} image sizes")
    block_sizes = iter(sizes)
    newline = tok.encode("\n")
    ids, labels = [], []
    if system is not None:
        turn = [tok.im_start_id] + tok.encode("system\n") + tok.encode(system) + [tok.im_end_id] + newline
        ids += turn
        labels += [IGNORE_INDEX] * len(turn)
    for m in messages:
        header = [tok.im_start_id] + tok.encode(m["role"] + "\n")
        if m["role"] == "user":
            body = _user_content(tok, m["content"], block_sizes) + [tok.im_end_id]
            body_labels = [IGNORE_INDEX] * len(body)
        else:
            body = tok.encode(m["content"]) + [tok.im_end_id]
            body_labels = body
        ids += header + body + newline
        labels += [IGNORE_INDEX] * len(header) + body_labels + [IGNORE_INDEX] * len(newline)
    return ids, labels


def encode_prompt(tok, messages, image_tokens, system=None):
    """Ids for generation: the conversation so far (ending with a user turn), then the
    assistant's header, so the model's next token is the first token of its answer."""
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("a generation prompt must end with a user message")
    ids, _ = encode_chat(tok, messages, image_tokens, system)
    return ids + [tok.im_start_id] + tok.encode("assistant\n")


def question(text, n_images=1):
    """A one-turn conversation about n_images images: LLaVA puts the image before the question;
    several images come one per line, in order."""
    return [{"role": "user", "content": "\n".join([IMAGE_MARKER] * n_images + [text])}]


# ----------------------------------------------------------------------------- images


class DataError(ValueError):
    """A data file we refuse (a data set or an image), with a one-line message naming the
    file and the reason: train.py and generate.py print it as `error: ...` and exit 2."""

    def __init__(self, path, reason):
        self.path, self.reason = str(path), " ".join(str(reason).split())   # one line, always
        super().__init__(f"{self.path}: {self.reason}")


class ImageError(DataError):
    """An image file we refuse: missing, empty, not an image, corrupt, or too large."""


def load_image(path):
    """Open an image file as RGB, or raise ImageError: missing, empty, not an image,
    truncated or corrupt, or more pixels than Pillow's decompression-bomb limit."""
    path = Path(path)
    if not path.exists():
        raise ImageError(path, "no such file")
    if path.is_dir():
        raise ImageError(path, "is a directory, not an image file")
    if path.stat().st_size == 0:
        raise ImageError(path, "empty file (0 bytes)")
    return _decode_image(path, path)


def image_from_bytes(raw, name):
    """An image held in memory (an upload) as RGB, refused like load_image refuses a file;
    `name` stands for the file in the error message."""
    if not raw:
        raise ImageError(name, "empty file (0 bytes)")
    return _decode_image(io.BytesIO(raw), name)


def _decode_image(source, path):
    """Decode a file or file-like object with Pillow, with every check load_image promises."""
    try:
        with warnings.catch_warnings():
            # Image.open raises DecompressionBombError above 2x the limit but only warns between
            # 1x and 2x; we silence that warning and refuse everything over 1x ourselves below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as img:   # reads the header only; animations open on frame 0
                limit = Image.MAX_IMAGE_PIXELS
                if limit is not None and img.width * img.height > limit:
                    raise ImageError(path, f"{img.width}x{img.height} pixels is over Pillow's "
                                           f"decompression-bomb limit of {limit} pixels")
                img.load()   # force the full decode now, so a truncated file fails here
                return to_rgb(img)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(path, f"over Pillow's decompression-bomb limit ({e})") from e
    except Image.UnidentifiedImageError as e:
        raise ImageError(path, "not an image file Pillow can read") from e
    except Exception as e:   # Pillow's decoders raise OSError, SyntaxError, ValueError, EOFError, ...
        raise ImageError(path, f"corrupt or truncated image ({type(e).__name__}: {e})") from e


def _stretch_to_l(values, lo, hi):
    """Map an array linearly from [lo, hi] onto 0..255 as an 8-bit greyscale image."""
    if hi <= lo:   # a constant image has no range to stretch: neutral grey (0 after MEAN/STD)
        return Image.new("L", values.shape[::-1], 128)
    scaled = (values.astype(np.float64) - lo) * (255.0 / (hi - lo))
    return Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8), "L")


def to_rgb(img):
    """Any Pillow mode -> RGB. Alpha is composited over white; wide modes are scaled, not clipped."""
    if img.mode.startswith("I;16"):
        # 16-bit greyscale (I;16, I;16L, I;16B, I;16N): 65535 is white. Pillow's own
        # convert("L") clips at 255, which turns almost every 16-bit image white.
        img = _stretch_to_l(np.asarray(img), 0, 65535)
    elif img.mode in ("I", "F"):
        # 32-bit int / float have no fixed white point: stretch the image's own range.
        a = np.asarray(img).astype(np.float64)
        finite = a[np.isfinite(a)]
        lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
        img = _stretch_to_l(np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo), lo, hi)
    if img.has_transparency_data:   # RGBA, LA, PA, La, RGBa, or a palette/tRNS transparency
        if img.mode == "La":          # premultiplied L; Pillow goes La -> LA -> RGBA only
            img = img.convert("LA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img.convert("RGBA"))
    return img.convert("RGB")


def preprocess(img, size, height=None):
    """PIL image -> (3, size, size) float tensor, normalised with MEAN and STD; with height,
    (3, height, size): size pixels wide, height high (the canvas of a tile grid)."""
    img = to_rgb(img)
    height = size if height is None else height
    # Squash to a square, never crop: grounding boxes are integer percent of width and height,
    # and a squash keeps every percent coordinate where it was (a crop would cut boxes off).
    # reducing_gap: first shrink by an integer factor (fast box filter) when the image is far
    # larger than the target, then resample; a 4000-pixel photo costs little more than a small one.
    img = img.resize((size, height), Image.Resampling.BICUBIC, reducing_gap=3.0)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)          # (H, S, 3) in [0, 1]
    x = x.permute(2, 0, 1)                                                   # (3, H, S)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    return ((x - mean) / std).contiguous()                                  # (3, H, S)


def select_best_resolution(image_size, grids, tile):
    """The (rows, cols) of `grids` whose canvas (cols·tile wide, rows·tile high) best fits an
    image of image_size = (width, height), by LLaVA-NeXT's rule ("LLaVA-NeXT: Improved
    reasoning, OCR, and world knowledge", Liu et al. 2024; its select_best_resolution): scale
    the image to fit the canvas with its aspect ratio kept; the effective resolution is the
    pixel count it then has, never more than its own (upscaling adds no detail). Most
    effective pixels wins; among equals, the canvas with the fewest wasted pixels."""
    width, height = image_size
    best, best_key = None, None
    for rows, cols in grids:
        canvas_w, canvas_h = cols * tile, rows * tile
        scale = min(canvas_w / width, canvas_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        key = (effective, -(canvas_w * canvas_h - effective))  # more detail, then less waste
        if best_key is None or key > best_key:
            best, best_key = (rows, cols), key
    return best


def tile_views(img, tile, grid):
    """(1 + rows·cols, 3, tile, tile): the global view (the whole image squashed to one tile),
    then the tiles, row-major, of the image squashed onto the grid's canvas. Squashed, not
    padded as in LLaVA-NeXT: percent boxes stay exact, and the chosen grid keeps the
    squash small."""
    rows, cols = grid
    canvas = preprocess(img, cols * tile, rows * tile)                      # (3, rows·t, cols·t)
    tiles = canvas.view(3, rows, tile, cols, tile).permute(1, 3, 0, 2, 4)   # (rows, cols, 3, t, t)
    return torch.cat([preprocess(img, tile)[None], tiles.reshape(rows * cols, 3, tile, tile)])


def image_tokens_at_most(tok, n_tokens, grids=()):
    """The most ids one image can take in a sequence: its slots, or with tiling the block of
    the largest allowed grid. A bound for length checks made before an image is opened (the
    grid an image gets depends on its shape)."""
    return len(image_block(tok, n_tokens, max(grids, key=lambda g: g[0] * g[1]) if grids else None))


def image_input(tok, img, size, n_tokens, grids=()):
    """What one image adds to a sample: (views (V, 3, size, size), its block of ids).
    Without grids: V = 1, the image squashed to size x size, n_tokens <|image|> slots.
    With grids, any-res tiling (LLaVA-NeXT; nanoVLM): the grid that best fits the image
    (select_best_resolution), V = 1 + rows·cols views each encoded alone at the encoder's
    resolution, and the tagged layout of image_block. Each view gets n_tokens slots."""
    if not grids:
        return preprocess(img, size)[None], image_block(tok, n_tokens)
    grid = select_best_resolution(img.size, grids, size)
    return tile_views(img, size, grid), image_block(tok, n_tokens, grid)


def to_pil(x):
    """Inverse of preprocess (after the resize): a (3, H, W) normalised tensor -> RGB image."""
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    x = (x.detach().float().cpu() * std + mean).clamp(0, 1)                  # (3, H, W) in [0, 1]
    pixels = (x * 255).round().to(torch.uint8).permute(1, 2, 0)             # (H, W, 3)
    return Image.fromarray(pixels.numpy(), "RGB")

# ----------------------------------------------------------------------------- collator


def collate(samples, pad_id, side="right"):
    """Pad a list of samples into a batch.

    samples: [{"input_ids": list[int], "labels": list[int] (optional), "images": (n_i, 3, S, S) or None}]
    Right padding for training (real tokens keep positions 0..len-1); left padding for
    generation, so every row's last real token sits at the end and new tokens append after it.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    with_labels = ["labels" in s for s in samples]
    if any(with_labels) and not all(with_labels):
        raise ValueError("either every sample has labels or none has")
    B, T = len(samples), max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)                 # (B, T)
    attention_mask = torch.zeros((B, T), dtype=torch.long)                   # (B, T) 1 = real token
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)              # (B, T)
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        cols = slice(T - n, T) if side == "left" else slice(0, n)
        input_ids[b, cols] = torch.tensor(s["input_ids"], dtype=torch.long)
        attention_mask[b, cols] = 1
        if all(with_labels):
            if len(s["labels"]) != n:
                raise ValueError(f"sample {b}: {len(s['labels'])} labels for {n} input ids")
            labels[b, cols] = torch.tensor(s["labels"], dtype=torch.long)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if all(with_labels):
        batch["labels"] = labels
    # Images in batch order: the k-th <|image|> block of the batch is the k-th image here.
    images = [s["images"] for s in samples if s.get("images") is not None]
    batch["images"] = torch.cat(images) if images else None                 # (n, 3, S, S)
    batch["views"] = torch.tensor([0 if s.get("images") is None else len(s["images"]) for s in samples])  # (B,)
    return batch
