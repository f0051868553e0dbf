"""Tests for evaluate.py. The scoring functions are checked on hand-made cases whose right
values are worked out by hand in the test (IoU fractions, POPE's confusion counts, caption
judgements on a hand-built scene); the caption scorer is checked against the caption
generator over many random scenes. The evaluation loops are checked with stub models whose
answers are known (an oracle, an always-"yes", an answer shifted by one item), so a slip in
which prediction is compared with which answer, or in the per-type counts, shows up as a
wrong figure."""
import random
import re
from collections import Counter
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

import data
import evaluate
import shapes
from evaluate import caption_correct, caption_objects, iou, normalize_answer, pope_metrics
from shapes import Obj, Scene
from tokenizer import Tokenizer

# ----------------------------------------------------------------------------- normalize_answer


@pytest.mark.parametrize("text, expected", [
    ("The Red  circle.", "red circle"),       # lowercase, article dropped, full stop gone, spaces collapsed
    ("A", ""),                                 # an answer that is only an article is empty
    ("an orange ring!", "orange ring"),
    ("  Yes. ", "yes"),
    ("There are 3 shapes, aren't there?", "there are 3 shapes arent there"),  # numbers kept
    ("the theatre and anthem", "theatre and anthem"),  # whole words only: 'the' inside a word stays
    ("top\tleft\n", "top left"),
    ("", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_overall_and_per_reference_answer():
    """Worked by hand: 'yes' is right 2 of 3 times (case and a full stop do not matter),
    'red' 0 of 1, 'a circle' 1 of 1 (the article does not matter); 3 of 5 overall."""
    scores = evaluate.exact_match(["Yes.", "yes", "no", "blue", "circle"], ["yes", "YES", "yes", "red", "a circle"])
    assert scores == {"exact_match": 3 / 5, "n": 5, "per_answer": {"yes": {"exact_match": 2 / 3, "n": 3},
                                                                  "circle": {"exact_match": 1.0, "n": 1},
                                                                  "red": {"exact_match": 0.0, "n": 1}}}
    assert list(scores["per_answer"]) == ["yes", "circle", "red"]   # commonest first, then alphabetical
    with pytest.raises(ValueError):
        evaluate.exact_match(["one"], ["one", "two"])               # a missing answer is an error, not a skip


# ----------------------------------------------------------------------------- iou


@pytest.mark.parametrize("a, b, expected", [
    ((0, 0, 10, 10), (0, 0, 10, 10), 1.0),          # identical
    ((0, 0, 10, 10), (20, 20, 30, 30), 0.0),        # disjoint
    ((0, 0, 10, 10), (5, 0, 15, 10), 50 / 150),     # half of each overlaps: 50 / (100 + 100 - 50)
    ((0, 0, 10, 10), (10, 0, 20, 10), 0.0),         # touching edges: ends are exclusive, no shared pixel
    ((0, 0, 10, 10), (2, 2, 4, 4), 4 / 100),        # contained: the small box's area over the big one's
    ((0, 0, 4, 2), (2, 0, 6, 4), 4 / 20),           # corner overlap 2x2, union 8 + 16 - 4
    ((3, 3, 3, 3), (3, 3, 3, 3), 0.0),              # empty boxes: no area, no division by zero
])
def test_iou_hand_made_boxes(a, b, expected):
    assert iou(a, b) == pytest.approx(expected, abs=1e-12)
    assert iou(b, a) == pytest.approx(expected, abs=1e-12)  # symmetric


# ----------------------------------------------------------------------------- pope_metrics


def test_pope_metrics_hand_counted():
    # pred  Yes.  yes   YES!  no    No.   banana no    yes      "Yes." / "YES!" are yes,
    # gold  yes   yes   no    yes   no    yes    no    yes      junk is a (wrong) no
    # ->    TP    TP    FP    FN    TN    FN     TN    TP       TP 3, FP 1, FN 2, TN 2
    predictions = ["Yes.", "yes", "YES!", "no", "No.", "banana", "no", "yes"]
    answers = ["yes", "yes", "no", "yes", "no", "yes", "no", "yes"]
    m = pope_metrics(predictions, answers)
    precision, recall = 3 / 4, 3 / 5
    assert m["precision"] == pytest.approx(precision)
    assert m["recall"] == pytest.approx(recall)
    assert m["f1"] == pytest.approx(2 * precision * recall / (precision + recall))  # = 2/3
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["acc"] == pytest.approx((3 + 2) / 8)   # (TP + TN) / n
    assert m["yes_ratio"] == pytest.approx(4 / 8)


def test_pope_metrics_degenerate_answerers():
    answers = ["yes", "no"] * 5
    always_yes = pope_metrics(["Yes"] * 10, answers)
    assert always_yes == pytest.approx({"acc": 0.5, "precision": 0.5, "recall": 1.0, "f1": 2 / 3, "yes_ratio": 1.0})
    always_no = pope_metrics(["no."] * 10, answers)
    assert always_no == pytest.approx({"acc": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0})
    perfect = pope_metrics([a.upper() + "." for a in answers], answers)
    assert perfect == pytest.approx({"acc": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0, "yes_ratio": 0.5})


def test_pope_accuracy_agrees_with_the_confusion_counts():
    # 'Yes, there is one.' is counted as a yes (TP) by precision/recall; POPE's accuracy is
    # (TP + TN) / n, so it must be right for accuracy too
    m = pope_metrics(["Yes, there is one.", "no"], ["yes", "no"])
    assert (m["precision"], m["recall"]) == (1.0, 1.0)
    assert m["acc"] == 1.0


# ----------------------------------------------------------------------------- captions

# a large red circle at the top left, a small blue square in the centre
SCENE = Scene([Obj("circle", "red", "large", 0, (2, 2, 19, 19)),
               Obj("square", "blue", "small", 4, (26, 26, 37, 37))], 64)


@pytest.mark.parametrize("caption, right", [
    ("a large red circle at the top left and a small blue square in the centre", True),
    ("There is a small blue square in the centre and a large red circle at the top left.", True),  # any order
    ("a large red circle and a small blue square on a white background", True),   # positions are not scored
    ("a large red circle at the top left", False),                                  # misses an object
    ("a large green circle at the top left and a small blue square in the centre", False),  # wrong colour
    ("a small red circle at the top left and a small blue square in the centre", False),    # wrong size
    ("a large red circle, a small blue square and a small yellow triangle", False),          # extra object
    ("a red circle at the top left and a small blue square in the centre", False),  # size left out
    ("a large circle at the top left and a small blue square in the centre", False),  # colour left out
    ("a large red ring at the top left and a small blue square in the centre", False),  # wrong shape
    ("a large red circle and a large red circle and a small blue square", False),    # one object twice
    ("", False),
])
def test_caption_correct_on_a_hand_built_scene(caption, right):
    assert caption_correct(caption, SCENE) is right


def test_caption_objects_records_missing_attributes_as_none():
    assert caption_objects("a red circle, a large ring and two small squares") == Counter(
        {(None, "red", "circle"): 1, ("large", None, "ring"): 1, ("small", None, "square"): 1})
    assert caption_objects("The image shows nothing.") == Counter()


def test_scorer_agrees_with_the_caption_generator():
    # every full caption the world writes (any template, any order) is judged right, and
    # the same caption with every size and colour dropped is judged wrong: 300 random
    # train scenes of 1-3 objects, so a scorer that mis-parses any template fails here
    world = shapes.WorldConfig()
    for i in range(300):
        scene = shapes.make_scene("train", i, world)
        assert caption_correct(shapes.caption(scene, random.Random(i)), scene), i
        assert not caption_correct(shapes.caption(scene, random.Random(i), drop_prob=1.0), scene), i


# ----------------------------------------------------------------------------- print_table


def test_print_table_formats_fractions_seconds_and_the_rest(capsys):
    evaluate.print_table({"vqa_acc": 0.5, "vqa_acc_colour": 0.25, "pope_random_f1": 0.125,
                          "pope_random_yes_ratio": 1.0, "clip_retrieval_r5": 0.9, "clip_train_seconds": 12.34,
                          "total_seconds": 100.0, "lm_val_loss": 3.0644, "lm_val_ppl": 21.4218})
    lines = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()
             if line.strip() and not line.startswith("-")}
    assert lines["vqa_acc"] == ["50.0", "%"]
    assert lines["vqa_acc_colour"] == ["25.0", "%"]
    assert lines["pope_random_f1"] == ["12.5", "%"]
    assert lines["pope_random_yes_ratio"] == ["100.0", "%"]
    assert lines["clip_retrieval_r5"] == ["90.0", "%"]
    assert lines["clip_train_seconds"] == ["12.3", "s"]
    assert lines["total_seconds"] == ["100.0", "s"]
    assert lines["lm_val_loss"] == ["3.0644"]   # neither a fraction nor a time: shown as is
    assert lines["lm_val_ppl"] == ["21.4218"]
    assert list(lines) == sorted(lines)         # sorted by key


# ----------------------------------------------------------------------------- the evaluation loops, with stub models

EVAL_CFG = SimpleNamespace(image_size=64, max_objects=3, seed=0, eval_questions=14, eval_grounding=3,
                           eval_pope=6, eval_captions=6, eval_batch_size=4, world_size=0, object_scale=1.0,
                           two_image_share=0.0, eval_two_image=12, question_types="")
VQA_TYPES = [t for t in shapes.QUESTION_TYPES if t != "grounding"]


@pytest.fixture
def gold(monkeypatch):
    """Record the answer of every question the world generates while evaluate.py builds its
    test sets, keyed by (scene, question): what an oracle would answer."""
    answers = {}
    questions, pope_question = shapes.questions, shapes.pope_question

    def recording_questions(scene, rng):
        out = questions(scene, rng)
        for qtype, q, a in out:
            answers[shapes.scene_signature(scene), q] = (qtype, a)
        return out

    def recording_pope(scene, kind, rng, answer_yes):
        q, a = pope_question(scene, kind, rng, answer_yes)
        answers[shapes.scene_signature(scene), q] = ("pope", a)
        return q, a

    monkeypatch.setattr(shapes, "questions", recording_questions)
    monkeypatch.setattr(shapes, "pope_question", recording_pope)
    return answers


def stub_answerer(monkeypatch, answer, calls=None):
    """Replace evaluate.answer_all (the model) by answer(scene, question) -> text."""
    def answer_all(model, tok, items, cfg, device, max_new_tokens=24):
        if calls is not None:
            calls.append(list(items))
        return [answer(scene, q) for scene, q in items]
    monkeypatch.setattr(evaluate, "answer_all", answer_all)


def test_vqa_oracle_scores_one_and_counts_every_type(monkeypatch, gold):
    calls = []
    stub_answerer(monkeypatch, lambda s, q: gold[shapes.scene_signature(s), q][1], calls)
    m = evaluate.evaluate_vqa(None, None, EVAL_CFG, "cpu")
    assert set(m) == {"vqa_acc", "grounding_acc"} | {f"vqa_acc_{t}" for t in VQA_TYPES}
    assert all(v == 1.0 for v in m.values()), m
    # one call, eval_questions VQA items (types in rotation: 14 = 2 of each) + eval_grounding boxes
    (items,) = calls
    types = Counter(gold[shapes.scene_signature(s), q][0] for s, q in items)
    assert types == Counter({**{t: 2 for t in VQA_TYPES}, "grounding": 3})


def test_vqa_per_type_bookkeeping(monkeypatch, gold):
    # right on colour questions only: colour 1, every other type 0, overall 2 / 14
    def colour_only(scene, q):
        qtype, a = gold[shapes.scene_signature(scene), q]
        return a if qtype == "colour" else "zzz"
    stub_answerer(monkeypatch, colour_only)
    m = evaluate.evaluate_vqa(None, None, EVAL_CFG, "cpu")
    assert m["vqa_acc_colour"] == 1.0
    assert all(m[f"vqa_acc_{t}"] == 0.0 for t in VQA_TYPES if t != "colour")
    assert m["grounding_acc"] == 0.0
    assert m["vqa_acc"] == pytest.approx(2 / 14)


def test_vqa_answers_are_compared_with_their_own_question(monkeypatch, gold):
    # every prediction is the right answer of the PREVIOUS item: if evaluate_vqa compared
    # predictions with answers shifted by one it would score this 1; it must score it low
    order = []

    def shifted(scene, q):
        order.append(gold[shapes.scene_signature(scene), q][1])
        return order[-2] if len(order) > 1 else "zzz"
    stub_answerer(monkeypatch, shifted)
    m = evaluate.evaluate_vqa(None, None, EVAL_CFG, "cpu")
    assert m["vqa_acc"] <= 0.5 and m["grounding_acc"] < 1.0, m


def test_grounding_is_scored_by_iou(monkeypatch, gold):
    # a predicted box that keeps IoU >= 0.5 with the true one is right, a far one is wrong,
    # text without a box is wrong
    def nudged(scene, q):
        qtype, a = gold[shapes.scene_signature(scene), q]
        if qtype != "grounding":
            return a
        x0, y0, x1, y1 = shapes.text_to_box(a, 64)
        return shapes.box_to_text((x0 + 1, y0, x1 + 1, y1), 64)  # shifted 1 px: IoU well above 0.5
    stub_answerer(monkeypatch, nudged)
    assert evaluate.evaluate_vqa(None, None, EVAL_CFG, "cpu")["grounding_acc"] == 1.0
    stub_answerer(monkeypatch, lambda s, q: "<box>(0,0),(2,2)</box>" if "box" in q else "?")
    assert evaluate.evaluate_vqa(None, None, EVAL_CFG, "cpu")["grounding_acc"] == 0.0
    stub_answerer(monkeypatch, lambda s, q: "I cannot tell")
    assert evaluate.evaluate_vqa(None, None, EVAL_CFG, "cpu")["grounding_acc"] == 0.0


def test_pope_always_yes_and_oracle(monkeypatch, gold):
    calls = []
    stub_answerer(monkeypatch, lambda s, q: "Yes", calls)
    m = evaluate.evaluate_pope(None, None, EVAL_CFG, "cpu")
    for kind in shapes.POPE_KINDS:
        # balanced sets: always-yes is right on exactly the half that are positives
        assert m[f"pope_{kind}_acc"] == 0.5 and m[f"pope_{kind}_yes_ratio"] == 1.0
        assert m[f"pope_{kind}_recall"] == 1.0 and m[f"pope_{kind}_precision"] == 0.5
        assert m[f"pope_{kind}_f1"] == pytest.approx(2 / 3)
    assert [len(items) for items in calls] == [EVAL_CFG.eval_pope] * 3  # one call per kind
    assert all(re.fullmatch(r"Is there an? \w+ \w+ in the image\?", q) for items in calls for _, q in items)

    stub_answerer(monkeypatch, lambda s, q: gold[shapes.scene_signature(s), q][1])
    m = evaluate.evaluate_pope(None, None, EVAL_CFG, "cpu")
    for kind in shapes.POPE_KINDS:
        assert m[f"pope_{kind}_acc"] == 1.0 and m[f"pope_{kind}_f1"] == 1.0
        assert m[f"pope_{kind}_yes_ratio"] == 0.5


def test_caption_accuracy_oracle_and_wrong_scene(monkeypatch):
    stub_answerer(monkeypatch, lambda s, q: shapes.caption(s, random.Random(0)))
    assert evaluate.evaluate_captions(None, None, EVAL_CFG, "cpu") == {"caption_acc": 1.0}
    # the same caption with the first object's colour changed is wrong, for every scene
    def recoloured(scene, q):
        first = scene.objects[0]
        colour = next(c for c in shapes.COLOURS if c != first.colour)
        return shapes.caption(Scene([replace(first, colour=colour)] + scene.objects[1:], 64), random.Random(0))
    stub_answerer(monkeypatch, recoloured)
    assert evaluate.evaluate_captions(None, None, EVAL_CFG, "cpu") == {"caption_acc": 0.0}


def test_evaluate_vlm_picks_the_stage_metrics(monkeypatch):
    stub_answerer(monkeypatch, lambda s, q: "yes")
    model = torch.nn.Linear(1, 1)
    assert set(evaluate.evaluate_vlm("align", model, None, EVAL_CFG, "cpu")) == {"caption_acc"}
    keys = set(evaluate.evaluate_vlm("instruct", model, None, EVAL_CFG, "cpu"))
    assert {"vqa_acc", "grounding_acc", "pope_adversarial_f1"} <= keys and "caption_acc" not in keys


# ----------------------------------------------------------------------------- answer_batch / answer_all


class EchoModel:
    """A stand-in VLM whose 'answer' names what it was given: the question of its row (read
    back from the left-padded prompt ids) and the mean pixel of the image in the same row."""
    num_image_tokens = 3
    cfg = SimpleNamespace(tile_grids=())  # one view per image

    def __init__(self, tok):
        self.tok, self.calls = tok, []

    def generate(self, input_ids, images, attention_mask, max_new_tokens, stop_id):
        self.calls.append((input_ids.shape[0], max_new_tokens))
        assert stop_id == self.tok.im_end_id
        assert bool(attention_mask[:, -1].all()), "prompts must be left-padded: every row ends with a real token"
        assert images.shape[0] == input_ids.shape[0]
        out = []
        for ids, mask, image in zip(input_ids, attention_mask, images):
            prompt = self.tok.decode(ids[mask.bool()])
            assert prompt.count("<|image|>") == self.num_image_tokens and prompt.endswith("<|im_start|>assistant\n")
            question = prompt.split("<|image|>\n")[1].split("<|im_end|>")[0]
            out.append(self.tok.encode(f"  {question.upper()} | {image.mean().item():.4f} \n"))
        return out


def test_answer_all_keeps_items_images_and_answers_in_order():
    tok = Tokenizer({bytes([b]): b for b in range(256)})   # byte-level: no training needed
    scenes = [shapes.make_scene("test", i, shapes.WorldConfig()) for i in range(7)]
    questions = [f"question {i}" + "?" * i for i in range(7)]   # different lengths: real left padding
    model = EchoModel(tok)
    answers = evaluate.answer_all(model, tok, list(zip(scenes, questions)), EVAL_CFG, "cpu", max_new_tokens=5)
    expected = [f"{q.upper()} | {data.preprocess(shapes.render(s), 64).mean().item():.4f}"
                for s, q in zip(scenes, questions)]
    assert answers == expected    # stripped, in item order, each with its own image
    assert model.calls == [(4, 5), (3, 5)]   # eval_batch_size chunks, max_new_tokens passed on


def test_vqa_set_of_a_one_object_world_ends_without_relation_questions(monkeypatch, gold):
    """A world of one-object scenes has no relation questions: the test set is still built
    (it used to loop forever waiting for one), from the other types, and scores no relation."""
    cfg = SimpleNamespace(**{**vars(EVAL_CFG), "max_objects": 1})
    calls = []
    stub_answerer(monkeypatch, lambda s, q: gold[shapes.scene_signature(s), q][1], calls)
    m = evaluate.evaluate_vqa(None, None, cfg, "cpu")
    assert "vqa_acc_relation" not in m and m["vqa_acc"] == 1.0
    (items,) = calls
    assert all(len(s.objects) == 1 for s, _ in items)


# ----------------------------------------------------------------------------- two images, tiling


def test_two_image_set_is_balanced_and_an_oracle_scores_one(monkeypatch):
    """The oracle (the pair's own answers) scores 1; a model that always says "the second
    image" scores exactly 1/2 on "more" (balanced) and 0 on "change"."""
    calls, pairs = [], {}
    two_image_pair = shapes.two_image_pair

    def recording_pair(split, index, cfg):
        first, second, qs = two_image_pair(split, index, cfg)
        pairs.update({(shapes.scene_signature(first), shapes.scene_signature(second), q): a for _, q, a in qs})
        return first, second, qs
    monkeypatch.setattr(shapes, "two_image_pair", recording_pair)
    oracle = lambda scenes, q: pairs[tuple(shapes.scene_signature(s) for s in scenes) + (q,)]
    stub_answerer(monkeypatch, oracle, calls)
    m = evaluate.evaluate_two_image(None, None, EVAL_CFG, "cpu")
    assert m == {"vqa_acc_two_image": 1.0, "vqa_acc_two_image_change": 1.0, "vqa_acc_two_image_more": 1.0}
    (items,) = calls
    assert len(items) == EVAL_CFG.eval_two_image and all(len(scenes) == 2 for scenes, _ in items)
    stub_answerer(monkeypatch, lambda scenes, q: "The second image.")
    m = evaluate.evaluate_two_image(None, None, EVAL_CFG, "cpu")
    assert (m["vqa_acc_two_image_more"], m["vqa_acc_two_image_change"], m["vqa_acc_two_image"]) == (0.5, 0.0, 0.25)


class RecordingModel:
    """A stand-in VLM that records the prompt ids and image views generate() is given."""
    num_image_tokens = 2

    def __init__(self, tile_grids=()):
        self.cfg, self.seen = SimpleNamespace(tile_grids=tile_grids), []

    def generate(self, input_ids, images, attention_mask, max_new_tokens, stop_id):
        self.seen.append((input_ids, images))
        return [[] for _ in input_ids]


def test_answer_batch_gives_each_image_its_own_block_in_order():
    tok = Tokenizer({bytes([b]): b for b in range(256)})
    first, second = (shapes.render(shapes.make_scene("test", i, shapes.WorldConfig())) for i in (0, 1))
    model = RecordingModel()
    evaluate.answer_batch(model, tok, [[first, second]], [data.question("What changed?", 2)], 16, "cpu")
    (ids, images), = model.seen
    assert torch.equal(images, torch.stack([data.preprocess(first, 16), data.preprocess(second, 16)]))
    assert tok.decode(ids[0]).startswith("<|im_start|>user\n<|image|><|image|>\n<|image|><|image|>\nWhat changed?")
    # tiled: a 2x2 grid for a square image, global view first, each view its own tagged block
    model = RecordingModel(tile_grids=((1, 2), (2, 2)))
    evaluate.answer_batch(model, tok, [first], [data.question("What colour?")], 16, "cpu")
    (ids, images), = model.seen
    assert torch.equal(images, data.tile_views(first, 16, (2, 2)))
    assert tok.decode(ids[0]).startswith("<|im_start|>user\n<global_image><|image|><|image|><row_1_col_1><|image|>"
                                         "<|image|><row_1_col_2><|image|><|image|><row_2_col_1>")


def test_a_focused_run_is_scored_on_its_own_types(monkeypatch, gold):
    cfg = SimpleNamespace(**{**vars(EVAL_CFG), "question_types": "colour, shape"})
    calls = []
    stub_answerer(monkeypatch, lambda s, q: gold[shapes.scene_signature(s), q][1], calls)
    m = evaluate.evaluate_vqa(None, None, cfg, "cpu")
    assert set(m) == {"vqa_acc", "vqa_acc_colour", "vqa_acc_shape"} and m["vqa_acc"] == 1.0
    assert len(calls[0]) == cfg.eval_questions
