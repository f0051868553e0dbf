"""Tests for shapes.py. Answers are checked by re-deriving them from hand-built scenes with
an independent little parser; pixels are checked against the boxes and colours they must
have; the splits and the prior are checked by counting."""
import random
import re
from collections import Counter
from itertools import combinations

import numpy as np
import pytest

import shapes
from shapes import COLOURS, REGIONS, SHAPES, Obj, Scene, WorldConfig

# two objects: a large red circle at the top left, a small blue square in the centre
TWO = Scene([Obj("circle", "red", "large", 0, (2, 2, 19, 19)),
             Obj("square", "blue", "small", 4, (26, 26, 37, 37))], 64)
# three objects, two of them red circles: names must use size or region to be unique
THREE = Scene([Obj("circle", "red", "large", 0, (2, 2, 19, 19)),
               Obj("square", "blue", "small", 2, (48, 4, 58, 14)),
               Obj("circle", "red", "small", 8, (50, 50, 60, 60))], 64)
# identical twins: only the region tells them apart, so no position/relation/grounding
TWINS = Scene([Obj("ring", "green", "small", 1, (26, 4, 36, 14)),
               Obj("ring", "green", "small", 7, (26, 48, 36, 58))], 64)


def scenes(split, n, cfg=WorldConfig(), start=0, **kw):
    return [shapes.make_scene(split, start + i, cfg, **kw) for i in range(n)]


def resolve(scene, ref):
    """The objects a referring expression like 'the small red circle' or 'the object at
    the top left' can mean -- computed from the words, not with shapes._refer."""
    objs = scene.objects
    for phrase in sorted(shapes.REGION_PHRASES, key=len, reverse=True):
        if ref.endswith(phrase):
            objs = [o for o in objs if shapes.REGION_PHRASES[o.region] == phrase]
            ref = ref[: -len(phrase)]
            break
    words = ref.split()
    assert words[0] == "the", ref
    for w in words[1:]:
        attr = "colour" if w in COLOURS else "shape" if w in SHAPES else "size" if w in shapes.SIZES else None
        assert attr or w == "object", f"unknown word {w!r} in {ref!r}"
        objs = [o for o in objs if attr is None or getattr(o, attr) == w]
    return objs


def the(scene, ref):
    objs = resolve(scene, ref)
    assert len(objs) == 1, f"{ref!r} is ambiguous or empty in {scene}"
    return objs[0]


def expected_answer(scene, qtype, q):
    """The answer re-derived from the question text and the hand-built scene."""
    m = re.fullmatch(r"(?:What colour is|What is the colour of|Which colour is) (.+)\?", q)
    if qtype == "colour" and m:
        return the(scene, m[1]).colour
    m = re.fullmatch(r"(?:What shape is|What is the shape of|Which shape is) (.+)\?", q)
    if qtype == "shape" and m:
        return the(scene, m[1]).shape
    m = re.fullmatch(r"(?:Is (.+) small or large|Is (.+) large or small|What size is (.+), small or large)\?", q)
    if qtype == "size" and m:
        return the(scene, next(g for g in m.groups() if g)).size
    m = re.fullmatch(r"(?:Where is|In which part of the image is|Which region of the image is) (.+?)(?: in)?\?", q)
    if qtype == "position" and m:
        return REGIONS[the(scene, m[1]).region]
    m = re.fullmatch(r"(?:Give the box of|Locate|Output the bounding box of) (.+?)(?: with a box)?\.", q)
    if qtype == "grounding" and m:
        return shapes.box_to_text(the(scene, m[1]).box, scene.image_size)
    m = re.fullmatch(r"(?:How many (.+) are there\?|How many (.+) are in the image\?|Count the (.+)\.)", q)
    if qtype == "count" and m:
        noun = next(g for g in m.groups() if g).split()
        plural = {v: k for k, v in shapes.PLURALS.items()}
        if noun in (["shapes"], ["objects"]):
            return str(len(scene.objects))
        if len(noun) == 2 and noun[0] in COLOURS and noun[1] == "shapes":
            return str(sum(o.colour == noun[0] for o in scene.objects))
        return str(sum(o.shape == plural[noun[0]] for o in scene.objects))
    m = re.fullmatch(r"(?:Is there an? (\w+) (\w+) in the image|Does the image contain an? (\w+) (\w+)"
                     r"|Can you see an? (\w+) (\w+))\?", q)
    if qtype == "existence" and m:
        colour, shape = [g for g in m.groups() if g]
        return "yes" if any((o.colour, o.shape) == (colour, shape) for o in scene.objects) else "no"
    m = re.fullmatch(r"Is (.+?) (?:to the )?left or (?:to the )?right of (.+)\?", q)
    if qtype == "relation" and m:
        a, b = the(scene, m[1]), the(scene, m[2])
        return "left" if a.box[2] <= b.box[0] else "right" if a.box[0] >= b.box[2] else "?"
    m = re.fullmatch(r"Is (.+?) (?:located )?above or below (.+)\?", q)
    if qtype == "relation" and m:
        a, b = the(scene, m[1]), the(scene, m[2])
        return "above" if a.box[3] <= b.box[1] else "below" if a.box[1] >= b.box[3] else "?"
    raise AssertionError(f"unparsed {qtype} question: {q!r}")


# -----------------------------------------------------------------------------
# configuration, determinism, splits

@pytest.mark.parametrize("kw", [dict(image_size=16), dict(max_objects=10), dict(min_objects=0),
                                dict(min_objects=3, max_objects=2), dict(held_out_pairs=[("red", "blob")]),
                                dict(held_out_pairs=["red circle"]), dict(held_out_pairs=shapes.ALL_PAIRS)])
def test_bad_config_rejected(kw):
    with pytest.raises(ValueError):
        WorldConfig(**kw)


def test_same_index_same_scene_and_image():
    cfg = WorldConfig()
    for split in shapes.SPLITS:
        a, b = shapes.make_scene(split, 7, cfg), shapes.make_scene(split, 7, cfg)
        assert a == b
        assert shapes.render(a).tobytes() == shapes.render(b).tobytes()
    # and the seed matters: 20 scenes of seed 0 vs seed 1 are not all the same
    assert scenes("train", 20) != scenes("train", 20, WorldConfig(seed=1))


def test_splits_never_share_a_scene():
    # one-object scenes are the smallest world, so chance repeats are common: within train
    # alone some scenes repeat (about 250 of 3000), yet not one crosses a split
    cfg = WorldConfig(max_objects=1)
    sig = {s: [shapes.scene_signature(x) for x in scenes(s, 3000, cfg)] for s in shapes.SPLITS}
    assert len(sig["train"]) - len(set(sig["train"])) > 20  # a chance collision is likely...
    for a, b in combinations(shapes.SPLITS, 2):
        assert not set(sig[a]) & set(sig[b])              # ...and still none across splits


# -----------------------------------------------------------------------------
# pixels

def test_rendered_pixels_match_boxes_and_colours():
    cfg = WorldConfig(max_objects=5)
    for scene in scenes("val", 150, cfg):
        img = np.asarray(shapes.render(scene)).astype(int)  # (H, W, 3)
        assert img.shape == (64, 64, 3)
        ink = (img != shapes.BACKGROUND).any(-1)             # (H, W) non-background
        inside = np.zeros_like(ink)
        for o in scene.objects:
            x0, y0, x1, y1 = o.box
            inside[y0:y1, x0:x1] = True
            ys, xs = np.nonzero(ink[y0:y1, x0:x1])
            assert (xs.min() + x0, ys.min() + y0, xs.max() + x0 + 1, ys.max() + y0 + 1) == o.box
            # a pixel surely inside the shape: the centre, or the ring's rim half-way up
            cx, cy = (x0 + x1 - 1) // 2, (y0 + y1 - 1) // 2
            if o.shape == "triangle":
                cy = y0 + 2 * (y1 - y0) // 3
            if o.shape == "ring":
                cx = x0
            assert np.abs(img[cy, cx] - COLOURS[o.colour]).max() <= 2, (o, img[cy, cx])
        assert not (ink & ~inside).any()


def test_colours_are_well_separated():
    for a, b in combinations(COLOURS.values(), 2):
        assert np.linalg.norm(np.subtract(a, b)) > 90


def test_small_shapes_are_distinguishable():
    # the five shapes at the smallest size, same place and colour: how much ink differs
    masks = {}
    for shape in SHAPES:
        img = np.asarray(shapes.render(Scene([Obj(shape, "blue", "small", 0, (5, 5, 14, 14))], 64)))
        masks[shape] = (255 - img[..., 0].astype(float)) / (255 - COLOURS["blue"][0])  # coverage 0..1
    for a, b in combinations(SHAPES, 2):
        differ = np.abs(masks[a] - masks[b]).sum() / 81  # fraction of the 9x9 box
        assert differ > 0.15, (a, b, differ)


# -----------------------------------------------------------------------------
# the prior and held-out pairs

def test_prior_is_skewed_but_every_pair_learnable():
    f = {p: shapes.frequency(*p) for p in shapes.ALL_PAIRS}
    assert sum(f.values()) == pytest.approx(1.0)
    assert max(f.values()) >= 5 * min(f.values())
    assert min(f.values()) >= 0.01
    counts = Counter((o.colour, o.shape) for s in scenes("train", 4000) for o in s.objects)
    n = sum(counts.values())
    for p, fp in f.items():  # every pair within 5 binomial standard deviations
        assert abs(counts[p] / n - fp) < 5 * (fp * (1 - fp) / n) ** 0.5, (p, counts[p] / n, fp)


def test_held_out_pairs_only_outside_train():
    held = (("red", "circle"), ("blue", "triangle"))
    cfg = WorldConfig(held_out_pairs=held)
    seen = lambda split: Counter((o.colour, o.shape) for s in scenes(split, 1500, cfg) for o in s.objects)
    train, test = seen("train"), seen("test")
    assert all(train[p] == 0 for p in held)
    assert all(test[p] > 5 for p in held)
    assert len(train) == len(shapes.ALL_PAIRS) - 2


# -----------------------------------------------------------------------------
# words

def test_questions_on_hand_built_scenes():
    for scene in (TWO, THREE, TWINS):
        types = Counter()
        for seed in range(300):
            qs = shapes.questions(scene, random.Random(seed))
            assert [t for t, _, _ in qs] == [t for t in shapes.QUESTION_TYPES if t in {t for t, _, _ in qs}]
            for qtype, q, a in qs:
                assert a == expected_answer(scene, qtype, q), (qtype, q, a)
                assert a == a.lower().rstrip(".") or qtype == "grounding"
                types[qtype] += 1
        if scene is TWINS:
            assert set(types) == set(shapes.QUESTION_TYPES) - {"position", "relation", "grounding"}
        else:
            assert set(types) == set(shapes.QUESTION_TYPES)


def test_two_object_answers_by_hand():
    by = lambda qtype: {(q, a) for s in range(200)
                        for t, q, a in shapes.questions(TWO, random.Random(s)) if t == qtype}
    assert ("What colour is the circle?", "red") in by("colour")
    assert ("What shape is the red object?", "circle") in by("shape")
    assert ("How many shapes are there?", "2") in by("count")
    assert ("How many red shapes are there?", "1") in by("count")
    assert any(a == "0" for _, a in by("count"))
    assert ("Where is the square?", "centre") in by("position")
    assert {a for _, a in by("relation")} == {"left", "right", "above", "below"}
    assert ("Is the circle left or right of the square?", "left") in by("relation")
    assert ("Is the circle above or below the square?", "above") in by("relation")
    q, a = next(iter(x for x in by("grounding") if "circle" in x[0]))
    assert a == "<box>(3,3),(30,30)</box>"
    assert np.abs(np.subtract(shapes.text_to_box(a, 64), TWO.objects[0].box)).max() <= 0.01 * 64


def test_existence_is_balanced():
    answers = Counter(a for s in range(2000) for t, _, a in shapes.questions(THREE, random.Random(s))
                      if t == "existence")
    assert abs(answers["yes"] / 2000 - 0.5) < 0.05  # 4.5 standard deviations


def test_pope_negatives_follow_their_definitions():
    cfg = WorldConfig(max_objects=4)
    for i, scene in enumerate(scenes("test", 100, cfg)):
        present = {(o.colour, o.shape) for o in scene.objects}
        absent = [p for p in shapes.ALL_PAIRS if p not in present]
        kth = sorted((shapes.frequency(*p) for p in absent), reverse=True)[shapes.POPULAR_TOP_K - 1]
        for kind in shapes.POPE_KINDS:
            for yes in (True, False):
                q, a = shapes.pope_question(scene, kind, random.Random(i), answer_yes=yes)
                colour, shape = re.fullmatch(r"Is there an? (\w+) (\w+) in the image\?", q).groups()
                assert a == ("yes" if yes else "no")
                assert ((colour, shape) in present) == yes
                if not yes and kind == "popular":
                    assert shapes.frequency(colour, shape) >= kth
                if not yes and kind == "adversarial":
                    assert any((colour == c) + (shape == s) == 1 for c, s in present)


def test_box_text_round_trip_and_parsing():
    for box in [(0, 0, 64, 64), (2, 2, 19, 19), (26, 26, 37, 37), (63, 1, 64, 2)]:
        text = shapes.box_to_text(box, 64)
        assert re.fullmatch(r"<box>\(\d+,\d+\),\(\d+,\d+\)</box>", text)
        assert shapes.text_to_box(text, 64) == box  # 1% of 64 px < 0.5 px: exact
    assert shapes.box_to_text((2, 2, 19, 19), 64) == "<box>(3,3),(30,30)</box>"  # 3.125, 29.7
    assert shapes.text_to_box("it is < box > ( 10 , 20 ) , ( 30,40 ) </box>", 100) is None
    assert shapes.text_to_box("it is <box> ( 10 , 20 ) , ( 30,40 ) </box>!", 100) == (10, 20, 30, 40)
    for bad in ["", "<box>(10,20)</box>", "<box>(10,20),(130,40)</box>", "<box>(30,20),(10,40)</box>",
                "(10,20),(30,40)", "<box>(a,b),(c,d)</box>"]:
        assert shapes.text_to_box(bad, 64) is None, bad


def test_caption_always_names_the_shape():
    words = lambda text: set(re.findall(r"[a-z]+", text))
    for seed in range(100):
        rng = random.Random(seed)
        full = shapes.caption(THREE, rng)
        assert {"large", "small", "red", "blue", "circle", "square", "top", "left", "right", "bottom"} <= words(full)
        bare = words(shapes.caption(THREE, rng, drop_prob=1.0))
        assert {"circle", "square"} <= bare
        assert not bare & (set(COLOURS) | set(shapes.SIZES) | {"top", "left", "right", "bottom", "centre"})
    assert shapes.caption(TWO, random.Random(0), drop_prob=0.0).count(" and ") == 1


def test_describe():
    assert shapes.describe(TWO) == ("There are two shapes. A large red circle is at the top left. "
                                    "A small blue square is in the centre.")
    one = Scene([Obj("triangle", "orange", "small", 5, (48, 26, 58, 36))], 64)
    assert shapes.describe(one) == "There is one shape. A small orange triangle is on the right."
    big = Scene([Obj("ring", "orange", "large", 3, (2, 23, 20, 41))], 64)
    assert shapes.describe(big) == "There is one shape. A large orange ring is on the left."


def test_conversation_types_and_reasoning():
    kinds = Counter()
    for seed in range(300):
        turns = shapes.conversation(TWO, random.Random(seed))
        assert all(isinstance(q, str) and isinstance(a, str) and q and a for q, a in turns)
        if turns[0][1] == shapes.describe(TWO):
            kinds["detail"] += 1
        elif len(turns) >= 3:
            kinds["multi-turn"] += 1
            assert len(turns) <= 6
        else:
            kinds["reasoning"] += 1
            q, a = turns[0]
            assert {"Are all the shapes the same colour?": "no, the circle is red and the square is blue",
                    "Do all the shapes have the same colour?": "no, the circle is red and the square is blue",
                    "Which shape is furthest to the left?": "the circle",
                    "Which shape is furthest to the right?": "the square",
                    "Which shape is closest to the top?": "the circle",
                    "Which shape is closest to the bottom?": "the square",
                    "Are there more red shapes than blue shapes?": "no, one red shape and one blue shape",
                    }.get(q, a) == a, (q, a)
            if q.startswith("Are there more"):
                c1, c2 = re.fullmatch(r"Are there more (\w+) shapes than (\w+) shapes\?", q).groups()
                n1, n2 = (sum(o.colour == c for o in TWO.objects) for c in (c1, c2))
                assert a.startswith("yes" if n1 > n2 else "no")
    assert all(kinds[k] > 30 for k in ("detail", "multi-turn", "reasoning")), kinds


# ----------------------------------------------------------------------------- two images

def expected_change(first, second):
    """What changed, worked out from the two object lists alone: objects are matched by their
    grid cell, which no change moves."""
    a = {o.region: o for o in first.objects}
    b = {o.region: o for o in second.objects}
    if a.keys() != b.keys():
        (region,) = a.keys() ^ b.keys()  # exactly one cell gained or lost its object
        assert all(a[r] == b[r] for r in a.keys() & b.keys())  # nothing else touched
        return "one shape was added" if region in b else "one shape was removed"
    (r,) = [r for r in a if a[r] != b[r]]  # exactly one object differs, in one attribute
    old, new = a[r], b[r]
    assert (old.size, old.box) == (new.size, new.box) and (old.colour == new.colour) != (old.shape == new.shape)
    return "the colour of one object" if old.colour != new.colour else "the shape of one object"


def test_two_image_pairs_answer_what_the_scenes_show():
    cfg = WorldConfig()
    kinds = Counter()
    for i in range(400):
        first, second, qs = shapes.two_image_pair("test", i, cfg)
        assert shapes.scene_signature(first) == shapes.scene_signature(shapes.make_scene("test", i, cfg))
        answers = {t: a for t, _, a in qs}
        assert answers["change"] == expected_change(first, second)
        n1, n2 = len(first.objects), len(second.objects)
        assert answers.get("more") == (None if n1 == n2 else "the first image" if n1 > n2 else "the second image")
        assert n2 >= 1
        kinds[answers["change"]] += 1
    assert len(kinds) == 4 and min(kinds.values()) > 60, kinds  # every kind of change, often
    again = shapes.two_image_pair("test", 7, cfg)  # a pure function of (cfg, split, index)
    assert shapes.render(again[1]).tobytes() == shapes.render(shapes.two_image_pair("test", 7, cfg)[1]).tobytes()


def test_two_image_pairs_keep_held_out_pairs_out_of_train():
    cfg = WorldConfig(held_out_pairs=[("red", "circle"), ("blue", "ring")])
    for i in range(300):
        first, second, _ = shapes.two_image_pair("train", i, cfg)
        assert not {(o.colour, o.shape) for o in first.objects + second.objects} & {("red", "circle"), ("blue", "ring")}


def test_object_scale_shrinks_the_shapes():
    big = [o for s in scenes("train", 200, WorldConfig(image_size=128)) for o in s.objects]
    small = [o for s in scenes("train", 200, WorldConfig(image_size=128, object_scale=0.5)) for o in s.objects]
    side = lambda objs, size: np.mean([o.box[2] - o.box[0] for o in objs if o.size == size])
    for size in shapes.SIZES:  # half the side, within rounding
        assert abs(side(small, size) / side(big, size) - 0.5) < 0.03, size
    with pytest.raises(ValueError, match="object_scale"):
        WorldConfig(object_scale=0)
