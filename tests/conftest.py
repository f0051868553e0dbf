import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import data
import train
import user_data
from checkpoint import get_tokenizer, save_checkpoint
from flags import parse_flags, tile_grids
from model import VLM
from tokenizer import SPECIAL_TOKENS, Tokenizer, train_bpe

# The test models are tiny: one thread is as fast as two on their matmuls, and on a shared
# 2-core machine two threads per process contend with everything else running (measured: the
# tiny CLIP stage took 2.5 s with one thread and 18 s with two while another job was running).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    """An instruct.pt written the way train.py writes it, for a tiny config that differs
    from the defaults (so loading must use the checkpoint's config, not Config()). Untrained:
    enough for the plumbing of generate.py and its chat server, not for right answers."""
    out = tmp_path_factory.mktemp("gen")
    cfg = parse_flags(train.Config, ["--config=tiny", "--out_dir", str(out), "--llm_dim=48",
                                     "--llm_ffn_hidden=128"], train.PRESETS)
    tok = get_tokenizer(cfg)
    torch.manual_seed(0)
    model = VLM(train.vlm_config(cfg, tok))
    for p in model.llm.parameters():  # larger weights: varied tokens instead of one repeated id
        p.data.normal_(0, 0.3)
    save_checkpoint(str(out / "instruct.pt"), {"stage": "instruct", "config": vars(cfg).copy(),
                                               "model": model.state_dict(), "tokenizer": tok.state()})
    return out


# A folder of images the way people have them: every common format and mode, odd sizes.
# Each has its own colour, so a test can tell which image went where.
MIXED_IMAGES = {  # name: (mode, size, colour)
    "photo.jpg": ("RGB", (40, 30), (200, 30, 30)),
    "cmyk.jpg": ("CMYK", (33, 33), (0, 255, 255, 0)),
    "alpha.png": ("RGBA", (17, 64), (30, 200, 30, 128)),
    "grey.png": ("L", (64, 64), 90),
    "palette.png": ("P", (5, 80), 3),
    "deep.png": ("I;16", (9, 9), 40000),
    "first_frame.gif": ("RGB", (24, 24), (30, 30, 200)),
    "pic.webp": ("RGB", (100, 50), (200, 200, 30)),
    "tiny.bmp": ("1", (1, 1), 1),
}


@pytest.fixture
def mixed_images(tmp_path):
    """(folder, names) of MIXED_IMAGES written to disk; the GIF is animated (a second frame
    in another colour: only the first one counts)."""
    folder = tmp_path / "images"
    folder.mkdir()
    for name, (mode, size, colour) in MIXED_IMAGES.items():
        img = Image.new(mode, size, colour)
        if name.endswith(".gif"):
            img.save(folder / name, save_all=True, append_images=[Image.new("RGB", size, (0, 0, 0))], duration=50)
        else:
            img.save(folder / name)
    return folder, list(MIXED_IMAGES)



@pytest.fixture(scope="session")
def tok():
    """A small BPE tokenizer trained on a few of the world's sentences."""
    texts = ["What colour is the circle? red", "a large red circle at the top left",
             "Is there a blue square in the image? no"] * 20
    return Tokenizer(train_bpe(texts, 256 + len(SPECIAL_TOKENS) + 60))


def llava(row_id, images, *exchanges):
    """A LLaVA row; each exchange is (question, answer), written as given (put <image> in)."""
    turns = [{"from": s, "value": v} for q, a in exchanges for s, v in (("human", q), ("gpt", a))]
    return {"id": row_id, "image": images, "conversations": turns}


# a few steps of every stage, on batches of 4: enough to run your data through everything
USER_RUN = ["--config=tiny", "--clip_steps=2", "--lm_steps=2", "--align_steps=2", "--instruct_steps=2",
            "--clip_batch_size=4", "--lm_batch_size=4", "--align_batch_size=4", "--instruct_batch_size=4",
            "--holdout=2", "--log_every=1000"]


@pytest.fixture
def user_files(mixed_images, tmp_path):
    """captions.json and instruct.json over the mixed-format image folder, each with good rows
    and a few broken ones (by reason), and a two-image conversation. .load(*flags) reads them
    as train.py does, with a byte-level tokenizer: (cfg, tok, user_data.UserData); .llava
    writes a row; .run_flags: USER_RUN."""
    folder, names = mixed_images
    kinds = [n.split(".")[1] for n in names]
    captions = [llava(f"c{k}", n, ("<image>\nDescribe the image briefly.", f"a {kind} picture number {k}"))
                for k, (n, kind) in enumerate(zip(names, kinds))]
    captions += [llava("c_two_images", names[:2], ("<image><image>\nDescribe them.", "two pictures")),
                 llava("c_too_long", names[0], ("<image>\nDescribe the image.", "very " * 400 + "long")),
                 llava("c_missing", "gone.png", ("<image>\nDescribe the image.", "nothing"))]
    instruct = [llava(f"i{k}", n, ("<image>\nWhat format is this?", kind), ("Is it the first one?", "yes" if k == 0 else "no"))
                for k, (n, kind) in enumerate(zip(names, kinds))]
    instruct += [llava("pair", [names[0], names[3]], ("<image>\nWhat is the first?", kinds[0]),
                       ("<image>\nAnd the second?", kinds[3])),
                 llava("i_no_marker", names[0], ("What format is this?", "jpg")),
                 llava("i_missing", "gone.png", ("<image>\nWhat format is this?", "png"))]
    for name, rows in (("captions.json", captions), ("instruct.json", instruct)):
        (folder / name).write_text(json.dumps(rows, indent=1))
    files = SimpleNamespace(folder=folder, names=names, captions=folder / "captions.json",
                            instruct=folder / "instruct.json", out=tmp_path / "out", llava=llava, run_flags=USER_RUN)

    def load(*flags):
        cfg = parse_flags(train.Config, [*USER_RUN, f"--caption_data={files.captions}", f"--instruct_data={files.instruct}",
                                         f"--out_dir={files.out}", *flags], train.PRESETS)
        tok = Tokenizer({bytes([b]): b for b in range(256)})   # byte-level: no training needed
        image_tokens = data.image_tokens_at_most(tok, VLM(train.vlm_config(cfg, tok)).num_image_tokens, tile_grids(cfg))
        return cfg, tok, user_data.load_user_data(cfg, tok, image_tokens)
    files.load = load
    return files
