"""
evaluate.py — how tinyvlm is scored: VQA accuracy, POPE hallucination, grounding,
caption accuracy, CLIP zero-shot classification, retrieval and a linear probe.

    metrics = evaluate_vlm("instruct", model, tok, cfg, device)   # called by train.py

Every figure is measured on the shapes world's *test* split with greedy decoding.
- VQA: exact match after one normalisation (lowercase, punctuation stripped, articles
  dropped, whitespace collapsed), overall and per question type (grounding excluded:
  it is scored by IoU).
- POPE ("Evaluating Object Hallucination in Large Vision-Language Models", Li et al. 2023,
  arXiv:2305.10355): balanced yes/no probes "Is there a <colour> <shape> in the image?" whose
  negatives are random, popular or adversarial; accuracy, precision, recall, F1, yes-ratio.
- Grounding: share of predicted boxes with IoU >= 0.5 against the true box.
- Caption accuracy: a caption is right when it names every object with its right size,
  colour and shape, and nothing else.
- Two images: exact match on questions only a comparison answers (what changed between
  them, which has more shapes), overall and per type.
- CLIP (Radford et al. 2021, arXiv:2103.00020): zero-shot accuracy over every colour x shape
  class from prompt templates, image->text retrieval R@1/R@5, and a linear probe.
- The lm stage: perplexity on conversations of validation scenes (text only).
On your own data (user_data.py) the held-out rows are scored instead: clip by retrieval
among their pairs, lm by perplexity on their text, instruct by exact match on their last
answer (held_out_retrieval, held_out_perplexity, held_out_vqa).
"""

import math
import random
import re
import string
from collections import Counter, defaultdict

import torch

import clip as clip_lib
import data
import shapes
from batches import CAPTION_PROMPTS, focus_types, rows_batch, vlm_batch, world_config
from data import question

ZERO_SHOT_TEMPLATES = ("a {}", "a picture of a {}", "there is a {}", "the image shows a {}")
ARTICLES = {"a", "an", "the"}


# -----------------------------------------------------------------------------
# scoring functions (pure; tested on hand-made cases)

def normalize_answer(text):
    """The one normalisation used everywhere answers are compared."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(w for w in text.split() if w not in ARTICLES)


def iou(a, b):
    """Intersection over union of two boxes (x0, y0, x1, y1)."""
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def pope_metrics(predictions, answers):
    """POPE's figures from yes/no predictions; 'yes' is the positive class. A prediction
    that is neither yes nor no counts as a wrong 'no'."""
    pred_yes = [normalize_answer(p).split()[:1] == ["yes"] for p in predictions]
    gold_yes = [normalize_answer(a) == "yes" for a in answers]
    tp = sum(p and g for p, g in zip(pred_yes, gold_yes))
    fp = sum(p and not g for p, g in zip(pred_yes, gold_yes))
    fn = sum(not p and g for p, g in zip(pred_yes, gold_yes))
    correct = sum(p == g for p, g in zip(pred_yes, gold_yes))  # POPE's accuracy: (TP + TN) / n
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"acc": correct / len(answers), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": sum(pred_yes) / len(answers)}


def caption_objects(text):
    """The multiset of (size, colour, shape) a caption names. A missing size or colour
    is recorded as None, so a caption that leaves an attribute out is not right."""
    words = normalize_answer(text).split()
    found = []
    for i, w in enumerate(words):
        shape = next((s for s in shapes.SHAPES if w in (s, s + "s")), None)
        if shape is None:
            continue
        colour = words[i - 1] if i >= 1 and words[i - 1] in shapes.COLOURS else None
        j = i - 2 if colour else i - 1
        size = words[j] if j >= 0 and words[j] in shapes.SIZES else None
        found.append((size, colour, shape))
    return Counter(found)


def caption_correct(text, scene):
    return caption_objects(text) == Counter((o.size, o.colour, o.shape) for o in scene.objects)


CAPTION_ATTRIBUTES = ("colour", "shape", "size", "position")


def caption_mentions(text):
    """{region index: {"size", "colour", "shape"}} for each object the caption places in a
    region ("a large red circle at the top left"): the size, colour and shape words just
    before the region phrase, in that order. A missing word is None; an object named
    without a region is not here."""
    words = normalize_answer(text).split()
    phrases = sorted(((normalize_answer(p).split(), k) for k, p in enumerate(shapes.REGION_PHRASES)),
                     key=lambda pk: -len(pk[0]))  # longest first: "at the top left" before "at the top"
    mentions, start, i = {}, 0, 0
    while i < len(words):
        match = next(((p, k) for p, k in phrases if words[i:i + len(p)] == p), None)
        if match is None:
            i += 1
            continue
        noun = words[start:i][-3:]  # at most "size colour shape"
        shape = next((s for s in shapes.SHAPES if noun and noun[-1] in (s, shapes.PLURALS[s])), None)
        colour = noun[-2] if len(noun) >= 2 and noun[-2] in shapes.COLOURS else None
        size = noun[-3 if colour else -2] if len(noun) >= (3 if colour else 2) else None
        mentions[match[1]] = {"shape": shape, "colour": colour, "size": size if size in shapes.SIZES else None}
        start = i = i + len(match[0])
    return mentions


def caption_attribute_scores(text, scene):
    """{attribute: objects named right}: per object of the scene, matched to the caption's
    mention in the same grid region, whether its colour, shape and size are named right;
    position is right when some mention sits in its region with its shape. An object the
    caption does not place counts as wrong on every attribute."""
    mentions, right = caption_mentions(text), Counter()
    for obj in scene.objects:
        said = mentions.get(obj.region)
        if said is None:
            continue
        for attr in ("colour", "shape", "size"):
            right[attr] += said[attr] == getattr(obj, attr)
        right["position"] += said["shape"] == obj.shape
    return right


# -----------------------------------------------------------------------------
# batched answering with the VLM

def prompt_inputs(model, tok, messages, pictures, image_size):
    """A generation prompt's ids and its pictures' views (V, 3, S, S) in marker order (None
    without pictures): one view per picture, or the global view and tiles of each when the
    model was trained with tiling (data.image_input)."""
    inputs = [data.image_input(tok, p, image_size, model.num_image_tokens, model.cfg.tile_grids) for p in pictures]
    ids = data.encode_prompt(tok, messages, [block for _, block in inputs])
    return ids, torch.cat([views for views, _ in inputs]) if inputs else None


@torch.no_grad()
def answer_batch(model, tok, images, conversations, image_size, device, max_new_tokens=24, **sampling):
    """Continue each conversation (a list of chat messages whose last one is the user's)
    about its images, in one left-padded batch; tiled when the model was trained so. Greedy
    unless `sampling` sets a temperature. images: one PIL image per conversation, or a list
    per conversation (one image for each of its <image> markers, in order; empty for a
    text-only one)."""
    samples = []
    for image, messages in zip(images, conversations):
        ids, pixels = prompt_inputs(model, tok, messages, image if isinstance(image, list) else [image], image_size)
        samples.append({"input_ids": ids, "images": pixels})
    batch = data.collate(samples, tok.pad_id, side="left")
    images = batch["images"].to(device) if batch["images"] is not None else None
    out = model.generate(batch["input_ids"].to(device), images,
                         batch["attention_mask"].to(device), max_new_tokens=max_new_tokens,
                         stop_id=tok.im_end_id, **sampling)
    return [tok.decode(ids).strip() for ids in out]


def answer_all(model, tok, items, cfg, device, max_new_tokens=32):
    """items: list of (scenes, question), scenes a scene or a list of them (several images);
    answers in the same order, in batches."""
    answers = []
    for start in range(0, len(items), cfg.eval_batch_size):
        chunk = [(s if isinstance(s, list) else [s], q) for s, q in items[start:start + cfg.eval_batch_size]]
        answers += answer_batch(model, tok, [[shapes.render(s) for s in scenes] for scenes, _ in chunk],
                                [question(q, len(scenes)) for scenes, q in chunk], cfg.image_size, device,
                                max_new_tokens)
    return answers


def test_scene(cfg, index, n_objects=None):
    return shapes.make_scene("test", index, world_config(cfg), n_objects=n_objects)


def vqa_items(cfg):
    """The VQA test set: [(scene, type, question, answer)], eval_questions questions spread
    evenly over the types, and eval_grounding box questions. Each test scene gives one
    question, of the type with the fewest so far among those the scene allows (a
    one-object scene has no relation question, so a one-object world scores none). A
    focused run (--question_types) is scored on its own types only."""
    asked = focus_types(cfg) or shapes.QUESTION_TYPES
    vqa_types = [t for t in asked if t != "grounding"]
    quota = {t: cfg.eval_questions // len(vqa_types) + (k < cfg.eval_questions % len(vqa_types))
             for k, t in enumerate(vqa_types)}
    quota["grounding"] = cfg.eval_grounding if "grounding" in asked else 0
    items, types = [], []
    for index in range(50 * sum(quota.values())):  # bounded: a world may lack a type altogether
        if len(items) == sum(quota.values()):
            break
        scene, rng = test_scene(cfg, index), random.Random(f"vqa/{index}")
        wanted = [(t, q, a) for t, q, a in shapes.questions(scene, rng) if types.count(t) < quota.get(t, 0)]
        if wanted:
            t, q, a = min(wanted, key=lambda tqa: types.count(tqa[0]))
            items.append((scene, t, q, a))
            types.append(t)
    return items


def blank(scene):
    """The scene with its objects removed: a white canvas of the same size, the world's
    background. What the blind baseline shows the model instead of the picture."""
    return shapes.Scene([], scene.image_size)


def evaluate_vqa(model, tok, cfg, device, blind=False):
    """VQA accuracy per type on the vqa_items test set (exact match after normalize_answer),
    and grounding accuracy on its box questions (IoU >= 0.5).

    blind=True asks the same questions about a blank canvas instead of each scene (same size,
    same preprocessing, same tiling): what the language prior alone answers. Its keys start
    with "blind_"; vqa_acc minus blind_vqa_acc is what the image contributes."""
    vqa_types = [t for t in shapes.QUESTION_TYPES if t != "grounding"]
    test_set = vqa_items(cfg)
    shown = [(blank(scene) if blind else scene, q) for scene, _, q, _ in test_set]
    predictions = answer_all(model, tok, shown, cfg, device)
    metrics, right = {}, Counter()
    for (_, t, _, a), p in zip(test_set, predictions):
        if t == "grounding":
            box = shapes.text_to_box(p, cfg.image_size)
            right[t] += box is not None and iou(box, shapes.text_to_box(a, cfg.image_size)) >= 0.5
        else:
            right[t] += normalize_answer(p).split()[-1:] == normalize_answer(a).split()[-1:] if t == "relation" \
                else normalize_answer(p) == normalize_answer(a)
    counts = Counter(t for _, t, _, _ in test_set)
    for t in counts:
        key = "grounding_acc" if t == "grounding" else f"vqa_acc_{t}"
        metrics[key] = right[t] / counts[t]
    n_vqa = sum(counts[t] for t in vqa_types)
    metrics["vqa_acc"] = sum(right[t] for t in vqa_types) / max(1, n_vqa)
    return {f"blind_{k}": v for k, v in metrics.items()} if blind else metrics


@torch.no_grad()
def image_attention(model, tok, cfg, device, n_questions=100):
    """Per LLM layer, the share of its attention that the position about to write the answer
    pays to the image block, averaged over heads and over the first n_questions VQA test
    questions: does the model look at the picture? A model that ignores it puts about
    (image tokens / prompt length) there only by chance, or less."""
    items = vqa_items(cfg)[:n_questions]
    samples = []
    for scene, _, q, _ in items:
        ids, pixels = prompt_inputs(model, tok, question(q), [shapes.render(scene)], cfg.image_size)
        samples.append({"input_ids": ids, "images": pixels})
    batch = data.collate(samples, tok.pad_id, side="left")
    attentions = [block.attn for block in model.llm.blocks]
    for attn in attentions:
        attn.keep_attention = True
    try:
        model(batch["input_ids"].to(device), batch["images"].to(device), batch["attention_mask"].to(device))
    finally:
        for attn in attentions:
            attn.keep_attention = False
    on_image = (batch["input_ids"] == tok.image_id).to(device)  # (B, T): the keys that are image slots
    metrics = {}
    for k, attn in enumerate(attentions):
        last = attn.attention_weights[:, :, -1]  # (B, H, T): the answer position's weights (left padding)
        metrics[f"image_attention_layer{k}"] = (last * on_image[:, None]).sum(-1).mean().item()
    return metrics


def evaluate_pope(model, tok, cfg, device):
    metrics = {}
    for kind in shapes.POPE_KINDS:
        items, answers = [], []
        for i in range(cfg.eval_pope):
            scene, rng = test_scene(cfg, 100_000 + i), random.Random(f"pope/{kind}/{i}")
            question, answer = shapes.pope_question(scene, kind, rng, answer_yes=i % 2 == 0)
            items.append((scene, question))
            answers.append(answer)
        scores = pope_metrics(answer_all(model, tok, items, cfg, device, max_new_tokens=4), answers)
        metrics.update({f"pope_{kind}_{k}": v for k, v in scores.items()})
    return metrics


def evaluate_captions(model, tok, cfg, device):
    """caption_acc (every object named with its size, colour and shape, nothing else) and,
    per attribute, the share of the scenes' objects the captions name right
    (caption_attribute_scores): how much of the picture the projector carries."""
    items = [(test_scene(cfg, 200_000 + i), CAPTION_PROMPTS[0]) for i in range(cfg.eval_captions)]
    predictions = answer_all(model, tok, items, cfg, device, max_new_tokens=48)
    metrics = {"caption_acc": sum(caption_correct(p, s) for p, (s, _) in zip(predictions, items)) / len(items)}
    right = sum((caption_attribute_scores(p, s) for p, (s, _) in zip(predictions, items)), Counter())
    n_objects = sum(len(s.objects) for s, _ in items)
    metrics.update({f"caption_{a}_acc": right[a] / n_objects for a in CAPTION_ATTRIBUTES})
    return metrics


def evaluate_two_image(model, tok, cfg, device):
    """Accuracy on eval_two_image questions about test pairs (shapes.two_image_pair), half
    "change" and half "more", the "more" answers balanced between the first and the second
    image, so that no fixed answer scores above one half of them."""
    quota = {("change", None): cfg.eval_two_image - cfg.eval_two_image // 2,
             ("more", "the first image"): cfg.eval_two_image // 4}
    quota[("more", "the second image")] = cfg.eval_two_image - sum(quota.values())
    world, items, types, answers, taken = world_config(cfg), [], [], [], Counter()
    for index in range(50 * cfg.eval_two_image):  # bounded, like vqa_items
        if len(items) == cfg.eval_two_image:
            break
        first, second, qs = shapes.two_image_pair("test", 400_000 + index, world)
        for t, q, a in qs:
            key = (t, a if t == "more" else None)
            if taken[key] < quota[key]:
                taken[key] += 1
                items.append(([first, second], q))
                types.append(t)
                answers.append(a)
                break
    predictions = answer_all(model, tok, items, cfg, device)
    right = Counter(t for t, p, a in zip(types, predictions, answers) if normalize_answer(p) == normalize_answer(a))
    counts = Counter(types)
    metrics = {f"vqa_acc_two_image_{t}": right[t] / counts[t] for t in counts}
    metrics["vqa_acc_two_image"] = sum(right.values()) / max(1, len(items))
    return metrics


def evaluate_vlm(stage, model, tok, cfg, device):
    model.eval()
    if stage == "align":
        return evaluate_captions(model, tok, cfg, device)
    metrics = {**evaluate_vqa(model, tok, cfg, device), **evaluate_vqa(model, tok, cfg, device, blind=True),
               **evaluate_pope(model, tok, cfg, device)}
    metrics["vqa_image_gain"] = metrics["vqa_acc"] - metrics["blind_vqa_acc"]
    metrics.update(image_attention(model, tok, cfg, device))
    if cfg.two_image_share > 0:
        metrics.update(evaluate_two_image(model, tok, cfg, device))
    return metrics


@torch.no_grad()
def lm_validation(model, tok, cfg, device, batch=None):
    """The lm stage is measured by perplexity on conversations of validation scenes (or on
    the batch given: your held-out rows' text)."""
    if batch is None:
        batch = vlm_batch(cfg, tok, "lm", 0, 0, model.num_image_tokens, 64, split="val")
    _, loss = model(batch["input_ids"].to(device), None, batch["attention_mask"].to(device),
                    batch["labels"].to(device))
    return {"lm_val_loss": loss.item(), "lm_val_ppl": math.exp(loss.item())}


# -----------------------------------------------------------------------------
# your own data: rows of a LLaVA file (user_data.Row), answered and scored by exact match

def split_question(row):
    """(the conversation up to its last user turn, the reference answer or None): the last
    human turn is the question, the turns before it its history, and a gpt turn after it
    the answer it is scored against."""
    if row.messages[-1]["role"] == "assistant":
        return row.messages[:-1], row.messages[-1]["content"]
    return row.messages, None


def prompt_length_at_most(model, tok, messages):
    """The prompt's length in ids before its images are opened: each image counted at its
    largest block (with tiling, the largest allowed grid; data.image_tokens_at_most)."""
    at_most = data.image_tokens_at_most(tok, model.num_image_tokens, model.cfg.tile_grids)
    return len(data.encode_prompt(tok, messages, at_most))


def prompt_fits(model, tok, messages, max_seq_len, max_new_tokens):
    """Whether the prompt and max_new_tokens fit in the context (VLM.generate's own limit)."""
    return prompt_length_at_most(model, tok, messages) + max_new_tokens - 1 <= max_seq_len


def answer_rows(model, tok, rows, image_size, device, batch_size, max_new_tokens=24, progress=None):
    """Answer the last question of every row, with its earlier turns as history and its
    images read from disk, batch_size rows at a time, greedily. progress(n_done) after each batch."""
    answers = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        answers += answer_batch(model, tok, [[data.load_image(p) for p in r.images] for r in chunk],
                                [split_question(r)[0] for r in chunk], image_size, device, max_new_tokens)
        if progress is not None:
            progress(len(answers))
    return answers


def exact_match(predictions, references):
    """Exact-match accuracy after normalize_answer, overall and per (normalised) reference
    answer, the commonest answer first: {"exact_match", "n", "per_answer": {answer: {...}}}."""
    right = defaultdict(list)
    for p, r in zip(predictions, references, strict=True):
        right[normalize_answer(r)].append(normalize_answer(p) == normalize_answer(r))
    n = sum(len(v) for v in right.values())
    per_answer = {a: {"exact_match": sum(v) / len(v), "n": len(v)}
                  for a, v in sorted(right.items(), key=lambda av: (-len(av[1]), av[0]))}
    return {"exact_match": sum(sum(v) for v in right.values()) / max(1, n), "n": n, "per_answer": per_answer}


def held_out_retrieval(model, tok, rows, cfg, device):
    """The clip stage on your data: retrieval among the held-out image-caption pairs."""
    return retrieval(model, tok, [data.load_image(r.images[0]) for r in rows],
                     [r.messages[1]["content"] for r in rows], cfg, device)


def held_out_perplexity(model, tok, rows, cfg, device):
    """The lm stage on your data: perplexity on the text of (up to 64 of) the held-out rows."""
    batch = rows_batch(cfg, tok, "lm", rows, range(min(64, len(rows))), model.num_image_tokens)
    return lm_validation(model, tok, cfg, device, batch)


def held_out_vqa(model, tok, rows, cfg, device, max_new_tokens=48):
    """The instruct stage on your data: vqa_acc, the last answer of each held-out row (exact
    match after normalize_answer, the earlier turns given as history)."""
    fit = [r for r in rows if prompt_fits(model, tok, split_question(r)[0], cfg.max_seq_len, max_new_tokens)]
    answers = answer_rows(model, tok, fit, cfg.image_size, device, cfg.eval_batch_size, max_new_tokens)
    return {"vqa_acc": exact_match(answers, [split_question(r)[1] for r in fit])["exact_match"]}


# -----------------------------------------------------------------------------
# CLIP

@torch.no_grad()
def embed_images(model, images, cfg, device):
    pixels = torch.stack([data.preprocess(image, cfg.image_size) for image in images]).to(device)  # (n, 3, S, S)
    return torch.cat([model.encode_image(chunk) for chunk in pixels.split(256)])                   # (n, E)


def embed_scenes(model, scenes, cfg, device):
    return embed_images(model, [shapes.render(s) for s in scenes], cfg, device)


@torch.no_grad()
def retrieval(model, tok, images, captions, cfg, device):
    """Image->text R@1 and R@5, and text->image R@1, among these image-caption pairs."""
    text_emb = model.encode_text(clip_lib.tokenize(tok, captions, cfg.context_length).to(device))  # (n, E)
    recall = clip_lib.retrieval_recall(embed_images(model, images, cfg, device), text_emb)
    return {"clip_retrieval_r1": recall["image_to_text_r1"], "clip_retrieval_r5": recall["image_to_text_r5"],
            "clip_text_to_image_r1": recall["text_to_image_r1"]}


@torch.no_grad()
def evaluate_clip(model, tok, cfg, device):
    """Zero-shot over all colour x shape classes on single-object test scenes, retrieval
    among multi-object captions, and a linear probe on frozen image features."""
    model.eval()
    classes = [(c, s) for c in shapes.COLOURS for s in shapes.SHAPES]
    class_emb = clip_lib.zero_shot_classifier(model, tok, [f"{c} {s}" for c, s in classes],
                                              ZERO_SHOT_TEMPLATES)                  # (C, E)
    scenes = [test_scene(cfg, i, n_objects=1) for i in range(cfg.eval_clip_scenes)]
    image_emb = embed_scenes(model, scenes, cfg, device)                            # (S, E)
    predicted = [classes[k] for k in clip_lib.zero_shot_predict(image_emb, class_emb).tolist()]
    truth = [(s.objects[0].colour, s.objects[0].shape) for s in scenes]
    metrics = {
        "clip_zero_shot_acc": sum(p == t for p, t in zip(predicted, truth)) / len(truth),
        "clip_zero_shot_colour_acc": sum(p[0] == t[0] for p, t in zip(predicted, truth)) / len(truth),
        "clip_zero_shot_shape_acc": sum(p[1] == t[1] for p, t in zip(predicted, truth)) / len(truth),
    }
    multi = [test_scene(cfg, 300_000 + i, n_objects=random.Random(i).randint(2, cfg.max_objects))
             for i in range(cfg.eval_retrieval)]
    captions = [shapes.caption(s, random.Random(i)) for i, s in enumerate(multi)]
    metrics.update(retrieval(model, tok, [shapes.render(s) for s in multi], captions, cfg, device))
    metrics.update(linear_probes(model, scenes, image_emb, cfg, device))
    metrics["clip_temperature"] = 1 / model.scale().item()
    return metrics


@torch.no_grad()
def pooled_features(model, scenes, cfg, device):
    """The ViT's own summary of each scene, before CLIP's projection: (n, D)."""
    pixels = torch.stack([data.preprocess(shapes.render(s), cfg.image_size) for s in scenes]).to(device)
    return torch.cat([model.visual.pooled(chunk) for chunk in pixels.split(256)]).cpu()  # (n, D)


def linear_probes(model, test_scenes, test_emb, cfg, device):
    """Logistic regressions on frozen features (the CLIP paper's linear-probe protocol), fit
    on 2,000 single-object train scenes and scored on the zero-shot test scenes:
    clip_linear_probe_acc reads the 30 colour x shape classes from the CLIP embedding;
    clip_probe_colour_acc and clip_probe_shape_acc read one attribute each from the pooled
    ViT features: what the vision tower itself keeps of colour and of shape."""
    train_scenes = [shapes.make_scene("train", 500_000 + i, world_config(cfg), n_objects=1) for i in range(2000)]
    clip_features = (embed_scenes(model, train_scenes, cfg, device).cpu(), test_emb.cpu())        # (n, E) each
    vit_features = tuple(pooled_features(model, s, cfg, device) for s in (train_scenes, test_scenes))  # (n, D)
    probes = {"clip_linear_probe_acc": (clip_features, lambda o: (o.colour, o.shape)),
              "clip_probe_colour_acc": (vit_features, lambda o: o.colour),
              "clip_probe_shape_acc": (vit_features, lambda o: o.shape)}
    metrics = {}
    for name, ((train_x, test_x), label) in probes.items():
        classes = sorted({label(s.objects[0]) for s in train_scenes + test_scenes})
        train_y, test_y = (torch.tensor([classes.index(label(s.objects[0])) for s in split])
                           for split in (train_scenes, test_scenes))
        metrics[name] = clip_lib.linear_probe(train_x, train_y, test_x, test_y)
    return metrics


# -----------------------------------------------------------------------------
# the table printed at the end of train.py

def print_table(metrics):
    print("\n" + "-" * 44)
    for key in sorted(metrics):
        value = metrics[key]
        if key.endswith("_seconds"):
            shown = f"{value:8.1f} s"
        elif any(part in key for part in ("_acc", "_f1", "_ratio", "_precision", "_recall", "_r1", "_r5")):
            shown = f"{100 * value:8.1f} %"
        else:
            shown = f"{value:10.4f}"
        print(f"{key:32s} {shown}")
    print("-" * 44)
