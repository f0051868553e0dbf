import torch

# The test models are tiny: one thread is as fast as two on their matmuls, and on a shared
# 2-core machine two threads per process contend with everything else running (measured: the
# tiny CLIP stage took 2.5 s with one thread and 18 s with two while another job was running).
torch.set_num_threads(1)


import pytest  # noqa: E402
from PIL import Image  # noqa: E402

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
