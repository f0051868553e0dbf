import pytest
import torch
from PIL import Image

import train
from model import VLM

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
    cfg = train.parse_flags(train.Config, ["--config=tiny", "--out_dir", str(out), "--llm_dim=48",
                                           "--llm_ffn_hidden=128"], train.PRESETS)
    tok = train.get_tokenizer(cfg)
    torch.manual_seed(0)
    model = VLM(train.vlm_config(cfg, tok))
    for p in model.llm.parameters():  # larger weights: varied tokens instead of one repeated id
        p.data.normal_(0, 0.3)
    train.save_checkpoint(str(out / "instruct.pt"), {"stage": "instruct", "config": vars(cfg).copy(),
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
