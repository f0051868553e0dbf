"""Tests for data.py: the chat template against hand-built id sequences, image
modes/sizes/errors against known colours, any-res tiling, and the collator's padding.
Run: python -m pytest -q tests/test_data.py"""
import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402


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


def test_without_images_and_count_images():
    messages = [{"role": "user", "content": "<image>\nA <image> b?"}, {"role": "assistant", "content": "<image>"}]
    assert data.count_images(messages) == 2      # markers in an answer are text, not images
    assert data.without_images(messages) == [{"role": "user", "content": "A  b?"}, messages[1]]
    assert messages[0]["content"] == "<image>\nA <image> b?"   # the input is not changed
