"""
batches.py — what each training stage reads: its batches, built on the fly from the shapes
world (shapes.py) or from your own LLaVA rows (user_data.py), and the stream that brings
them to the training step.

A batch is a pure function of (stage, step, micro): sample i of micro-batch `micro` of step
`step` draws its scene and its text from its own seeded RNG (scene_rng), or reads the row
that a seeded shuffle puts at its place (row_indices). So a run is reproducible, --resume
needs no data state (the step number is the position in the stream), and any slice of a
batch is the same samples one process would build: under torchrun each rank builds its
share of every micro-batch (the `share` argument, see distributed.py).

What a sample holds, per stage (LLaVA, "Visual Instruction Tuning", Liu et al. 2023,
arXiv:2304.08485, section 3: conversations written from a symbolic scene):
  clip      an image and its caption (clip_batch, user_clip_batch)
  lm        the text of a conversation, every token a target, no image
  align     an image, a caption prompt, the caption as the answer
  instruct  images and a multi-turn conversation about them, the answers as targets
            (vlm_batch, user_vlm_batch)

Shape legend: B samples in a micro-batch, T tokens, V image views, S image side, L text length.
Run the tests:  python -m pytest -q tests/test_batches.py
"""
import random

import torch

import data
import shapes
from clip import tokenize as clip_tokenize
from flags import tile_grids

# what an align sample asks for its caption (evaluate.evaluate_captions asks the first)
CAPTION_PROMPTS = ("Describe the image briefly.", "What is in the image?", "Write a short caption.")


# -----------------------------------------------------------------------------
# the shapes world, as the run's config sets it

def world_config(cfg):
    """The shapes world of a run: its canvas side (world_size, or the encoder's image_size),
    objects per scene, object scale and seed."""
    return shapes.WorldConfig(image_size=cfg.world_size or cfg.image_size, max_objects=cfg.max_objects,
                              seed=cfg.seed, object_scale=cfg.object_scale)


def focus_types(cfg):
    """The question types of a focused run ("colour,shape" -> ("colour", "shape")), or () for
    the full mix. Unknown names are a ValueError listing the valid ones."""
    types = tuple(t.strip() for t in cfg.question_types.split(",") if t.strip())
    unknown = [t for t in types if t not in shapes.QUESTION_TYPES]
    if unknown:
        raise ValueError(f"--question_types: unknown {', '.join(unknown)}; valid: {', '.join(shapes.QUESTION_TYPES)}")
    return types


def scene_rng(cfg, stage, step, micro, i):
    """Sample i of a micro-batch draws its scene and its text from its own seeded RNG, so a
    batch is a pure function of (stage, step, micro): runs are reproducible and resumable.
    Micro-batches are 4096 indices apart, more than any batch holds, so none share a scene."""
    index = (step * cfg.grad_accum + micro) * 4096 + i
    return index, random.Random(f"{cfg.seed}/{stage}/{index}")


def world_texts(cfg):
    """The text the tokenizer learns from in the shapes world: captions, questions and answers,
    descriptions and conversations of training scenes (your own data's: user_data.user_texts)."""
    world, texts = world_config(cfg), []
    for i in range(cfg.tokenizer_scenes):
        scene, rng = shapes.make_scene("train", i, world), random.Random(i)
        texts.append(shapes.caption(scene, rng))
        texts.append(shapes.describe(scene))
        texts.append("user\nassistant\n")  # the chat template's role names, so they become whole tokens
        for _, question, answer in shapes.questions(scene, rng):
            texts += [question, answer]
        for question, answer in shapes.conversation(scene, rng):
            texts += [question, answer]
    return texts


# -----------------------------------------------------------------------------
# conversations -> token ids that fit the context

def chat_messages(turns, n_images=1):
    """Chat messages of (question, answer) turns; the n_images images, if any, come before
    the first question (LLaVA's convention, data.question's layout)."""
    messages = []
    for k, (question, answer) in enumerate(turns):
        content = data.question(question, n_images if k == 0 else 0)[0]["content"]
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
    return messages


def fit_messages(tok, messages, image_tokens, max_seq_len):
    """(ids, labels, n) of the first n messages: as many whole exchanges as fit in max_seq_len.
    A conversation is cut at a turn boundary, never inside an answer; the first exchange is
    always kept (your data's rows whose first exchange is too long are dropped when they are
    loaded). image_tokens: one block size for every image, or one block (ids) per image of
    the whole conversation, in order: the blocks of cut turns are dropped."""
    for n in range(len(messages), 0, -2):
        blocks = image_tokens if isinstance(image_tokens, int) else image_tokens[:data.count_images(messages[:n])]
        ids, labels = data.encode_chat(tok, messages[:n], blocks)
        if len(ids) <= max_seq_len or n <= 2:
            return ids, labels, n


def fit_turns(tok, scenes, turns, image_tokens, cfg):
    """One training sample of the shapes world: the images of `scenes` (a list, in order;
    empty for text only) and as many whole turns as fit in max_seq_len."""
    inputs = [data.image_input(tok, shapes.render(s), cfg.image_size, image_tokens, tile_grids(cfg)) for s in scenes]
    messages = chat_messages(turns, len(scenes))
    ids, labels, _ = fit_messages(tok, messages, [block for _, block in inputs], cfg.max_seq_len)
    images = torch.cat([views for views, _ in inputs]) if inputs else None  # (V, 3, S, S), in marker order
    return {"input_ids": ids, "labels": labels, "images": images}


# -----------------------------------------------------------------------------
# the shapes world's batches

def clip_batch(cfg, tok, step, micro, share=None):
    """Image-caption pairs. A share of them come as hard-negative twins: the same scene with
    one shape changed and the same caption but for that word, so the batch cannot be
    solved from colour and position alone. share: which of the clip_batch_size samples to
    build (default all); the scenes and captions of all are drawn, as a twin takes two
    places, but only those of `share` are rendered."""
    world, scenes, texts = world_config(cfg), [], []
    while len(scenes) < cfg.clip_batch_size:
        index, rng = scene_rng(cfg, "clip", step, micro, len(scenes))
        n = 1 if rng.random() < cfg.clip_single_object_prob else None
        scene = shapes.make_scene("train", index, world, n_objects=n)
        twin = shapes.hard_negative(scene, rng) if rng.random() < cfg.clip_hard_negative_prob else None
        caption_seed = rng.random()
        for s in (scene, twin) if twin is not None else (scene,):
            scenes.append(s)
            texts.append(shapes.caption(s, random.Random(caption_seed), drop_prob=cfg.clip_drop_prob,
                                       keep_colour=not cfg.clip_drop_colour))
    share = range(cfg.clip_batch_size) if share is None else share
    images = torch.stack([data.preprocess(shapes.render(scenes[i]), cfg.image_size) for i in share])  # (B, 3, S, S)
    return {"images": images, "ids": clip_tokenize(tok, [texts[i] for i in share], cfg.context_length)}


def instruct_turns(scene, rng, n_turns, types=()):
    """Several answers per image per forward pass: n_turns questions of the scene (every
    type, and a POPE-style probe with any kind of negative) in a random order, or one of
    LLaVA's conversation types (QA, detailed description, reasoning). With `types`, a
    focused run: questions of those types only (or, for a scene that has none, any)."""
    if types:
        asked = shapes.questions(scene, rng)
        turns = [(q, a) for t, q, a in asked if t in types] or [(q, a) for _, q, a in asked]
        return rng.sample(turns, min(n_turns, len(turns)))
    if rng.random() < 0.8:
        turns = [(q, a) for _, q, a in shapes.questions(scene, rng)]
        kind = rng.choice(shapes.POPE_KINDS)
        turns.append(shapes.pope_question(scene, kind, rng, answer_yes=rng.random() < 0.5))
        return rng.sample(turns, min(n_turns, len(turns)))
    return shapes.conversation(scene, rng)


def lm_turns(scene, rng, cfg):
    """The lm stage's text about a scene: a conversation (instruct_turns), then a caption, with
    no image. With cfg.lm_context the scene comes in words where its image will later be
    (shapes.describe, before the first question), so the LLM learns to answer by reading its
    context: the skill a pretrained LLM brings to LLaVA, which leaves the projector only the
    job of making the picture readable. Without it, the answers can only come from the prior."""
    turns = instruct_turns(scene, rng, cfg.instruct_turns) + [("Describe the image.", shapes.caption(scene, rng))]
    if cfg.lm_context:
        turns[0] = (shapes.describe(scene) + "\n" + turns[0][0], turns[0][1])
    return turns


def scene_cells(tok, scene, width=12):
    """(1, 9, width) word ids of each 3x3 cell: its region's words, then its object's size, colour, shape; -1 pads."""
    cells = torch.full((1, 9, width), -1, dtype=torch.long)
    for k in range(9):
        words = " " + shapes.REGIONS[k]
        for o in scene.objects:
            if o.region == k:
                words += f" {o.size} {o.colour} {o.shape}"
        ids = tok.encode(words)[:width]
        cells[0, k, :len(ids)] = torch.tensor(ids)
    return cells


def vlm_batch(cfg, tok, stage, step, micro, image_tokens, batch_size, split="train", share=None):
    """lm: text only (conversations without the image); align: image -> caption;
    instruct: multi-turn visual conversations, two_image_share of them about two images.
    share: which of the batch_size samples to build (default all)."""
    world, samples = world_config(cfg), []
    for i in range(batch_size) if share is None else share:
        index, rng = scene_rng(cfg, stage, step, micro, i)
        scene = shapes.make_scene(split, index, world)
        if stage == "lm" and __import__("os").environ.get("SCENE_TOKENS"):
            turns = instruct_turns(scene, rng, cfg.instruct_turns) + [("Describe the image.", shapes.caption(scene, rng))]
            ids, labels, _ = fit_messages(tok, chat_messages(turns, 1), [image_tokens], cfg.max_seq_len)
            sample = {"input_ids": ids, "labels": labels, "images": scene_cells(tok, scene)}
            if not __import__("os").environ.get("LM_ANSWERS"):
                sample["labels"] = list(sample["input_ids"])
            samples.append(sample)
        elif stage == "lm":
            sample = fit_turns(tok, [], lm_turns(scene, rng, cfg), image_tokens, cfg)
            if not __import__("os").environ.get("LM_ANSWERS"):
                sample["labels"] = list(sample["input_ids"])  # language modelling: every token is a target
            samples.append(sample)
        elif stage == "align":
            turns = [(rng.choice(CAPTION_PROMPTS), shapes.caption(scene, rng))]
            samples.append(fit_turns(tok, [scene], turns, image_tokens, cfg))
        elif cfg.two_image_share > 0 and rng.random() < cfg.two_image_share:  # (a default run draws as before)
            first, second, questions = shapes.two_image_pair(split, index, world)
            turns = [(q, a) for _, q, a in rng.sample(questions, len(questions))]
            samples.append(fit_turns(tok, [first, second], turns, image_tokens, cfg))
        else:
            turns = instruct_turns(scene, rng, cfg.instruct_turns, focus_types(cfg))
            samples.append(fit_turns(tok, [scene], turns, image_tokens, cfg))
    for s in samples:  # only a first turn longer than the context is still cut
        s["input_ids"], s["labels"] = s["input_ids"][: cfg.max_seq_len], s["labels"][: cfg.max_seq_len]
    return data.collate(samples, tok.pad_id)


# -----------------------------------------------------------------------------
# your own data's batches: rows of LLaVA files (user_data.Row), read from disk

def row_indices(cfg, stage, step, micro, batch_size, n_rows):
    """Which rows a micro-batch reads: the run's k-th sample is row order[k % n_rows] of
    epoch k // n_rows, each epoch a seeded shuffle. Every row is seen once per epoch, and a
    batch is still a pure function of (stage, step, micro), like scene_rng's."""
    start = (step * cfg.grad_accum + micro) * batch_size
    orders = {}
    for k in range(start, start + batch_size):
        epoch = k // n_rows
        if epoch not in orders:
            orders[epoch] = random.Random(f"{cfg.seed}/{stage}/{epoch}").sample(range(n_rows), n_rows)
    return [orders[k // n_rows][k % n_rows] for k in range(start, start + batch_size)]


def row_images(paths, cfg):
    """A row's images read from disk and preprocessed: (n, 3, S, S), or None for none."""
    return torch.stack([data.preprocess(data.load_image(p), cfg.image_size) for p in paths]) if paths else None


def user_clip_batch(cfg, tok, rows, step, micro, share=None):
    """Image-caption pairs from your caption rows: each row's image and its first answer.
    share: which of the clip_batch_size samples to build (default all)."""
    indices = row_indices(cfg, "clip", step, micro, cfg.clip_batch_size, len(rows))
    chosen = [rows[indices[i]] for i in (range(len(indices)) if share is None else share)]
    return {"images": torch.cat([row_images(r.images, cfg) for r in chosen]),                    # (B, 3, S, S)
            "ids": clip_tokenize(tok, [r.messages[1]["content"] for r in chosen], cfg.context_length)}


def rows_batch(cfg, tok, stage, rows, indices, image_tokens):
    """The rows[indices] as a batch. lm: a row's text without its images, every token a
    target; align: a caption row's first exchange; instruct: a whole conversation with its
    images, cut at a turn boundary (the images of the turns cut go too)."""
    samples = []
    for row in (rows[k] for k in indices):
        if stage == "lm":
            ids, _, _ = fit_messages(tok, data.without_images(row.messages), image_tokens, cfg.max_seq_len)
            samples.append({"input_ids": ids, "labels": list(ids), "images": None})
            continue
        messages = row.messages[:2] if stage == "align" else row.messages
        inputs = [data.image_input(tok, data.load_image(p), cfg.image_size, image_tokens, tile_grids(cfg))
                  for p in row.images[:data.count_images(messages)]]  # [(views, block ids)], tiled or not
        ids, labels, n = fit_messages(tok, messages, [block for _, block in inputs], cfg.max_seq_len)
        kept = inputs[:data.count_images(messages[:n])]  # the images of the cut turns go too
        images = torch.cat([views for views, _ in kept]) if kept else None  # (V, 3, S, S)
        samples.append({"input_ids": ids, "labels": labels, "images": images})
    return data.collate(samples, tok.pad_id)


def user_vlm_batch(cfg, tok, stage, rows, step, micro, image_tokens, batch_size, share=None):
    """A micro-batch of your rows for lm, align or instruct (rows_batch), the rows that
    row_indices puts there. share: which of the batch_size samples to build (default all)."""
    indices = row_indices(cfg, stage, step, micro, batch_size, len(rows))
    return rows_batch(cfg, tok, stage, rows, indices if share is None else [indices[i] for i in share], image_tokens)


# -----------------------------------------------------------------------------
# the stream of micro-batches the training loop reads

class MicroBatches(torch.utils.data.Dataset):
    """Item i is the batch of the i-th (step, micro) pair: get_batch stays the pure function of
    (step, micro) it is; only which process calls it, and when, changes."""

    def __init__(self, get_batch, pairs):
        self.get_batch, self.pairs = get_batch, pairs

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        return self.get_batch(*self.pairs[i])


def micro_batches(get_batch, steps, cfg, device):
    """Every micro-batch get_batch(step, micro) of `steps`, in training order. With no data
    workers (the CPU default) a plain generator builds each one when the loop asks for it:
    the model needs every core there, a batch costs 1.5-10 % of a step (bench.py, column
    data%), and a debugger steps from the loop straight into the batch builder. With
    data_workers > 0 (2 by default on CUDA) a DataLoader's worker processes render them ahead
    of the GPU into pinned (page-locked) memory, whose copy to the GPU runs asynchronously
    (non_blocking=True)."""
    cuda = device.startswith("cuda")
    workers = cfg.data_workers if cfg.data_workers >= 0 else 2 if cuda else 0
    pairs = [(step, micro) for step in steps for micro in range(cfg.grad_accum)]
    if workers == 0:
        return (get_batch(step, micro) for step, micro in pairs)
    loader = torch.utils.data.DataLoader(
        MicroBatches(get_batch, pairs), batch_size=None, num_workers=workers, pin_memory=cuda, prefetch_factor=4,
        # fork: each worker starts as a copy of this process, tokenizer and rows included, with nothing to pickle
        multiprocessing_context="fork",
        # its own generator: the loader draws a worker seed, which must not move torch's global RNG
        generator=torch.Generator().manual_seed(cfg.seed))
    return iter(loader)
