"""Tests for batches.py. The batches are checked by parsing the token stream independently of
the chat template code and by re-deriving answers from the scene; your rows' batches against
the rows they come from; a rank's share of a batch against the same samples of the whole
batch; the stream built in DataLoader workers against the one built in the loop.
Run: python -m pytest -q tests/test_batches.py"""
import re
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

import batches
import data
import evaluate
import shapes
import train
from checkpoint import get_tokenizer
from clip import tokenize as clip_tokenize
from flags import ConfigError, parse_flags
from model import VLM
from train import Config, PRESETS

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny config with a context long enough that no conversation is cut, and its tokenizer."""
    out = tmp_path_factory.mktemp("world")
    cfg = parse_flags(Config, ["--config=tiny", "--out_dir", str(out), "--max_seq_len=1024"], PRESETS)
    return cfg, get_tokenizer(cfg)


def rows(batch):
    """Each row's real tokens and labels (right padding removed)."""
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        n = int(mask.sum())
        assert bool(mask[:n].all()), "training batches are right-padded"
        yield ids[:n].tolist(), labels[:n].tolist()


def turns(tok, ids):
    """Parse the token stream without data.encode_chat: [(role, start, end)] for every turn,
    with [start, end) the body after the '<|im_start|>role\\n' header, <|im_end|> included."""
    out, t = [], 0
    headers = {role: [tok.im_start_id] + tok.encode(role + "\n") for role in ("user", "assistant")}
    while t < len(ids):
        role = next((r for r, h in headers.items() if ids[t:t + len(h)] == h), None)
        if role is None:
            t += 1
            continue
        start = t + len(headers[role])
        end = ids.index(tok.im_end_id, start) + 1
        out.append((role, start, end))
        t = end
    return out


def check_labels_are_exactly_the_answers(tok, ids, labels):
    """Labels equal the ids on every assistant body (answer + <|im_end|>), -100 elsewhere.
    Returns [(question, answer)] decoded from the row."""
    parsed = turns(tok, ids)
    assert [r for r, _, _ in parsed] == ["user", "assistant"] * (len(parsed) // 2) and parsed
    expected = [-100] * len(ids)
    for role, s, e in parsed:
        if role == "assistant":
            expected[s:e] = ids[s:e]
            assert ids[e - 1] == tok.im_end_id and e - 1 > s     # a non-empty answer, then <|im_end|>
    assert labels == expected
    text = lambda s, e: tok.decode([i for i in ids[s:e - 1] if i != tok.image_id])
    return [(text(*q[1:]).strip(), text(*a[1:])) for q, a in zip(parsed[::2], parsed[1::2])]


def scene_of(cfg, stage, step, i):
    index, _ = batches.scene_rng(cfg, stage, step, 0, i)
    return shapes.make_scene("train", index, batches.world_config(cfg))


def test_align_labels_are_the_caption_of_the_sample_own_image(world):
    cfg, tok = world
    n_img = 16
    batch = batches.vlm_batch(cfg, tok, "align", 3, 0, n_img, 6)
    for i, (ids, labels) in enumerate(rows(batch)):
        ((question, caption),) = check_labels_are_exactly_the_answers(tok, ids, labels)
        assert question in batches.CAPTION_PROMPTS
        assert ids.count(tok.image_id) == n_img
        scene = scene_of(cfg, "align", 3, i)
        # the labelled caption names exactly this sample's objects, and its image is this scene
        assert evaluate.caption_correct(caption, scene), (caption, scene)
        assert torch.equal(batch["images"][i], data.preprocess(shapes.render(scene), cfg.image_size))


def test_instruct_labels_are_answers_about_the_sample_own_image(world):
    cfg, tok = world
    n_img = 16
    batch = batches.vlm_batch(cfg, tok, "instruct", 0, 0, n_img, 8)
    checked = 0
    for i, (ids, labels) in enumerate(rows(batch)):
        qa = check_labels_are_exactly_the_answers(tok, ids, labels)
        parsed = turns(tok, ids)
        image_turns = [ids[s:e].count(tok.image_id) for _, s, e in parsed]
        assert image_turns == [n_img] + [0] * (len(parsed) - 1)      # the image is in the first user turn only
        scene = scene_of(cfg, "instruct", 0, i)
        assert torch.equal(batch["images"][i], data.preprocess(shapes.render(scene), cfg.image_size))
        present = {(o.colour, o.shape) for o in scene.objects}
        for question, answer in qa:
            assert answer and "<|" not in answer
            # answers that can be re-derived from the scene by hand
            if question in ("How many shapes are there?", "How many objects are in the image?", "Count the shapes."):
                assert answer == str(len(scene.objects)), (question, answer)
                checked += 1
            m = re.fullmatch(r"(?:Is there|Does the image contain|Can you see) an? (\w+) (\w+)(?: in the image)?\?", question)
            if m:
                assert answer == ("yes" if (m[1], m[2]) in present else "no"), (question, answer, present)
                checked += 1
    assert checked >= 8   # not vacuous: at least one POPE-style probe per row, plus counts


@pytest.mark.parametrize("tile_grids", ["", "2x2"])
def test_two_image_samples_put_each_image_in_its_own_block_in_order(world, tile_grids):
    """With two_image_share, some instruct rows hold a pair (shapes.two_image_pair) and its
    questions: the images tensor lists each row's views in order (first image, second image;
    with tiling each image's global view then its tiles), the prompt has one block per image
    (tagged <global_image>, <row_i_col_j> when tiled), the labels are the pair's answers, and
    VLM.embed writes view k's visual tokens over the k-th block of slots of the batch."""
    cfg, tok = world
    cfg = replace(cfg, two_image_share=0.5, tile_grids=tile_grids, projector="resampler", resampler_queries=4)
    n_img = 4  # the resampler's visual tokens per view
    batch = batches.vlm_batch(cfg, tok, "instruct", 0, 0, n_img, 8)
    views_per_image = 5 if tile_grids else 1
    view = lambda scene: (data.tile_views(shapes.render(scene), cfg.image_size, (2, 2)) if tile_grids
                          else data.preprocess(shapes.render(scene), cfg.image_size)[None])
    k, n_pairs = 0, 0
    for i, (ids, labels) in enumerate(rows(batch)):
        qa = check_labels_are_exactly_the_answers(tok, ids, labels)
        n_images = ids.count(tok.image_id) // (n_img * views_per_image)
        index, _ = batches.scene_rng(cfg, "instruct", 0, 0, i)
        if n_images == 2:
            first, second, questions = shapes.two_image_pair("train", index, batches.world_config(cfg))
            asked = [(q.split("\n")[-1], a) for q, a in qa]  # the text after the image blocks and their tags
            assert sorted(asked) == sorted((q, a) for _, q, a in questions)
            scenes, n_pairs = [first, second], n_pairs + 1
        else:
            scenes = [scene_of(cfg, "instruct", 0, i)]
        block = data.image_block(tok, n_img, (2, 2) if tile_grids else None)
        user = ids[turns(tok, ids)[0][1]:]
        assert user[:len(block) * len(scenes) + len(scenes)] == sum(([*block] + tok.encode("\n") for _ in scenes), [])
        for scene in scenes:
            assert torch.equal(batch["images"][k:k + views_per_image], view(scene))
            k += views_per_image
    assert k == len(batch["images"]) and 0 < n_pairs < 8
    torch.manual_seed(0)
    model = VLM(train.vlm_config(cfg, tok))
    with torch.no_grad():
        embeds, visual = model.embed(batch["input_ids"], batch["images"]), model.encode_images(batch["images"])
    slots = (batch["input_ids"] == tok.image_id).nonzero().tolist()  # (row, position), row-major order
    assert len(slots) == visual.shape[0] * n_img
    for s, (b, t) in enumerate(slots):  # the s-th slot of the batch holds token s % N' of view s // N'
        assert torch.equal(embeds[b, t], visual[s // n_img, s % n_img])


def test_a_focused_instruct_run_asks_only_its_question_types(world):
    cfg, tok = world
    cfg = replace(cfg, question_types="colour,shape")
    batch = batches.vlm_batch(cfg, tok, "instruct", 0, 0, 16, 8)
    answers = [a for ids, labels in rows(batch) for _, a in check_labels_are_exactly_the_answers(tok, ids, labels)]
    assert len(answers) >= 8 and set(answers) <= set(shapes.COLOURS) | set(shapes.SHAPES)
    with pytest.raises(ValueError, match="unknown colours; valid: colour, shape"):
        batches.focus_types(replace(cfg, question_types="colours"))
    with pytest.raises(ConfigError, match="unknown size2"):   # on the command line: one line, before any training
        train.main(["--config=tiny", "--question_types=size2", f"--out_dir={cfg.out_dir}"])


def test_lm_batch_labels_every_token_and_has_no_image(world):
    """lm is plain language modelling: every real token is a target, padding none, no image."""
    cfg, tok = world
    batch = batches.vlm_batch(cfg, tok, "lm", 0, 0, 16, 6)
    assert batch["images"] is None and not bool((batch["input_ids"] == tok.image_id).any())
    mask = batch["attention_mask"].bool()
    assert torch.equal(batch["labels"], torch.where(mask, batch["input_ids"], torch.full_like(mask, -100, dtype=torch.long)))
    assert bool((~mask).any())   # there is padding, and it carries no label


def test_a_cut_conversation_ends_at_a_turn_boundary(world):
    cfg, tok = world
    cfg = parse_flags(Config, ["--config=tiny", "--out_dir", cfg.out_dir, "--max_seq_len=100"], PRESETS)
    batch = batches.vlm_batch(cfg, tok, "instruct", 0, 0, 16, 8)
    assert int(batch["attention_mask"].sum(1).max()) <= cfg.max_seq_len
    for ids, labels in rows(batch):
        assert ids[-1 - len(tok.encode("\n")):] == [tok.im_end_id] + tok.encode("\n")
        check_labels_are_exactly_the_answers(tok, ids, labels)


def test_user_batches_carry_each_row_own_images_in_marker_order(user_files):
    """instruct: the two-image row's images come in <image> order, each block where its marker
    was, labels exactly on the answers; cut at a turn boundary, the cut turn's image goes too.
    clip: each row's image and caption. lm: text only, every token a target."""
    cfg, tok, user = user_files.load("--holdout=0")
    conversations = user.rows("conversations")
    pair = next(k for k, r in enumerate(conversations) if r.id == "pair")
    first, second = (data.preprocess(data.load_image(user_files.folder / user_files.names[k]), cfg.image_size) for k in (0, 3))
    n_img = 4
    batch = batches.rows_batch(cfg, tok, "instruct", conversations, [pair], n_img)
    ((ids, labels),) = list(rows(batch))
    assert torch.equal(batch["images"], torch.stack([first, second]))
    qa = check_labels_are_exactly_the_answers(tok, ids, labels)
    assert qa == [("What is the first?", "jpg"), ("And the second?", "png")]
    parsed = turns(tok, ids)
    assert [ids[s:e].count(tok.image_id) for _, s, e in parsed] == [n_img, 0, n_img, 0]
    # a context that holds only the first exchange: the second turn and its image are cut
    short = SimpleNamespace(**{**vars(cfg), "max_seq_len": len(ids) - 5})
    cut = batches.rows_batch(short, tok, "instruct", conversations, [pair], n_img)
    assert torch.equal(cut["images"], first[None]) and int(cut["attention_mask"].sum()) <= short.max_seq_len
    # clip: the image and the caption of each chosen row
    clip = batches.user_clip_batch(cfg, tok, user.rows("pairs"), 0, 0)
    chosen = [user.rows("pairs")[k] for k in batches.row_indices(cfg, "clip", 0, 0, cfg.clip_batch_size, len(user.rows("pairs")))]
    assert torch.equal(clip["images"][1], data.preprocess(data.load_image(chosen[1].images[0]), cfg.image_size))
    assert torch.equal(clip["ids"], clip_tokenize(tok, [r.messages[1]["content"] for r in chosen], cfg.context_length))
    # lm: no image, no image slot, no marker left in the text, every real token a target
    lm = batches.rows_batch(cfg, tok, "lm", conversations, [pair], n_img)
    assert lm["images"] is None and not bool((lm["input_ids"] == tok.image_id).any())
    assert "<image>" not in tok.decode(lm["input_ids"][0]) and torch.equal(lm["labels"], lm["input_ids"])


def test_user_images_are_tiled_when_the_model_tiles(user_files):
    """--tile_grids reaches your data too: each image of a row becomes data.image_input's views
    (the global view and its tiles) and tagged block, in marker order."""
    cfg, tok, user = user_files.load("--holdout=0", "--tile_grids=1x2,2x1", "--max_seq_len=1024")
    conversations = user.rows("conversations")
    pair = next(k for k, r in enumerate(conversations) if r.id == "pair")
    n_img = 4
    batch = batches.rows_batch(cfg, tok, "instruct", conversations, [pair], n_img)
    expected = [data.image_input(tok, data.load_image(p), cfg.image_size, n_img, ((1, 2), (2, 1)))
                for p in conversations[pair].images]
    assert torch.equal(batch["images"], torch.cat([views for views, _ in expected]))   # (2 x 3 views, 3, S, S)
    ids = batch["input_ids"][0].tolist()
    blocks = [block for _, block in expected]
    assert ids.count(tok.global_image_id) == 2 and ids.count(tok.image_id) == 2 * 3 * n_img
    starts = [k for k, t in enumerate(ids) if t == tok.global_image_id]
    assert [ids[s:s + len(b)] for s, b in zip(starts, blocks)] == blocks


# ----------------------------------------------------------------------------- a rank's share of a batch


def slice_of(batch, share):
    """Rows `share` of a right-padded batch, cut to their own longest row (as collate pads them)."""
    rows = list(share)
    mask = batch["attention_mask"][rows]
    width = int(mask.sum(1).max())
    return {k: batch[k][rows, :width] for k in ("input_ids", "attention_mask", "labels")}


def test_a_share_of_a_batch_is_the_same_samples_as_in_the_whole_batch(world):
    """Under torchrun rank r builds samples share = range(r·B/N, (r+1)·B/N) of every micro-batch:
    they must be the very samples (ids, labels, images) one process builds there, hard-negative
    twins of clip and two-image rows of instruct included."""
    cfg, tok = world
    cfg = replace(cfg, clip_hard_negative_prob=0.5, two_image_share=0.5, clip_batch_size=8)
    whole = batches.clip_batch(cfg, tok, 3, 1)
    for share in (range(0, 4), range(4, 8), range(5, 8)):
        part = batches.clip_batch(cfg, tok, 3, 1, share=share)
        assert torch.equal(part["images"], whole["images"][share.start:share.stop])
        ids = whole["ids"][share.start:share.stop]
        assert torch.equal(part["ids"], ids[:, :part["ids"].shape[1]]) and not ids[:, part["ids"].shape[1]:].ne(tok.pad_id).any()
    for stage in ("lm", "align", "instruct"):
        whole = batches.vlm_batch(cfg, tok, stage, 2, 0, 4, 6)
        views = 0
        for share in (range(0, 3), range(3, 6)):
            part = batches.vlm_batch(cfg, tok, stage, 2, 0, 4, 6, share=share)
            assert all(torch.equal(part[k], v) for k, v in slice_of(whole, share).items()), stage
            if part["images"] is not None:
                assert torch.equal(part["images"], whole["images"][views:views + len(part["images"])]), stage
                views += len(part["images"])


def test_a_share_of_your_rows_is_the_same_rows_as_in_the_whole_batch(user_files):
    cfg, tok, user = user_files.load("--holdout=0")
    rows = user.rows("conversations")
    whole = batches.user_vlm_batch(cfg, tok, "instruct", rows, 1, 0, 4, 4)
    part = batches.user_vlm_batch(cfg, tok, "instruct", rows, 1, 0, 4, 4, share=range(2, 4))
    assert all(torch.equal(part[k], v) for k, v in slice_of(whole, range(2, 4)).items())
    clip = batches.user_clip_batch(cfg, tok, user.rows("pairs"), 1, 0)
    half = batches.user_clip_batch(cfg, tok, user.rows("pairs"), 1, 0, share=range(0, 2))
    assert torch.equal(half["images"], clip["images"][:2])


# ----------------------------------------------------------------------------- the stream of micro-batches


def test_batches_built_in_dataloader_workers_are_those_built_in_the_loop(world):
    """--data_workers=2 (the CUDA default) builds the batches in two forked processes ahead of
    the step; with 0 (the CPU default) a plain generator builds each in the loop. A batch is a
    pure function of (stage, step, micro), so both streams hold the same batches, bit for bit,
    in the same order (grad_accum 2), and neither moves torch's global RNG."""
    cfg, tok = world
    get_batch = lambda step, micro: batches.vlm_batch(cfg, tok, "lm", step, micro, 16, 4)
    streams = {}
    for workers in (0, 2):
        rng = torch.get_rng_state()
        stream = batches.micro_batches(get_batch, range(1, 4), replace(cfg, grad_accum=2, data_workers=workers), "cpu")
        streams[workers] = list(stream)
        assert torch.equal(torch.get_rng_state(), rng)
    assert len(streams[0]) == 6 and streams[0][3]["input_ids"].shape[0] == 4
    for a, b in zip(streams[0], streams[2]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if a[k] is not None)
