"""
The shapes world: tinyvlm's built-in data set, procedural, deterministic and endless.

A scene is a few coloured shapes on a white canvas, placed in a 3x3 grid. Because the
scene is *symbolic* (a list of objects with exact pixel boxes) before it is an image,
every caption, question, answer and conversation can be written from it with certainty.
That is how LLaVA built its instruction data ("Visual Instruction Tuning", Liu et al.
2023, arXiv:2304.08485, section 3): GPT-4 never saw the images, only their captions and
object boxes, and wrote conversations, detailed descriptions and reasoning from them.
Here the symbolic scene plays the part of captions + boxes, and templates play GPT-4.

The colour x shape frequencies are deliberately skewed so that hallucination can be
measured the way POPE measures it ("Evaluating Object Hallucination in Large
Vision-Language Models", Li et al. 2023, arXiv:2305.10355): a model that answers "yes"
to a frequent pair it did not see is hallucinating from the prior, not from the pixels.

Scene `index` of split `split` is a pure function of (WorldConfig.seed, split, index):
nothing is stored on disk, and train / val / test never contain the same scene (see
make_scene for how that is guaranteed, not merely likely).

    python -c "import shapes; print(shapes.describe(shapes.make_scene('train', 0, shapes.WorldConfig())))"
    python -m pytest -q tests/test_shapes.py

Boxes are (x0, y0, x1, y1) in pixels with exclusive ends, like Python slices:
the object covers columns x0..x1-1 and rows y0..y1-1.
"""

import hashlib
import math
import random
import re
from dataclasses import dataclass, replace

from PIL import Image, ImageDraw

# -----------------------------------------------------------------------------
# the world's vocabulary

# Five silhouettes picked to stay distinct when small (about 10 px wide at 64 x 64):
# filled round, filled square, pointed, thin-armed, and hollow. A diamond is a square
# turned 45 degrees and a star or heart blurs into a blob at 10 px, so they are left out.
SHAPES = ("circle", "square", "triangle", "cross", "ring")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles",
           "cross": "crosses", "ring": "rings"}
# saturated and far apart in RGB (every pair > 90 apart), so a colour is never a guess
COLOURS = {
    "red": (215, 25, 25),
    "green": (20, 160, 40),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 0),
    "purple": (135, 40, 190),
    "orange": (250, 115, 0),
}
BACKGROUND = (255, 255, 255)
SIZES = ("small", "large")
SIZE_FRACTIONS = {"small": (0.45, 0.55), "large": (0.75, 0.85)}  # side / grid-cell side
REGIONS = ("top left", "top", "top right", "left", "centre", "right",
           "bottom left", "bottom", "bottom right")              # 3x3 grid, row-major
REGION_PHRASES = ("at the top left", "at the top", "at the top right", "on the left",
                  "in the centre", "on the right", "at the bottom left", "at the bottom",
                  "at the bottom right")
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

QUESTION_TYPES = ("colour", "shape", "size", "count", "position", "existence",
                  "relation", "grounding")
POPE_KINDS = ("random", "popular", "adversarial")
POPULAR_TOP_K = 6  # POPE 'popular' negatives: the K most frequent pairs absent from the scene

# The skewed prior. Colours are equally likely; within a colour the shapes follow a Zipf
# law over the order below (1, 1/2^s, 1/3^s, ...). The orders form a Latin square for the
# first five colours, so every shape is the favourite of some colour and the shapes stay
# balanced overall. The tests pin the commonest pair at >= 5x the rarest, and the rarest
# at >= 1% of all objects: rare enough to tempt a model, common enough to learn.
ZIPF_EXPONENT = 1.2
SHAPE_ORDER = {
    "red": ("circle", "square", "triangle", "cross", "ring"),
    "green": ("triangle", "cross", "ring", "circle", "square"),
    "blue": ("ring", "circle", "square", "triangle", "cross"),
    "yellow": ("square", "triangle", "cross", "ring", "circle"),
    "purple": ("cross", "ring", "circle", "square", "triangle"),
    "orange": ("triangle", "circle", "cross", "square", "ring"),
}
ALL_PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES)

SPLITS = ("train", "val", "test")
SPLIT_OF_BUCKET = ("train",) * 8 + ("val", "test")  # a scene's content hash mod 10 -> split
MAX_ATTEMPTS = 10_000   # redraws before giving up (needs ~1.25 for train, ~10 for val/test)
SUPERSAMPLE = 4         # draw at 4x and average 4x4 blocks down: anti-aliasing by area
RING_WIDTH = 0.25       # ring thickness / side: the hole is half the diameter
CROSS_ARM = 1 / 3       # cross arm thickness / side


@dataclass
class WorldConfig:
    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 3
    held_out_pairs: tuple = ()  # (colour, shape) pairs never drawn in "train" (compositional test)
    seed: int = 0               # scene (split, index) is a pure function of this
    object_scale: float = 1.0   # < 1: shapes this much smaller than usual for their grid cell
                                # (a high-resolution world of small objects, for any-res tiling)

    def __post_init__(self):
        if not isinstance(self.image_size, int) or self.image_size < 32:
            raise ValueError(f"image_size must be an int >= 32, got {self.image_size!r}")
        if not 1 <= self.min_objects <= self.max_objects <= len(REGIONS):
            raise ValueError(f"need 1 <= min_objects <= max_objects <= {len(REGIONS)} (one object "
                             f"per grid cell), got {self.min_objects}, {self.max_objects}")
        self.held_out_pairs = tuple(tuple(p) for p in self.held_out_pairs)
        for p in self.held_out_pairs:
            if len(p) != 2 or p[0] not in COLOURS or p[1] not in SHAPES:
                raise ValueError(f"held_out_pairs: {p!r} is not a (colour, shape) pair; "
                                 f"colours {list(COLOURS)}, shapes {list(SHAPES)}")
        if len(set(self.held_out_pairs)) == len(ALL_PAIRS):
            raise ValueError("held_out_pairs holds out every pair: train would have no objects")
        if not 0 < self.object_scale <= 1:
            raise ValueError(f"object_scale must be in (0, 1], got {self.object_scale!r}")


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    region: int                      # index into REGIONS
    box: tuple[int, int, int, int]   # exact pixel box of the rendered shape, x1/y1 exclusive


@dataclass
class Scene:
    objects: list[Obj]               # at most one per region, in region (reading) order
    image_size: int

# -----------------------------------------------------------------------------
# drawing scenes


def frequency(colour, shape):
    """The world's prior weight of a (colour, shape) pair; all 30 weights sum to 1."""
    zipf = [1 / (rank + 1) ** ZIPF_EXPONENT for rank in range(len(SHAPES))]
    return zipf[SHAPE_ORDER[colour].index(shape)] / sum(zipf) / len(COLOURS)


def _stable_int(*parts):
    # Python's hash() of a str is salted per process; sha256 gives every machine the same seed
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big")


def scene_signature(scene):
    """A canonical string of everything render() draws: equal signatures, equal images."""
    objs = sorted(scene.objects, key=lambda o: o.region)
    return f"{scene.image_size}|" + ";".join(
        f"{o.size} {o.colour} {o.shape} {o.region} {o.box}" for o in objs)


def _place(rng, image_size, region, colour, shape, scale=1.0):
    """One object inside its grid cell: a random size and a jittered position."""
    row, col = divmod(region, 3)
    edges = [i * image_size // 3 for i in range(4)]  # 64 -> 0, 21, 42, 64
    cell = image_size // 3                           # the narrowest cell
    size = rng.choice(SIZES)
    side = max(2, round(rng.uniform(*SIZE_FRACTIONS[size]) * cell * scale))
    side = min(side, cell - 2)  # keep a 1 px margin inside the cell: neighbours never touch
    x0 = rng.randint(edges[col] + 1, edges[col + 1] - 1 - side)
    y0 = rng.randint(edges[row] + 1, edges[row + 1] - 1 - side)
    return Obj(shape, colour, size, region, (x0, y0, x0 + side, y0 + side))


def make_scene(split, index, cfg, n_objects=None):
    """Scene `index` of `split`: a pure function of (cfg, split, index, n_objects).

    Seeding from (seed, split, index) alone would make the splits *different* draws, but in
    a small world two draws can still coincide (two one-object scenes with the same pair,
    size and position). So the split is also decided by the content: a scene is kept only
    if the hash of its signature falls in its split's bucket (0-7 train, 8 val, 9 test),
    else it is redrawn with the next sub-seed. The same content always hashes to the same
    bucket, so no scene can ever occur in two splits, whatever the seed or the index.
    A val or test scene costs about ten draws, a train scene about 1.25; all are cheap.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n_objects is not None and not 1 <= n_objects <= len(REGIONS):
        raise ValueError(f"n_objects must be in 1..{len(REGIONS)}, got {n_objects}")
    held_out = set(cfg.held_out_pairs) if split == "train" else set()
    pairs = [p for p in ALL_PAIRS if p not in held_out]
    weights = [frequency(*p) for p in pairs]
    for attempt in range(MAX_ATTEMPTS):
        rng = random.Random(_stable_int(cfg.seed, split, index, attempt))
        n = n_objects or rng.randint(cfg.min_objects, cfg.max_objects)
        regions = sorted(rng.sample(range(len(REGIONS)), n))  # one object per cell: no overlap
        objects = [_place(rng, cfg.image_size, r, *rng.choices(pairs, weights)[0], cfg.object_scale) for r in regions]
        scene = Scene(objects, cfg.image_size)
        if SPLIT_OF_BUCKET[_stable_int(scene_signature(scene)) % 10] == split:
            return scene
    raise RuntimeError(f"no {split} scene found for index {index} in {MAX_ATTEMPTS} draws")


def hard_negative(scene, rng, split="train", held_out=()):
    """The same scene with one object's shape changed: a hard negative for contrastive
    learning. Captioned with the same RNG state, its caption differs from the original's
    in one word, so telling the two apart takes seeing the shape ("When and why
    vision-language models behave like bags-of-words", Yuksekgonul et al. 2022,
    arXiv:2210.01936, NegCLIP). Kept in `split` like make_scene; None if no twin is."""
    for _ in range(20):
        k = rng.randrange(len(scene.objects))
        obj = scene.objects[k]
        shape = rng.choice([s for s in SHAPES if s != obj.shape])
        if (obj.colour, shape) in held_out:
            continue
        objects = list(scene.objects)
        objects[k] = replace(obj, shape=shape)  # every shape fills the same box
        twin = Scene(objects, scene.image_size)
        if SPLIT_OF_BUCKET[_stable_int(scene_signature(twin)) % 10] == split:
            return twin
    return None


def _draw_shape(draw, obj, scale):
    # ImageDraw boxes include their last pixel, so the shape spans exactly the fine pixels
    # scale*x0 .. scale*x1-1. After averaging scale x scale blocks the first and last rows
    # and columns of obj.box hold some ink and no pixel outside it does: obj.box is exact.
    x0, y0, x1, y1 = (v * scale for v in obj.box)
    x1, y1 = x1 - 1, y1 - 1
    w, h = x1 - x0 + 1, y1 - y0 + 1
    fill = COLOURS[obj.colour]
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "triangle":  # apex up, as tall as it is wide
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
    elif obj.shape == "ring":
        draw.ellipse((x0, y0, x1, y1), outline=fill, width=round(min(w, h) * RING_WIDTH))
    elif obj.shape == "cross":     # a plus sign; equal margins keep the arms centred
        mx, my = round(w * (1 - CROSS_ARM) / 2), round(h * (1 - CROSS_ARM) / 2)
        draw.rectangle((x0, y0 + my, x1, y1 - my), fill=fill)
        draw.rectangle((x0 + mx, y0, x1 - mx, y1), fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def render(scene):
    """The scene as an RGB PIL image, image_size x image_size, anti-aliased."""
    n, s = scene.image_size, SUPERSAMPLE
    big = Image.new("RGB", (n * s, n * s), BACKGROUND)
    draw = ImageDraw.Draw(big)
    for obj in scene.objects:
        _draw_shape(draw, obj, s)
    # BOX averages each s x s block: a pixel's colour is the area-weighted mix of what
    # covers it, so edges blend into white and fully covered pixels keep the exact colour
    return big.resize((n, n), Image.Resampling.BOX)


def box_to_text(box, image_size):
    """(x0, y0, x1, y1) pixels -> "<box>(x0,y0),(x1,y1)</box>" in integer percent 0..100.
    Percent, not pixels, so the same answer holds at any resolution the model sees."""
    pct = [math.floor(100 * v / image_size + 0.5) for v in box]  # round half up, no banker's rounding
    return "<box>({},{}),({},{})</box>".format(*pct)


_BOX_RE = re.compile(r"<box>\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*,?\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*</box>")


def text_to_box(text, image_size):
    """The first box in `text` as pixels, or None if there is none or it is not a box
    (a value over 100, or x1 < x0, or y1 < y0)."""
    m = _BOX_RE.search(text)
    if m is None:
        return None
    x0, y0, x1, y1 = (int(g) for g in m.groups())
    if max(x0, y0, x1, y1) > 100 or x1 < x0 or y1 < y0:
        return None
    return tuple(math.floor(p * image_size / 100 + 0.5) for p in (x0, y0, x1, y1))

# -----------------------------------------------------------------------------
# words: captions and descriptions


def _a(phrase):
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(phrases):
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _noun_phrase(obj, attrs, definite=True):
    """Name obj by the attributes in attrs: ("size", "colour", "shape", "region")."""
    words = [getattr(obj, a) for a in ("size", "colour") if a in attrs]
    words.append(obj.shape if "shape" in attrs else "object")
    phrase = "the " + " ".join(words) if definite else _a(" ".join(words))
    return phrase + " " + REGION_PHRASES[obj.region] if "region" in attrs else phrase


def caption(scene, rng, drop_prob=0.0, keep_colour=False):
    """A short caption in one of several paraphrases. With drop_prob > 0, each size,
    colour and position is left out independently (the colour never, with keep_colour);
    the shape noun always stays. CLIP (clip.py) learns what tells its captions apart: a
    caption that always names colour and shape makes it learn both (docs/experiments.md)."""
    phrases = []
    for obj in rng.sample(scene.objects, len(scene.objects)):
        attrs = [a for a in ("size", "colour", "shape", "region")
                 if a == "shape" or rng.random() >= drop_prob or (a == "colour" and keep_colour)]
        phrases.append(_noun_phrase(obj, attrs, definite=False))
    template = rng.choice(("{}", "there is {}", "the image shows {}", "a picture of {}",
                           "an image with {}", "{} on a white background"))
    return template.format(_join(phrases))


def describe(scene):
    """A detailed description: the count, then every object with all its attributes."""
    n = len(scene.objects)
    sentences = ["There is one shape." if n == 1 else f"There are {NUMBER_WORDS[n]} shapes."]
    for obj in sorted(scene.objects, key=lambda o: o.region):
        phrase = _noun_phrase(obj, ("size", "colour", "shape"), definite=False)
        sentences.append(f"{phrase[0].upper()}{phrase[1:]} is {REGION_PHRASES[obj.region]}.")
    return " ".join(sentences)

# -----------------------------------------------------------------------------
# questions with short answers, one generator per type

# Ways to single out one object, shortest first. A question may not name the attribute it
# asks about ("What colour is the red circle?" gives the answer away), so it is excluded.
REFERENCES = (("shape",), ("colour", "shape"), ("size", "shape"), ("size", "colour", "shape"),
              ("colour",), ("size", "colour"), ("region",))


def _refer(scene, obj, exclude=()):
    """The shortest unambiguous name of obj without the excluded attributes, or None."""
    for attrs in REFERENCES:
        if any(a in exclude for a in attrs):
            continue
        same = [o for o in scene.objects if all(getattr(o, a) == getattr(obj, a) for a in attrs)]
        if len(same) == 1:
            return _noun_phrase(obj, attrs)
    return None  # e.g. two small red circles and the question is about position


def _pick(scene, rng, exclude):
    """A random object that can be named without `exclude`, and its name; or (None, None)."""
    for obj in rng.sample(scene.objects, len(scene.objects)):
        ref = _refer(scene, obj, exclude)
        if ref is not None:
            return obj, ref
    return None, None


def _ask_attribute(scene, rng, attr, templates, answer):
    obj, ref = _pick(scene, rng, exclude=(attr,))
    return None if obj is None else (rng.choice(templates).format(ref), answer(obj))


def _ask_colour(scene, rng):
    return _ask_attribute(scene, rng, "colour", ("What colour is {}?", "What is the colour of {}?",
                                                 "Which colour is {}?"), lambda o: o.colour)


def _ask_shape(scene, rng):
    return _ask_attribute(scene, rng, "shape", ("What shape is {}?", "What is the shape of {}?",
                                                "Which shape is {}?"), lambda o: o.shape)


def _ask_size(scene, rng):
    return _ask_attribute(scene, rng, "size", ("Is {} small or large?", "Is {} large or small?",
                                               "What size is {}, small or large?"), lambda o: o.size)


def _ask_position(scene, rng):
    return _ask_attribute(scene, rng, "region", ("Where is {}?", "In which part of the image is {}?",
                                                 "Which region of the image is {} in?"),
                          lambda o: REGIONS[o.region])


def _ask_grounding(scene, rng):
    # the region is excluded here too, or the name would give away half of the box
    return _ask_attribute(scene, rng, "region", ("Give the box of {}.", "Locate {} with a box.",
                                                 "Output the bounding box of {}."),
                          lambda o: box_to_text(o.box, scene.image_size))


def _ask_count(scene, rng):
    form = rng.choice(("all", "colour", "shape"))
    if form == "all":
        n = len(scene.objects)
        return rng.choice(("How many shapes are there?", "How many objects are in the image?",
                           "Count the shapes.")), str(n)
    # half the time a value from the scene, half any value, so that "0" is a real answer
    values = [getattr(o, form) for o in scene.objects]
    everything = list(COLOURS) if form == "colour" else SHAPES
    value = rng.choice(values) if rng.random() < 0.5 else rng.choice(everything)
    noun = f"{value} shapes" if form == "colour" else PLURALS[value]
    question = rng.choice(("How many {} are there?", "How many {} are in the image?", "Count the {}."))
    return question.format(noun), str(values.count(value))


def _probe_pair(scene, kind, rng, answer_yes):
    """A (colour, shape) pair to ask about: present if answer_yes, else a POPE negative."""
    present = sorted({(o.colour, o.shape) for o in scene.objects})
    if answer_yes:
        return rng.choice(present)
    absent = [p for p in ALL_PAIRS if p not in present]
    if kind == "random":
        candidates = absent
    elif kind == "popular":  # sorted() is stable: ties keep COLOURS x SHAPES order
        candidates = sorted(absent, key=lambda p: -frequency(*p))[:POPULAR_TOP_K]
    elif kind == "adversarial":  # one attribute shared with a present object, the other not
        candidates = [p for p in absent if any((p[0] == c) != (p[1] == s) for c, s in present)]
    else:
        raise ValueError(f"kind must be one of {POPE_KINDS}, got {kind!r}")
    return rng.choice(candidates)


def _ask_existence(scene, rng):
    # training negatives are uniform ('random'), so POPE's popular and adversarial sets
    # stay a test of what the model learned, not of what it was drilled on
    colour, shape = _probe_pair(scene, "random", rng, answer_yes=rng.random() < 0.5)
    question = rng.choice(("Is there {} in the image?", "Does the image contain {}?", "Can you see {}?"))
    present = any((o.colour, o.shape) == (colour, shape) for o in scene.objects)
    return question.format(_a(f"{colour} {shape}")), "yes" if present else "no"


def _ask_relation(scene, rng):
    pairs = [(a, b) for a in scene.objects for b in scene.objects if a is not b]
    for a, b in rng.sample(pairs, len(pairs)):
        # named without their regions, which would give the answer away
        ref_a, ref_b = _refer(scene, a, ("region",)), _refer(scene, b, ("region",))
        if ref_a is None or ref_b is None:
            continue
        (row_a, col_a), (row_b, col_b) = divmod(a.region, 3), divmod(b.region, 3)
        axes = [axis for axis, differ in (("x", col_a != col_b), ("y", row_a != row_b)) if differ]
        if rng.choice(axes) == "x":  # cells do not overlap, so grid order is pixel order
            templates, answer = ("Is {} left or right of {}?", "Is {} to the left or to the right of {}?"), \
                "left" if col_a < col_b else "right"
        else:
            templates, answer = ("Is {} above or below {}?", "Is {} located above or below {}?"), \
                "above" if row_a < row_b else "below"
        # the answer first says where each object is, then compares: two position lookups
        # the model already makes, and a comparison of two region words it has just written
        steps = f"{ref_a} is {REGIONS[a.region]}, {ref_b} is {REGIONS[b.region]}, so {answer}"
        return rng.choice(templates).format(ref_a, ref_b), steps
    return None


ASKERS = {"colour": _ask_colour, "shape": _ask_shape, "size": _ask_size, "count": _ask_count,
          "position": _ask_position, "existence": _ask_existence, "relation": _ask_relation,
          "grounding": _ask_grounding}


def questions(scene, rng):
    """[(type, question, answer)]: one per QUESTION_TYPES entry the scene can support
    without ambiguity. Answers are short, lowercase, with no final full stop."""
    out = []
    for qtype in QUESTION_TYPES:
        qa = ASKERS[qtype](scene, rng)
        if qa is not None:
            out.append((qtype, *qa))
    return out


def pope_question(scene, kind, rng, answer_yes):
    """A POPE probe: ("Is there a {colour} {shape} in the image?", "yes" / "no")."""
    colour, shape = _probe_pair(scene, kind, rng, answer_yes)
    return f"Is there {_a(f'{colour} {shape}')} in the image?", "yes" if answer_yes else "no"

# -----------------------------------------------------------------------------
# conversations: LLaVA's three response types, written from the symbolic scene


def _reason_same_colour(scene, rng):
    if len(scene.objects) < 2:
        return None
    question = rng.choice(("Are all the shapes the same colour?", "Do all the shapes have the same colour?"))
    colours = {o.colour for o in scene.objects}
    if len(colours) == 1:
        return question, f"yes, they are all {colours.pop()}"
    return question, "no, " + _join([f"{_refer(scene, o, ('colour',))} is {o.colour}" for o in scene.objects])


def _reason_extreme(scene, rng):
    sides = {"left": ("Which shape is furthest to the left?", lambda o: o.region % 3),
             "right": ("Which shape is furthest to the right?", lambda o: -(o.region % 3)),
             "top": ("Which shape is closest to the top?", lambda o: o.region // 3),
             "bottom": ("Which shape is closest to the bottom?", lambda o: -(o.region // 3))}
    for side in rng.sample(list(sides), len(sides)):
        question, key = sides[side]
        best = min(key(o) for o in scene.objects)
        winners = [o for o in scene.objects if key(o) == best]
        ref = _refer(scene, winners[0], ("region",))
        if len(scene.objects) >= 2 and len(winners) == 1 and ref is not None:
            return question, ref
    return None


def _reason_compare_counts(scene, rng):
    first = rng.choice(scene.objects).colour
    second = rng.choice([c for c in COLOURS if c != first])
    n1, n2 = (sum(o.colour == c for o in scene.objects) for c in (first, second))
    said = [f"{NUMBER_WORDS[n]} {c} shape{'' if n == 1 else 's'}" for n, c in ((n1, first), (n2, second))]
    return (f"Are there more {first} shapes than {second} shapes?",
            f"{'yes' if n1 > n2 else 'no'}, {said[0]} and {said[1]}")


REASONERS = (_reason_same_colour, _reason_extreme, _reason_compare_counts)


def conversation(scene, rng):
    """[(question, answer)] of one of LLaVA's response types, chosen at random: a
    multi-turn conversation (60%), a detailed description (20%) or short reasoning (20%)."""
    kind = rng.choices(("conversation", "detail", "reasoning"), weights=(0.6, 0.2, 0.2))[0]
    if kind == "detail":
        prompt = rng.choice(("Describe the image in detail.", "Give a detailed description of the image.",
                             "What is in this picture? Describe every shape."))
        return [(prompt, describe(scene))]
    if kind == "reasoning":
        for reason in rng.sample(REASONERS, len(REASONERS)):
            turn = reason(scene, rng)
            if turn is not None:
                return [turn]
    turns = [(q, a) for _, q, a in questions(scene, rng)]
    return rng.sample(turns, min(len(turns), rng.randint(3, 6)))


# -----------------------------------------------------------------------------
# two images: questions only a comparison of both can answer

CHANGES = {"colour": "the colour of one object", "shape": "the shape of one object",  # change -> answer
           "added": "one shape was added", "removed": "one shape was removed"}
TWO_IMAGE_TYPES = ("change", "more")  # metric keys: vqa_acc_two_image_change, vqa_acc_two_image_more


def _edit(scene, change, rng, pairs, weights, scale):
    """The objects of the scene after one change, or None when the scene does not allow it
    (a scene is never left empty; a colour or shape is changed to another the split allows)."""
    objects = list(scene.objects)
    if change == "added":
        free = [r for r in range(len(REGIONS)) if r not in {o.region for o in objects}]
        if not free:
            return None
        new = _place(rng, scene.image_size, rng.choice(free), *rng.choices(pairs, weights)[0], scale)
        return sorted(objects + [new], key=lambda o: o.region)
    k = rng.randrange(len(objects))
    obj = objects[k]
    if change == "removed":
        return objects[:k] + objects[k + 1:] if len(objects) > 1 else None
    if change == "colour":
        options = [replace(obj, colour=c) for c, s in pairs if s == obj.shape and c != obj.colour]
    else:  # every shape fills the same box
        options = [replace(obj, shape=s) for c, s in pairs if c == obj.colour and s != obj.shape]
    return objects[:k] + [rng.choice(options)] + objects[k + 1:] if options else None


def two_image_pair(split, index, cfg):
    """(first, second, [(type, question, answer)]): scene `index` of `split` and a copy with
    one change, drawn uniformly among those the scene allows: an object's colour or shape
    changed, an object added or removed. A pure function of (cfg, split, index). The first
    image is a scene of `split`, so a test pair is never a training pair. The questions:
    "change" (what kind of change, a short answer like VQA's) always, and "more" (which
    image has more shapes) when an object was added or removed."""
    first = make_scene(split, index, cfg)
    held_out = set(cfg.held_out_pairs) if split == "train" else set()
    pairs = [p for p in ALL_PAIRS if p not in held_out]
    weights = [frequency(*p) for p in pairs]
    rng = random.Random(_stable_int(cfg.seed, split, index, "two images"))
    edits = [(c, e) for c in CHANGES if (e := _edit(first, c, rng, pairs, weights, cfg.object_scale))]
    change, objects = rng.choice(edits)  # never empty: any object can take another colour
    second = Scene(objects, first.image_size)
    question = rng.choice(("What changed between the two images?", "What is different in the second image?",
                           "What changed from the first image to the second?"))
    out = [("change", question, CHANGES[change])]
    if len(first.objects) != len(second.objects):
        more = rng.choice(("Which image has more shapes?", "Which of the two images has more shapes?"))
        out.append(("more", more, "the first image" if len(first.objects) > len(second.objects) else "the second image"))
    return first, second, out
