"""Tests for data.py: BPE training against hand-computed merges and a naive reference,
tokenizer round trips and checkpoint state, the chat template against hand-built id
sequences, image modes/sizes/errors against known colours, the collator's padding, and
LLaVA files: JSON and JSONL alike, every kind of bad row under its reason, malformed JSON.
Run: python -m pytest -q tests/test_data.py"""
import collections
import io
import random
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import regex
import tiktoken
import torch
from PIL import Image, ImageFile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402

N_SPECIAL = len(data.SPECIAL_TOKENS)


# ----------------------------------------------------------------------------- BPE

# The Hugging Face course's BPE example, one chunk per text (no spaces, so the GPT-2 regex
# keeps each word whole). Pair counts worked out by hand:
#   u+g 20 (hug 10, pug 5, hugs 5) > p+u 17 > u+n 16 > h+u 15          -> merge "ug"
#   u+n 16 (pun 12, bun 4) > h+ug 15 > p+u 12                          -> merge "un"
#   h+ug 15 (hug 10, hugs 5) > p+un 12                                 -> merge "hug"
#   p+un 12 > p+ug 5 = hug+s 5 > b+un 4                                -> merge "pun"
#   tie at 5: (b"hug", b"s") < (b"p", b"ug") lexicographically         -> merge "hugs"
#   then "pug" (5), then "bun" (4); every word is then one token, so training stops.
HUG_CORPUS = ["hug"] * 10 + ["pug"] * 5 + ["pun"] * 12 + ["bun"] * 4 + ["hugs"] * 5
HUG_MERGES = [b"ug", b"un", b"hug", b"pun", b"hugs", b"pug", b"bun"]


def merged_tokens(ranks):
    return sorted((t for t in ranks if ranks[t] >= 256), key=ranks.get)


def test_bpe_first_merges_are_the_hand_computed_ones():
    ranks = data.train_bpe(HUG_CORPUS, vocab_size=1000)
    assert all(ranks[bytes([b])] == b for b in range(256))   # the 256 bytes first, in byte order
    assert merged_tokens(ranks) == HUG_MERGES                # stopped: no pair occurs twice
    ranks3 = data.train_bpe(HUG_CORPUS, vocab_size=256 + N_SPECIAL + 3)
    assert merged_tokens(ranks3) == HUG_MERGES[:3] and len(ranks3) == 259
    tok = data.Tokenizer(ranks)
    assert tok.encode("hugs") == [ranks[b"hugs"]] and tok.encode("bun") == [ranks[b"bun"]]


def naive_bpe(texts, vocab_size):
    """Reference: recount every pair over every chunk occurrence at each step (slow, obvious)."""
    chunks = [list(c.encode()) for t in texts for c in regex.findall(data.GPT2_SPLIT_PATTERN, t)]
    words = [[bytes([b]) for b in c] for c in chunks]
    ranks = {bytes([b]): b for b in range(256)}
    while len(ranks) < vocab_size - N_SPECIAL:
        counts = collections.Counter(p for w in words for p in zip(w, w[1:]))
        if not counts or max(counts.values()) < 2:
            break
        top = max(counts.values())
        best = sorted(p for p, c in counts.items() if c == top)[0]
        for w in words:
            k = 0
            while k < len(w) - 1:
                if (w[k], w[k + 1]) == best:
                    w[k:k + 2] = [w[k] + w[k + 1]]
                k += 1
        ranks.setdefault(best[0] + best[1], len(ranks))
    return ranks


def random_corpus(seed, n_texts=300):
    rng = random.Random(seed)
    words = ["".join(rng.choice("aab cdé日") for _ in range(rng.randint(1, 7))) for _ in range(40)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 8))) + rng.choice([".", "!", "", " 42"])
            for _ in range(n_texts)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bpe_matches_naive_reference(seed):
    texts = random_corpus(seed)
    assert data.train_bpe(texts, 256 + N_SPECIAL + 80) == naive_bpe(texts, 256 + N_SPECIAL + 80)


def test_bpe_is_deterministic_and_independent_of_text_order():
    texts = random_corpus(3)
    shuffled = texts[:]
    random.Random(0).shuffle(shuffled)
    assert data.train_bpe(texts, 400) == data.train_bpe(texts, 400) == data.train_bpe(shuffled, 400)


def test_bpe_vocab_size_respected_and_fast():
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
             for _ in range(200)]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 10))) + "." for _ in range(20000)]
    start = time.perf_counter()
    ranks = data.train_bpe(texts, 512)
    assert time.perf_counter() - start < 3.0
    assert len(ranks) == 512 - N_SPECIAL and sorted(ranks.values()) == list(range(512 - N_SPECIAL))
    assert data.Tokenizer(ranks).vocab_size == 512
    with pytest.raises(ValueError):
        data.train_bpe(texts, 256 + N_SPECIAL - 1)


# ----------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tok():
    texts = ["What colour is the circle? red", "a large red circle at the top left",
             "Is there a blue square in the image? no"] * 20
    return data.Tokenizer(data.train_bpe(texts, 256 + N_SPECIAL + 60))


def test_round_trip_any_text(tok):
    rng = random.Random(0)
    texts = ["What colour is the circle?", "crème brûlée à la façon", "日本語のテキスト", "👋🏽 hi 👋",
             "", "  \n\t  trailing   ", "tabs\tand\r\nlines\n\n"]
    texts += [rng.randbytes(rng.randint(1, 64)).decode("utf-8", errors="replace") for _ in range(50)]
    for text in texts:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size - N_SPECIAL for i in ids)
        assert tok.decode(ids) == text
    assert tok.encode("") == []


def test_special_strings_in_text_stay_text_and_specials_decode(tok):
    n = tok.vocab_size - N_SPECIAL
    for k, s in enumerate(data.SPECIAL_TOKENS):
        assert tok.special_ids[s] == n + k
        ids = tok.encode(f"say {s} now")
        assert all(i < n for i in ids) and tok.decode(ids) == f"say {s} now"
        assert tok.decode([n + k]) == s
    assert (tok.eot_id, tok.pad_id, tok.im_start_id, tok.im_end_id, tok.image_id, tok.global_image_id) == \
        tuple(range(n, n + 6))
    assert tok.row_col_id(1, 1) == n + 6 and tok.row_col_id(4, 4) == n + N_SPECIAL - 1
    assert tok.decode([tok.row_col_id(2, 3)]) == "<row_2_col_3>"
    assert tok.decode([ord("a"), 0xC3]) == "a\ufffd"   # a cut UTF-8 sequence -> replacement char


def test_state_survives_torch_save_weights_only(tok):
    buf = io.BytesIO()
    torch.save({"tokenizer": tok.state()}, buf)
    buf.seek(0)
    loaded = data.Tokenizer.from_state(torch.load(buf, weights_only=True)["tokenizer"])
    assert loaded.ranks == tok.ranks and loaded.vocab_size == tok.vocab_size
    text = "Is there a blue 👋🏽 square? <|im_end|> yes"
    assert loaded.encode(text) == tok.encode(text)
    bad = tok.state() | {"special_tokens": ["<|endoftext|>"]}
    with pytest.raises(ValueError):
        data.Tokenizer.from_state(bad)


def test_gpt2_tokenizer_puts_specials_after_its_vocabulary(monkeypatch):
    # Stand-in for tiktoken's gpt2 (no network in tests): 256 bytes + one merge, eot last.
    ranks = {bytes([b]): b for b in range(256)} | {b"hi": 256}
    fake = tiktoken.Encoding(name="fake", pat_str=data.GPT2_SPLIT_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 257})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: fake)
    tok = data.Tokenizer.gpt2()
    assert tok.eot_id == 257 and tok.vocab_size == 257 + N_SPECIAL and tok.encode("hi") == [256]

    def offline(name):
        raise ConnectionError("no network")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(RuntimeError, match="gpt2"):
        data.Tokenizer.gpt2()


# ----------------------------------------------------------------------------- chat template

CONVERSATION = [{"role": "user", "content": "<image>\nWhat colour is the circle?"},
                {"role": "assistant", "content": "red"},
                {"role": "user", "content": "And its size?"},
                {"role": "assistant", "content": "a small circle"}]


def test_encode_chat_exact_ids_and_labels(tok):
    ids, labels = data.encode_chat(tok, CONVERSATION, image_tokens=4)
    e, S, E = tok.encode, tok.im_start_id, tok.im_end_id
    expected = ([S] + e("user\n") + [tok.image_id] * 4 + e("\nWhat colour is the circle?") + [E] + e("\n")
                + [S] + e("assistant\n") + e("red") + [E] + e("\n")
                + [S] + e("user\n") + e("And its size?") + [E] + e("\n")
                + [S] + e("assistant\n") + e("a small circle") + [E] + e("\n"))
    assert ids == expected
    assert tok.decode(ids) == ("<|im_start|>user\n" + "<|image|>" * 4 + "\nWhat colour is the circle?<|im_end|>\n"
                               "<|im_start|>assistant\nred<|im_end|>\n<|im_start|>user\nAnd its size?<|im_end|>\n"
                               "<|im_start|>assistant\na small circle<|im_end|>\n")
    # Labelled positions carry their own id; the labelled runs decode to the answers + <|im_end|>.
    assert len(labels) == len(ids)
    assert all(l == i for l, i in zip(labels, ids) if l != data.IGNORE_INDEX)
    runs, run = [], []
    for l in labels + [data.IGNORE_INDEX]:
        if l != data.IGNORE_INDEX:
            run.append(l)
        elif run:
            runs, run = runs + [run], []
    assert [tok.decode(r) for r in runs] == ["red<|im_end|>", "a small circle<|im_end|>"]
    # The image block: 4 slots right after "<|im_start|>user\n".
    start = 1 + len(e("user\n"))
    assert [k for k, i in enumerate(ids) if i == tok.image_id] == list(range(start, start + 4))


def test_encode_chat_system_several_images_and_errors(tok):
    msgs = [{"role": "user", "content": "<image> left, <image> right. <|im_end|>"},
            {"role": "assistant", "content": "ok"}]
    ids, labels = data.encode_chat(tok, msgs, image_tokens=[2, 5], system="Be brief.")
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
                           "<|image|><|image|> left, " + "<|image|>" * 5 + " right. <|im_end|><|im_end|>\n")
    assert ids.count(tok.image_id) == 7 and ids.count(tok.im_end_id) == 3   # typed "<|im_end|>" stays text
    assert [tok.decode([i for i, l in zip(ids, labels) if l != data.IGNORE_INDEX])] == ["ok<|im_end|>"]
    with pytest.raises(ValueError):
        data.encode_chat(tok, msgs, image_tokens=[2])        # 2 markers, 1 size
    with pytest.raises(ValueError):
        data.encode_chat(tok, CONVERSATION[2:], image_tokens=[3])   # no marker, 1 size
    with pytest.raises(ValueError):
        data.encode_chat(tok, CONVERSATION[1:], image_tokens=0)    # starts with the assistant


def test_encode_prompt_is_the_prefix_of_the_chat(tok):
    prompt = data.encode_prompt(tok, CONVERSATION[:3], image_tokens=4)
    full, labels = data.encode_chat(tok, CONVERSATION, image_tokens=4)
    assert tok.decode(prompt).endswith("And its size?<|im_end|>\n<|im_start|>assistant\n")
    assert full[:len(prompt)] == prompt
    assert labels[len(prompt) - 1] == data.IGNORE_INDEX and labels[len(prompt)] == full[len(prompt)]
    with pytest.raises(ValueError):
        data.encode_prompt(tok, CONVERSATION[:2], image_tokens=4)


# ----------------------------------------------------------------------------- images


def palette_image(mode, colour, alpha=None, size=(4, 4)):
    img = Image.new("P", size, 0)
    img.putpalette(list(colour) + [0, 0, 0] * 255)
    if alpha is not None:
        img.info["transparency"] = 0
    return img if mode == "P" else img.convert("PA")


def wide_image(mode, values):
    values = np.array([values])
    return Image.frombytes(mode, (values.shape[1], 1), values.astype({"I;16": "<u2", "I;16B": ">u2",
                                                                      "I;16L": "<u2", "I": "<i4",
                                                                      "F": "<f4"}[mode]).tobytes())


RED, WHITE = (255, 0, 0), (255, 255, 255)
MODE_CASES = [  # (image, expected RGB of every pixel, tolerance)
    (Image.new("1", (4, 4), 1), [WHITE], 0),
    (Image.new("1", (4, 4), 0), [(0, 0, 0)], 0),
    (Image.new("L", (4, 4), 100), [(100, 100, 100)], 0),
    (palette_image("P", RED), [RED], 0),
    (palette_image("P", RED, alpha=0), [WHITE], 0),
    (Image.new("RGB", (4, 4), (10, 200, 30)), [(10, 200, 30)], 0),
    (Image.new("RGBA", (4, 4), (255, 0, 0, 0)), [WHITE], 0),
    (Image.new("RGBA", (4, 4), (255, 0, 0, 255)), [RED], 0),
    (Image.new("RGBA", (4, 4), (0, 0, 255, 128)), [(127, 127, 255)], 1),
    (Image.new("LA", (4, 4), (0, 0)), [WHITE], 0),
    (Image.new("LA", (4, 4), (0, 255)), [(0, 0, 0)], 0),
    (palette_image("PA", RED), [RED], 0),
    (palette_image("PA", RED, alpha=0), [WHITE], 0),
    (Image.new("La", (4, 4), (0, 0)), [WHITE], 0),
    (Image.new("RGBa", (4, 4), (0, 0, 0, 0)), [WHITE], 0),
    (Image.new("RGBa", (4, 4), (128, 0, 0, 128)), [(255, 127, 127)], 1),
    (Image.new("CMYK", (4, 4), (0, 255, 255, 0)), [RED], 0),
    (Image.new("RGB", (4, 4), RED).convert("YCbCr"), [RED], 2),
    (Image.new("RGB", (4, 4), RED).convert("LAB"), [RED], 6),
    (Image.new("HSV", (4, 4), (0, 255, 255)), [RED], 0),
    (wide_image("I;16", [0, 32768, 65535]), [(0,) * 3, (128,) * 3, WHITE], 0),
    (wide_image("I;16B", [0, 32768, 65535]), [(0,) * 3, (128,) * 3, WHITE], 0),
    (wide_image("I;16L", [65535, 257]), [WHITE, (1, 1, 1)], 0),
    (wide_image("I", [-1000, 0, 1000]), [(0,) * 3, (128,) * 3, WHITE], 0),
    (wide_image("I", [70000, 70000]), [(128,) * 3] * 2, 0),        # constant: neutral grey
    (wide_image("F", [-1.0, 0.0, 1.0]), [(0,) * 3, (128,) * 3, WHITE], 0),
    (wide_image("F", [0.0, float("nan"), float("inf"), 2.0]), [(0,) * 3, (0,) * 3, WHITE, WHITE], 0),
]


@pytest.mark.parametrize("img, colours, tol", MODE_CASES, ids=[c[0].mode for c in MODE_CASES])
def test_every_mode_becomes_the_right_rgb(img, colours, tol):
    rgb = data.to_rgb(img)
    assert rgb.mode == "RGB" and rgb.size == img.size
    pixels = np.asarray(rgb).reshape(-1, 3).astype(int)
    expected = np.array(colours * (len(pixels) // len(colours)))
    assert np.abs(pixels - expected).max() <= tol
    x = data.preprocess(img, 8)
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    if len(colours) == 1:   # a flat image stays flat through the resize: check the normalised value
        assert torch.allclose(x, (torch.tensor(colours[0]) / 255 - 0.5).div(0.5).view(3, 1, 1).expand(3, 8, 8),
                              atol=2 * tol / 255 + 1e-6)


@pytest.mark.parametrize("size", [(1, 1), (20000, 1), (1, 20000), (3000, 2000)])
def test_extreme_sizes(size):
    x = data.preprocess(Image.new("RGB", size, (0, 0, 255)), 16)
    assert x.shape == (3, 16, 16)
    assert torch.allclose(x, torch.tensor([-1.0, -1.0, 1.0]).view(3, 1, 1).expand(3, 16, 16), atol=1e-6)


def test_preprocess_squashes_instead_of_cropping():
    img = Image.new("RGB", (40, 10), WHITE)
    img.paste(RED, (0, 0, 10, 10))                      # left quarter red: a centre crop would lose it
    x = data.preprocess(img, 16)
    assert torch.allclose(x[:, :, :3], torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 16, 3), atol=0.02)
    assert torch.allclose(x[:, :, 5:], torch.ones(3, 16, 11), atol=0.02)


def test_preprocess_to_pil_round_trip():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8), "RGB")
    x = data.preprocess(img, 12)
    assert np.array_equal(np.asarray(data.to_pil(x)), np.asarray(img))
    x = torch.rand(3, 12, 12) * 2 - 1
    back = data.preprocess(data.to_pil(x), 12)
    assert ((back - x) * 0.5).abs().max() <= 0.5 / 255 + 1e-6   # pixel units: rounding to 1/255
    assert np.asarray(data.to_pil(torch.full((3, 2, 2), 5.0))).min() == 255   # clamped


def assert_refused(path, *words):
    with pytest.raises(data.ImageError) as err:
        data.load_image(path)
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    assert any(w in message for w in words), message


def test_load_image_refusals(tmp_path, monkeypatch):
    assert_refused(tmp_path / "missing.png", "no such file")
    assert_refused(tmp_path, "directory")
    (tmp_path / "empty.png").write_bytes(b"")
    assert_refused(tmp_path / "empty.png", "empty")
    (tmp_path / "notes.png").write_text("not an image\nat all\n")
    assert_refused(tmp_path / "notes.png", "not an image")
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    for fmt in ("png", "jpeg"):
        buf = io.BytesIO()
        noise.save(buf, fmt)
        (tmp_path / f"cut.{fmt}").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
        assert_refused(tmp_path / f"cut.{fmt}", "truncated")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    Image.new("RGB", (12, 12)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)       # 144 pixels: over, under 2x
    assert_refused(tmp_path / "big.png", "12x12 pixels is over")            # our check
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)        # 144 > 2x: Pillow raises itself
    assert_refused(tmp_path / "big.png", "decompression-bomb")


def test_image_from_bytes_refuses_and_accepts_what_load_image_does(tmp_path):
    """An upload held in memory goes through the same checks and conversion as a file."""
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (6, 9, 4), dtype=np.uint8), "RGBA")
    rgba.save(tmp_path / "a.png")
    raw = (tmp_path / "a.png").read_bytes()
    assert np.array_equal(np.asarray(data.image_from_bytes(raw, "upload")), np.asarray(data.load_image(tmp_path / "a.png")))
    for bad, reason in [(b"", "empty"), (b"not an image", "not an image"), (raw[:len(raw) // 2], "truncated")]:
        with pytest.raises(data.ImageError, match=f"^upload: .*{reason}"):
            data.image_from_bytes(bad, "upload")


def test_load_image_accepts_modes_and_takes_first_frame(tmp_path):
    palette_image("P", RED, alpha=0).save(tmp_path / "clear.png")
    assert data.load_image(tmp_path / "clear.png").getpixel((0, 0)) == WHITE
    wide_image("I;16", [0, 65535]).save(tmp_path / "deep.png")
    assert np.asarray(data.load_image(tmp_path / "deep.png")).tolist() == [[[0, 0, 0], list(WHITE)]]
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    frames[0].save(tmp_path / "anim.webp", save_all=True, append_images=frames[1:], duration=100, lossless=True)
    for name in ("anim.gif", "anim.webp"):
        img = data.load_image(tmp_path / name)
        assert img.mode == "RGB" and img.getpixel((4, 4)) == RED


# ----------------------------------------------------------------------------- any-res tiling

GRIDS = [(1, 1), (1, 2), (2, 1), (2, 2)]


@pytest.mark.parametrize("size, grids, best", [
    # (width, height) of the image; tile 64. Effective pixels = the image fitted into the canvas
    # with its aspect kept, capped at its own count; ties go to the smaller canvas.
    ((128, 128), GRIDS, (2, 2)),       # 2x2: 128x128 fits whole = 16384; 1x2 (128x64): scale 0.5 -> 64x64 = 4096
    ((128, 64), GRIDS, (1, 2)),        # 1x2 and 2x2 both hold all 8192 pixels; 1x2 wastes 0, 2x2 wastes 8192
    ((64, 200), GRIDS, (2, 1)),        # 2x1 (64x128): scale 0.64 -> 40x128 = 5120; 1x2: scale 0.32 -> 20x64 = 1280;
                                       # 2x2 also 5120 but wastes 11264 more
    ((30, 30), GRIDS, (1, 1)),         # 900 pixels fit every canvas: the smallest wastes least
    ((300, 100), [(1, 2), (1, 3), (2, 2)], (1, 3)),  # 1x3 (192x64): scale 0.64 -> 192x64 = 12288;
                                       # 1x2 and 2x2: scale 0.4267 -> 128x42 = 5376
])
def test_select_best_resolution_by_hand(size, grids, best):
    assert data.select_best_resolution(size, grids, 64) == best


def quadrants(colours, width, height):
    """An image cut in 2x2 quadrants of solid colours, row-major."""
    img = Image.new("RGB", (width, height))
    for k, colour in enumerate(colours):
        r, c = divmod(k, 2)
        img.paste(colour, (c * width // 2, r * height // 2, (c + 1) * width // 2, (r + 1) * height // 2))
    return img


def solid(colour, size):
    return (torch.tensor(colour, dtype=torch.float) / 255 - 0.5).div(0.5).view(3, 1, 1).expand(3, size, size)


def test_tile_views_global_first_then_tiles_row_major():
    colours = [(255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 0)]  # top left, top right, bottom left, bottom right
    img = quadrants(colours, 96, 64)                                   # any size: squashed onto the 2x2 canvas
    views = data.tile_views(img, 16, (2, 2))
    assert views.shape == (5, 3, 16, 16)
    assert torch.equal(views[0], data.preprocess(img, 16))             # the global view: the whole image
    for k, colour in enumerate(colours):  # 4 pixels in from the cut: beyond where bicubic blends quadrants
        torch.testing.assert_close(views[1 + k][:, 4:12, 4:12], solid(colour, 8), atol=1e-6, rtol=0)
    img = quadrants(colours, 64, 32)
    wide, canvas = data.tile_views(img, 16, (1, 2)), data.preprocess(img, 32, 16)  # canvas (3, 16, 32)
    assert canvas.shape == (3, 16, 32)
    assert torch.equal(wide[1], canvas[:, :, :16]) and torch.equal(wide[2], canvas[:, :, 16:])


def test_tiled_image_block_layout(tok):
    n, S = 3, tok.image_id
    rc = tok.row_col_id
    assert data.image_block(tok, n) == [S] * 3
    assert data.image_block(tok, n, (2, 3)) == ([tok.global_image_id] + [S] * 3
                                                + [rc(1, 1)] + [S] * 3 + [rc(1, 2)] + [S] * 3 + [rc(1, 3)] + [S] * 3
                                                + [rc(2, 1)] + [S] * 3 + [rc(2, 2)] + [S] * 3 + [rc(2, 3)] + [S] * 3)
    assert tok.decode(data.image_block(tok, 1, (1, 2))) == "<global_image><|image|><row_1_col_1><|image|><row_1_col_2><|image|>"


def test_image_input_with_and_without_tiling(tok):
    img = quadrants([(255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 0)], 128, 64)
    views, block = data.image_input(tok, img, 32, 4)
    assert torch.equal(views, data.preprocess(img, 32)[None]) and block == [tok.image_id] * 4
    views, block = data.image_input(tok, img, 32, 4, grids=GRIDS)     # 128x64 -> one row of two tiles
    assert torch.equal(views, data.tile_views(img, 32, (1, 2))) and block == data.image_block(tok, 4, (1, 2))
    # two images in one conversation: each marker takes its own block, in order
    msgs = [{"role": "user", "content": "<image>\n<image>\nWhich?"}, {"role": "assistant", "content": "the first"}]
    ids, _ = data.encode_chat(tok, msgs, [block, 2])
    assert tok.decode(ids).startswith("<|im_start|>user\n<global_image>" + "<|image|>" * 4 + "<row_1_col_1>"
                                      + "<|image|>" * 4 + "<row_1_col_2>" + "<|image|>" * 4 + "\n<|image|><|image|>\nWhich?")


# ----------------------------------------------------------------------------- collator


def test_collate_right_and_left_padding():
    samples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "images": torch.zeros(2, 3, 4, 4)},
               {"input_ids": [8], "labels": [8], "images": None},
               {"input_ids": [9, 10], "labels": [-100, 10], "images": torch.full((1, 3, 4, 4), 2.0)}]
    right = data.collate(samples, pad_id=99)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 99, 99], [9, 10, 99]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100], [-100, 10, -100]]
    assert right["input_ids"].dtype == right["attention_mask"].dtype == right["labels"].dtype == torch.long
    assert right["images"].shape == (3, 3, 4, 4)
    assert right["images"][:, 0, 0, 0].tolist() == [0.0, 0.0, 2.0]   # batch order
    left = data.collate(samples, pad_id=99, side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [99, 99, 8], [99, 9, 10]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert left["labels"].tolist() == [[-100, 6, 7], [-100, -100, 8], [-100, -100, 10]]


def test_collate_without_labels_or_images_and_errors():
    batch = data.collate([{"input_ids": [1, 2], "images": None}, {"input_ids": [3], "images": None}], pad_id=0)
    assert "labels" not in batch and batch["images"] is None
    assert batch["input_ids"].tolist() == [[1, 2], [3, 0]]
    with pytest.raises(ValueError):
        data.collate([{"input_ids": [1], "labels": [1]}, {"input_ids": [2]}], pad_id=0)
    with pytest.raises(ValueError):
        data.collate([{"input_ids": [1], "labels": [1, 2]}], pad_id=0)
    with pytest.raises(ValueError):
        data.collate([{"input_ids": [1]}], pad_id=0, side="middle")


# ----------------------------------------------------------------------------- your own data (LLaVA JSON)


def turn(speaker, value):
    return {"from": speaker, "value": value}


def qa(question, answer, image=True):
    return [turn("human", f"<image>\n{question}" if image else question), turn("gpt", answer)]


def write_json(path, rows):
    path.write_text(__import__("json").dumps(rows))
    return path


def test_json_and_jsonl_give_the_same_rows_and_paths_resolve(mixed_images, tmp_path):
    """A JSON list and the same rows as JSONL load alike; `image` is one path or a list;
    relative paths resolve under --image_folder (default: the file's own folder), absolute
    ones stay; a row without an id gets its position; turns become chat messages."""
    folder, names = mixed_images
    raw = [{"id": "a", "image": names[0], "conversations": qa("What is it?", "red")},
           {"image": [names[1], str(folder / names[2])],
            "conversations": qa("First?", "one") + [turn("human", "<image>\nSecond?"), turn("gpt", "two")]},
           {"id": 7, "conversations": qa("Text only?", "yes", image=False)}]
    as_json = write_json(tmp_path / "rows.json", raw)
    as_jsonl = tmp_path / "rows.jsonl"
    as_jsonl.write_text("\n".join(__import__("json").dumps(r) for r in raw) + "\n\n")   # blank lines are fine
    rows, skipped = data.load_llava(as_json, folder)
    assert skipped == {} and data.load_llava(as_jsonl, folder) == (rows, {})
    assert [r.id for r in rows] == ["a", 1, 7]
    assert rows[0].images == [folder / names[0]] and rows[1].images == [folder / names[1], folder / names[2]]
    assert rows[2].images == []
    assert rows[1].messages == [{"role": "user", "content": "<image>\nFirst?"}, {"role": "assistant", "content": "one"},
                                {"role": "user", "content": "<image>\nSecond?"}, {"role": "assistant", "content": "two"}]
    # default image folder: the data file's own folder
    beside = write_json(folder / "beside.json", raw[:1])
    assert data.load_llava(beside)[0][0].images == [folder / names[0]]


def test_every_image_format_and_mode_in_a_row_is_usable(mixed_images):
    folder, names = mixed_images
    rows, skipped = data.load_llava(write_json(folder / "all.json", [
        {"id": n, "image": n, "conversations": qa("What is it?", "a picture")} for n in names]))
    assert skipped == {} and [r.id for r in rows] == names
    for row in rows:
        img = data.load_image(row.images[0])
        assert img.mode == "RGB" and img.size == Image.open(row.images[0]).size
    assert data.load_image(folder / "first_frame.gif").getpixel((0, 0)) == (30, 30, 200)   # frame 0, not the black one


def broken_rows(folder, good_image):
    """{id: row} of one row per reason a row is refused, with the reason expected."""
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "png")
    (folder / "cut.png").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
    ok = qa("What is it?", "a shape")
    return [
        ("not_an_object", ["a", "list"], data.MALFORMED),
        ("no_conversations", {"id": "no_conversations", "image": good_image}, data.MALFORMED),
        ("value_not_text", {"id": "value_not_text", "conversations": [turn("human", 3), turn("gpt", "x")]}, data.MALFORMED),
        ("image_not_a_path", {"id": "image_not_a_path", "image": {"a": 1}, "conversations": ok}, data.MALFORMED),
        ("no_turns", {"id": "no_turns", "image": good_image, "conversations": []}, data.EMPTY_TURN),
        ("empty_answer", {"id": "empty_answer", "image": good_image, "conversations": qa("Q?", "  ")}, data.EMPTY_TURN),
        ("gpt_first", {"id": "gpt_first", "image": good_image, "conversations": ok[::-1]}, data.NOT_ALTERNATING),
        ("two_humans", {"id": "two_humans", "image": good_image,
                        "conversations": [ok[0], turn("human", "again?"), ok[1]]}, data.NOT_ALTERNATING),
        ("ends_with_question", {"id": "ends_with_question", "image": good_image,
                                "conversations": ok + [turn("human", "And?")]}, data.NOT_ALTERNATING),
        ("unknown_speaker", {"id": "unknown_speaker", "image": good_image,
                             "conversations": [ok[0], turn("system", "x")]}, data.NOT_ALTERNATING),
        ("no_marker", {"id": "no_marker", "image": good_image, "conversations": qa("Q?", "A", image=False)},
         data.MARKER_COUNT),
        ("two_markers_one_image", {"id": "two_markers_one_image", "image": [good_image],
                                   "conversations": [turn("human", "<image><image>\nQ?"), turn("gpt", "A")]},
         data.MARKER_COUNT),
        ("missing", {"id": "missing", "image": "nowhere.png", "conversations": ok}, data.MISSING_IMAGE),
        ("corrupt", {"id": "corrupt", "image": "corrupt.png", "conversations": ok}, data.UNREADABLE_IMAGE),
        ("truncated", {"id": "truncated", "image": ["cut.png"], "conversations": ok}, data.UNREADABLE_IMAGE),
    ]


def test_every_kind_of_bad_row_is_skipped_and_reported_by_reason(mixed_images):
    """One bad row of every kind between good rows: the good rows load in order, each bad
    one is counted under its own reason (the first check it fails), and one line reports it."""
    folder, names = mixed_images
    bad = broken_rows(folder, names[0])
    good = [{"id": f"good{k}", "image": names[k], "conversations": qa("What is it?", "a shape")} for k in range(3)]
    rows, skipped = data.load_llava(write_json(folder / "mixed.json", good[:1] + [r for _, r, _ in bad] + good[1:]))
    assert [r.id for r in rows] == ["good0", "good1", "good2"]
    expected = collections.defaultdict(list)
    for position, (row_id, _, reason) in enumerate(bad, start=1):
        expected[reason].append(position if row_id == "not_an_object" else row_id)
    assert skipped == dict(expected)
    report = data.report_rows(len(rows), skipped, max_ids=2)
    assert report.startswith(f"3 of {3 + len(bad)} rows usable; skipped {len(bad)}: ")
    assert "\n" not in report
    assert f"{data.MALFORMED} 4 (ids 1, no_conversations, ...)" in report
    assert f"{data.MISSING_IMAGE} 1 (ids missing)" in report
    # a question file may end with the question (open_end): that row is then usable
    open_rows, open_skipped = data.load_llava(folder / "mixed.json", open_end=True)
    assert "ends_with_question" in [r.id for r in open_rows] and "ends_with_question" not in sum(open_skipped.values(), [])


def test_malformed_json_is_one_line_naming_file_line_and_column(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[\n {"id": 1, "conversations": []},\n {"id": 2 "conversations": []}\n]')
    with pytest.raises(data.DataError, match=r"broken\.json: line 3, column 11: invalid JSON \(Expecting ','"):
        data.load_llava(broken)
    lines = tmp_path / "broken.jsonl"
    lines.write_text('{"id": 1, "conversations": []}\n\n{"id": 2, "conversations": [}\n')
    with pytest.raises(data.DataError, match=r"broken\.jsonl: line 3, column 29: invalid JSON"):
        data.load_llava(lines)
    one_object = write_json(tmp_path / "object.json", {"id": 1, "conversations": []})
    with pytest.raises(data.DataError, match="expected a JSON list of rows .* found a JSON dict"):
        data.load_llava(one_object)
    (tmp_path / "latin1.json").write_bytes('[{"id": "caf\xe9"}]'.encode("latin-1"))
    with pytest.raises(data.DataError, match="not UTF-8"):
        data.load_llava(tmp_path / "latin1.json")
    with pytest.raises(data.DataError, match="no such file"):
        data.load_llava(tmp_path / "absent.json")
    assert issubclass(data.ImageError, data.DataError)   # one except clause catches both


def test_llava_row_and_save_round_trip(tmp_path):
    """What the export writes (llava_row + save_llava) reads back as the same messages."""
    messages = [{"role": "user", "content": "<image>\nA?"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "<image> and c?"}, {"role": "assistant", "content": "d"}]
    text_only = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    Image.new("RGB", (4, 4)).save(tmp_path / "x.png")
    for name in ("out.json", "out.jsonl"):
        data.save_llava(tmp_path / name, [data.llava_row("r1", ["x.png", "x.png"], messages),
                                          data.llava_row("r2", [], text_only)])
        rows, skipped = data.load_llava(tmp_path / name)
        assert skipped == {} and [r.id for r in rows] == ["r1", "r2"]
        assert rows[0].messages == messages and rows[0].images == [tmp_path / "x.png"] * 2
        assert rows[1].messages == text_only and rows[1].images == []
    assert "image" not in data.llava_row("r", [], messages) and data.llava_row("r", ["a"], messages)["image"] == "a"


def test_without_images_and_count_images():
    messages = [{"role": "user", "content": "<image>\nA <image> b?"}, {"role": "assistant", "content": "<image>"}]
    assert data.count_images(messages) == 2      # markers in an answer are text, not images
    assert data.without_images(messages) == [{"role": "user", "content": "A  b?"}, messages[1]]
    assert messages[0]["content"] == "<image>\nA <image> b?"   # the input is not changed
