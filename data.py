"""
data.py — everything between raw data and the model's tensors: the tokenizer, the
chat template, image loading and preprocessing, and the batch collator.

Tokenizer: a byte-level BPE trained here from the training text (Sennrich et al.,
"Neural Machine Translation of Rare Words with Subword Units", 2016, arXiv:1508.07909),
on raw UTF-8 bytes with the GPT-2 pre-tokenisation regex (Radford et al., "Language
Models are Unsupervised Multitask Learners", 2019), so any string encodes with no
unknown token. `tiktoken` does the encoding; we only supply its ranks.
Chat template: ChatML-style turns with LLaVA's `<image>` marker (Liu et al., "Visual
Instruction Tuning", 2023, arXiv:2304.08485); only the assistant's answers carry labels.

Your own data: LLaVA's conversation JSON (a list) or JSONL, checked row by row; a row that
cannot be used is skipped and counted by reason, never a crash mid-run (DESIGN.md "User data").

Shape legend: B batch, T tokens, n images in a batch, S image side in pixels.
Run the tests: python -m pytest -q tests/test_data.py
"""
import collections
import heapq
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import regex
import tiktoken
import torch
from PIL import Image

# GPT-2's split pattern, exactly tiktoken's `gpt2` pat_str: contractions, runs of letters,
# runs of digits, runs of other symbols (each with one optional leading space), whitespace.
# BPE never merges across these chunks, so " the" and "the." never share a token.
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>", "<|image|>",
                  "<global_image>"] + [f"<row_{i}_col_{j}>" for i in range(1, 5) for j in range(1, 5)]
IMAGE_MARKER = "<image>"   # what people write in a prompt (LLaVA's convention)
IGNORE_INDEX = -100        # label of positions without loss (F.cross_entropy's default)
MEAN = (0.5, 0.5, 0.5)     # per-channel normalisation: [0, 1] -> [-1, 1]
STD = (0.5, 0.5, 0.5)

# ----------------------------------------------------------------------------- tokenizer


def _merge(symbols, pair):
    """Replace every non-overlapping occurrence of `pair`, left to right, by its concatenation."""
    out, k = [], 0
    while k < len(symbols):
        if k + 1 < len(symbols) and (symbols[k], symbols[k + 1]) == pair:
            out.append(symbols[k] + symbols[k + 1])
            k += 2
        else:
            out.append(symbols[k])
            k += 1
    return out


def train_bpe(texts, vocab_size):
    """Learn byte-level BPE ranks: {token bytes: rank}, the 256 single bytes first.

    Each merge joins the most frequent adjacent pair of tokens (ties: the lexicographically
    smallest pair) and gets the next rank. Stops at vocab_size - len(SPECIAL_TOKENS) ranks or
    when no pair occurs twice. Works on unique chunks, updating pair counts incrementally
    (tests/test_data.py checks it against a naive version that recounts everything per merge).
    """
    n_ranks = vocab_size - len(SPECIAL_TOKENS)
    if n_ranks < 256:
        raise ValueError(f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)} "
                         f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens), got {vocab_size}")
    # A sentence set repeats the same words thousands of times: count each chunk once.
    pattern = regex.compile(GPT2_SPLIT_PATTERN)
    chunk_counts = collections.Counter(c for text in texts for c in pattern.findall(text))
    words = [[bytes([b]) for b in chunk.encode("utf-8")] for chunk in chunk_counts]
    freqs = list(chunk_counts.values())
    ranks = {bytes([b]): b for b in range(256)}
    # pair -> total frequency, and pair -> which words contain it (so a merge touches only those).
    pair_counts, where = collections.Counter(), collections.defaultdict(set)
    for i, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freqs[i]
            where[pair].add(i)
    # A max-heap of (-count, pair) finds the best pair without scanning every pair each merge;
    # ties pop the smallest pair. Counts change as words merge, so an entry whose count is no
    # longer the pair's current count is stale and skipped (the change pushed a fresh entry).
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    while len(ranks) < n_ranks and heap:
        neg_count, best = heapq.heappop(heap)
        if pair_counts.get(best) != -neg_count:
            continue
        if -neg_count < 2:
            break
        changed = set()
        for i in list(where[best]):
            old, new = words[i], _merge(words[i], best)
            for pair in zip(old, old[1:]):
                pair_counts[pair] -= freqs[i]
                where[pair].discard(i)
            for pair in zip(new, new[1:]):
                pair_counts[pair] += freqs[i]
                where[pair].add(i)
            changed.update(zip(old, old[1:]), zip(new, new[1:]))
            words[i] = new
        for pair in changed:
            if pair_counts[pair] > 0:
                heapq.heappush(heap, (-pair_counts[pair], pair))
            else:
                del pair_counts[pair], where[pair]
        # Two merge paths can spell the same bytes ("a"+"bc", "ab"+"c"): one rank per token.
        ranks.setdefault(best[0] + best[1], len(ranks))
    return ranks


class Tokenizer:
    """BPE ranks served by tiktoken, with SPECIAL_TOKENS given the ids right after the ranks."""

    def __init__(self, ranks):
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise ValueError("tokenizer ranks must be exactly 0 .. len(ranks) - 1")
        if any(bytes([b]) not in ranks for b in range(256)):
            raise ValueError("tokenizer ranks must contain all 256 single bytes (the byte fallback)")
        self.ranks = ranks
        self.special_ids = {s: len(ranks) + k for k, s in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(name="tinyvlm", pat_str=GPT2_SPLIT_PATTERN,
                                     mergeable_ranks=ranks, special_tokens=self.special_ids)
        self.vocab_size = len(ranks) + len(SPECIAL_TOKENS)
        self.eot_id = self.special_ids["<|endoftext|>"]
        self.pad_id = self.special_ids["<|pad|>"]
        self.im_start_id = self.special_ids["<|im_start|>"]
        self.im_end_id = self.special_ids["<|im_end|>"]
        self.image_id = self.special_ids["<|image|>"]
        self.global_image_id = self.special_ids["<global_image>"]

    def row_col_id(self, i, j):
        """Id of <row_i_col_j>, the tag before tile (i, j) of a tiled image (1-based, up to 4x4)."""
        return self.special_ids[f"<row_{i}_col_{j}>"]

    def encode(self, text):
        # encode_ordinary: a user who types "<|im_end|>" gets those characters as plain text,
        # never the control token — otherwise text could forge turns of the chat template.
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self.enc.decode(ids, errors="replace")   # a cut multi-byte character -> U+FFFD

    def state(self):
        """The ranks as tensors, which torch.load(weights_only=True) accepts in a checkpoint."""
        tokens = sorted(self.ranks, key=self.ranks.get)   # token bytes in rank order
        return {"ranks": {"token_bytes": torch.tensor(list(b"".join(tokens)), dtype=torch.uint8),
                          "token_lengths": torch.tensor([len(t) for t in tokens], dtype=torch.int64)},
                "special_tokens": list(SPECIAL_TOKENS)}

    def save(self, path):
        """A readable tokenizer.json: the tokens in rank order, each byte shown as the one
        Latin-1 character of the same number (so " circle" reads as itself), written atomically."""
        tokens = sorted(self.ranks, key=self.ranks.get)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"special_tokens": list(SPECIAL_TOKENS), "tokens": [t.decode("latin-1") for t in tokens]},
                      f, indent=0)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path):
        with open(path) as f:
            saved = json.load(f)
        if saved.get("special_tokens") != SPECIAL_TOKENS:
            raise ValueError("its special tokens differ from this data.py's")
        return cls({t.encode("latin-1"): rank for rank, t in enumerate(saved["tokens"])})

    @classmethod
    def from_state(cls, state):
        if state.get("special_tokens", SPECIAL_TOKENS) != SPECIAL_TOKENS:
            raise ValueError("checkpoint tokenizer has different special tokens than this data.py")
        blob = state["ranks"]["token_bytes"].numpy().tobytes()   # all tokens' bytes, end to end
        ranks, start = {}, 0
        for rank, length in enumerate(state["ranks"]["token_lengths"].tolist()):
            ranks[blob[start:start + length]] = rank
            start += length
        return cls(ranks)

    @classmethod
    def gpt2(cls):
        """GPT-2's ranks with our specials right after them, so <|endoftext|> keeps GPT-2's own id."""
        try:
            enc = tiktoken.get_encoding("gpt2")
        except Exception as e:
            raise RuntimeError(f"tokenizer gpt2 needs tiktoken's GPT-2 files from the network "
                               f"(or a TIKTOKEN_CACHE_DIR copy); loading failed: {type(e).__name__}") from e
        gpt2_specials = {enc.encode_single_token(s) for s in enc.special_tokens_set}
        ranks = {enc.decode_single_token_bytes(i): i for i in range(enc.n_vocab) if i not in gpt2_specials}
        return cls(ranks)


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
    """Token ids and labels of a conversation in the chat template (see DESIGN.md).

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


# ----------------------------------------------------------------------------- your own data (LLaVA JSON)

ROLES = {"human": "user", "gpt": "assistant"}   # LLaVA's speaker names -> the chat template's roles
SPEAKERS = {role: speaker for speaker, role in ROLES.items()}

# Why a row cannot be used, in the order the checks run (a row is counted under the first).
MALFORMED = "malformed row"                     # not an object, no list of {"from", "value"} turns, ...
EMPTY_TURN = "no turns or an empty turn"
NOT_ALTERNATING = "turns not alternating human, gpt"
MARKER_COUNT = "<image> markers != images"
MISSING_IMAGE = "missing image"
UNREADABLE_IMAGE = "unreadable image"
# checked by train.py, which has the tokenizer and knows what each stage needs:
NOT_ONE_IMAGE = "caption row without exactly one image"
FIRST_EXCHANGE_TOO_LONG = "first exchange longer than the context"


@dataclass
class Row:
    """One usable row of a LLaVA file."""
    id: object       # the row's "id" (its position in the file when it has none)
    images: list     # Paths: the k-th image fills the k-th <image> marker
    messages: list   # [{"role": "user" | "assistant", "content": str}], alternating, user first


def read_rows(path):
    """The raw rows of a LLaVA file: a JSON list, or one JSON object per line for a .jsonl
    file. Anything that is not valid JSON is a DataError naming the line and column."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")   # -sig: a byte-order mark some editors write is skipped
    except UnicodeDecodeError as e:
        raise DataError(path, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.suffix == ".jsonl":
        return [_parse_json(path, line, n) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    rows = _parse_json(path, text, 1)
    if not isinstance(rows, list):
        raise DataError(path, f"expected a JSON list of rows (LLaVA format; one object per line needs "
                              f"a .jsonl name), found a JSON {type(rows).__name__}")
    return rows


def _parse_json(path, text, first_line):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, f"line {first_line + e.lineno - 1}, column {e.colno}: invalid JSON ({e.msg})") from None


def id_of(raw, position):
    """A row's "id", or its position in the file when it has none."""
    return raw.get("id", position) if isinstance(raw, dict) else position


def parse_row(raw, position, image_folder, open_end=False):
    """(Row, None) for a row whose text is usable, else (None, the reason). No image is
    opened here. open_end: the last turn may be a question (a question file for generate.py)."""
    if not isinstance(raw, dict):
        return None, MALFORMED
    turns, paths = raw.get("conversations"), raw.get("image") or []
    paths = [paths] if isinstance(paths, str) else paths
    if (not isinstance(turns, list) or not isinstance(paths, list) or not all(isinstance(p, str) for p in paths)
            or not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns)):
        return None, MALFORMED
    if not turns or any(not t["value"].strip() for t in turns):
        return None, EMPTY_TURN
    roles = [ROLES.get(t.get("from")) for t in turns]
    if roles != [("user", "assistant")[k % 2] for k in range(len(turns))] or (roles[-1] == "user" and not open_end):
        return None, NOT_ALTERNATING
    messages = [{"role": role, "content": t["value"]} for role, t in zip(roles, turns)]
    if count_images(messages) != len(paths):
        return None, MARKER_COUNT
    return Row(id_of(raw, position), [Path(image_folder) / p for p in paths], messages), None   # an absolute p stays as it is


def load_llava(path, image_folder="", open_end=False, check_images=True):
    """(rows, skipped) of a LLaVA JSON / JSONL file: the usable rows in file order, and
    {reason: [row ids]} for the others. Relative image paths are under image_folder
    (default: the file's own folder).

    Every image is opened and decoded here, once (check_images=False skips that): a row with
    a broken image is dropped before training starts, so a long run never meets one.
    Decoding costs about a millisecond per small image; the pixels are not kept, training
    reads each file again when a batch needs it."""
    folder = Path(image_folder) if image_folder else Path(path).parent
    rows, skipped, image_problems = [], collections.defaultdict(list), {}
    for position, raw in enumerate(read_rows(path)):
        row, reason = parse_row(raw, position, folder, open_end)
        if row is not None and check_images:
            for p in row.images:
                if p not in image_problems:
                    image_problems[p] = _image_problem(p)
            reason = next((image_problems[p] for p in row.images if image_problems[p]), None)
        if reason:
            skipped[reason].append(id_of(raw, position))
        else:
            rows.append(row)
    return rows, dict(skipped)


def _image_problem(path):
    try:
        load_image(path)
    except ImageError as e:
        return MISSING_IMAGE if e.reason == "no such file" else UNREADABLE_IMAGE
    return None


def drop_rows(rows, skipped, reason, keep):
    """The rows for which keep(row) holds; the ids of the others are added to skipped[reason]."""
    dropped = [r.id for r in rows if not keep(r)]
    if dropped:
        skipped.setdefault(reason, []).extend(dropped)
    return [r for r in rows if keep(r)]


def report_rows(n_usable, skipped, max_ids=5):
    """How a data file was read, in one line: rows usable, rows skipped per reason with their
    first few ids."""
    n_skipped = sum(len(ids) for ids in skipped.values())
    line = f"{n_usable:,} of {n_usable + n_skipped:,} rows usable"
    if n_skipped:
        parts = [f"{reason} {len(ids):,} (ids {', '.join(map(str, ids[:max_ids]))}{', ...' if len(ids) > max_ids else ''})"
                 for reason, ids in skipped.items()]
        line += f"; skipped {n_skipped:,}: " + "; ".join(parts)
    return line


def llava_row(row_id, images, messages):
    """A row in LLaVA's format from chat messages (the inverse of parse_row): `image` is one
    path, a list of paths, or absent for a text-only conversation."""
    row = {"id": row_id}
    if images:
        row["image"] = images[0] if len(images) == 1 else list(images)
    row["conversations"] = [{"from": SPEAKERS[m["role"]], "value": m["content"]} for m in messages]
    return row


def save_llava(path, rows):
    """Write rows as a JSON list (or one object per line for a .jsonl path)."""
    with open(path, "w", encoding="utf-8") as f:
        if str(path).endswith(".jsonl"):
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        else:
            json.dump(rows, f, indent=1, ensure_ascii=False)


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
    return batch
