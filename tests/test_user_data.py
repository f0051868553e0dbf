"""Tests for user_data.py: LLaVA files, JSON and JSONL alike, every kind of bad row under its
reason, malformed JSON; then your data in a run: short runs of every stage on a folder of
mixed image formats with broken rows, captions alone, conversations alone with --vision_from,
held-out rows, the refusals, and the export read back to the conversations the stages build.
Run: python -m pytest -q tests/test_user_data.py"""
import collections
import io
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import batches
import data
import evaluate
import shapes
import train
import user_data
from checkpoint import load_checkpoint
from flags import ConfigError, parse_flags
from tokenizer import Tokenizer
from train import Config, PRESETS

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- LLaVA files -> rows


def turn(speaker, value):
    return {"from": speaker, "value": value}


def qa(question, answer, image=True):
    return [turn("human", f"<image>\n{question}" if image else question), turn("gpt", answer)]


def write_json(path, rows):
    path.write_text(json.dumps(rows))
    return path


def test_json_and_jsonl_give_the_same_rows_and_paths_resolve(mixed_images, tmp_path):
    """A JSON list and the same rows as JSONL load alike; `image` is one path or a list;
    relative paths resolve under --image_folder (default: the file's own folder), absolute
    ones stay; a row without an id gets its position; turns become chat messages."""
    folder, names = mixed_images
    raw = [{"id": "a", "image": names[0], "conversations": qa("What is it?", "red")},
           {"image": [names[1], str(folder / names[2])],
            "conversations": qa("First?", "one") + [turn("human", "<image>\nSecond?"), turn("gpt", "two")]},
           {"id": 7, "conversations": qa("Text only?", "yes", image=False)}]
    as_json = write_json(tmp_path / "rows.json", raw)
    as_jsonl = tmp_path / "rows.jsonl"
    as_jsonl.write_text("\n".join(__import__("json").dumps(r) for r in raw) + "\n\n")   # blank lines are fine
    rows, skipped = user_data.load_llava(as_json, folder)
    assert skipped == {} and user_data.load_llava(as_jsonl, folder) == (rows, {})
    assert [r.id for r in rows] == ["a", 1, 7]
    assert rows[0].images == [folder / names[0]] and rows[1].images == [folder / names[1], folder / names[2]]
    assert rows[2].images == []
    assert rows[1].messages == [{"role": "user", "content": "<image>\nFirst?"}, {"role": "assistant", "content": "one"},
                                {"role": "user", "content": "<image>\nSecond?"}, {"role": "assistant", "content": "two"}]
    # default image folder: the data file's own folder
    beside = write_json(folder / "beside.json", raw[:1])
    assert user_data.load_llava(beside)[0][0].images == [folder / names[0]]


def test_every_image_format_and_mode_in_a_row_is_usable(mixed_images):
    folder, names = mixed_images
    rows, skipped = user_data.load_llava(write_json(folder / "all.json", [
        {"id": n, "image": n, "conversations": qa("What is it?", "a picture")} for n in names]))
    assert skipped == {} and [r.id for r in rows] == names
    for row in rows:
        img = data.load_image(row.images[0])
        assert img.mode == "RGB" and img.size == Image.open(row.images[0]).size
    assert data.load_image(folder / "first_frame.gif").getpixel((0, 0)) == (30, 30, 200)   # frame 0, not the black one


def broken_rows(folder, good_image):
    """{id: row} of one row per reason a row is refused, with the reason expected."""
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "png")
    (folder / "cut.png").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
    ok = qa("What is it?", "a shape")
    return [
        ("not_an_object", ["a", "list"], user_data.MALFORMED),
        ("no_conversations", {"id": "no_conversations", "image": good_image}, user_data.MALFORMED),
        ("value_not_text", {"id": "value_not_text", "conversations": [turn("human", 3), turn("gpt", "x")]}, user_data.MALFORMED),
        ("image_not_a_path", {"id": "image_not_a_path", "image": {"a": 1}, "conversations": ok}, user_data.MALFORMED),
        ("no_turns", {"id": "no_turns", "image": good_image, "conversations": []}, user_data.EMPTY_TURN),
        ("empty_answer", {"id": "empty_answer", "image": good_image, "conversations": qa("Q?", "  ")}, user_data.EMPTY_TURN),
        ("gpt_first", {"id": "gpt_first", "image": good_image, "conversations": ok[::-1]}, user_data.NOT_ALTERNATING),
        ("two_humans", {"id": "two_humans", "image": good_image,
                        "conversations": [ok[0], turn("human", "again?"), ok[1]]}, user_data.NOT_ALTERNATING),
        ("ends_with_question", {"id": "ends_with_question", "image": good_image,
                                "conversations": ok + [turn("human", "And?")]}, user_data.NOT_ALTERNATING),
        ("unknown_speaker", {"id": "unknown_speaker", "image": good_image,
                             "conversations": [ok[0], turn("system", "x")]}, user_data.NOT_ALTERNATING),
        ("no_marker", {"id": "no_marker", "image": good_image, "conversations": qa("Q?", "A", image=False)},
         user_data.MARKER_COUNT),
        ("two_markers_one_image", {"id": "two_markers_one_image", "image": [good_image],
                                   "conversations": [turn("human", "<image><image>\nQ?"), turn("gpt", "A")]},
         user_data.MARKER_COUNT),
        ("missing", {"id": "missing", "image": "nowhere.png", "conversations": ok}, user_data.MISSING_IMAGE),
        ("corrupt", {"id": "corrupt", "image": "corrupt.png", "conversations": ok}, user_data.UNREADABLE_IMAGE),
        ("truncated", {"id": "truncated", "image": ["cut.png"], "conversations": ok}, user_data.UNREADABLE_IMAGE),
    ]


def test_every_kind_of_bad_row_is_skipped_and_reported_by_reason(mixed_images):
    """One bad row of every kind between good rows: the good rows load in order, each bad
    one is counted under its own reason (the first check it fails), and one line reports it."""
    folder, names = mixed_images
    bad = broken_rows(folder, names[0])
    good = [{"id": f"good{k}", "image": names[k], "conversations": qa("What is it?", "a shape")} for k in range(3)]
    rows, skipped = user_data.load_llava(write_json(folder / "mixed.json", good[:1] + [r for _, r, _ in bad] + good[1:]))
    assert [r.id for r in rows] == ["good0", "good1", "good2"]
    expected = collections.defaultdict(list)
    for position, (row_id, _, reason) in enumerate(bad, start=1):
        expected[reason].append(position if row_id == "not_an_object" else row_id)
    assert skipped == dict(expected)
    report = user_data.report_rows(len(rows), skipped, max_ids=2)
    assert report.startswith(f"3 of {3 + len(bad)} rows usable; skipped {len(bad)}: ")
    assert "\n" not in report
    assert f"{user_data.MALFORMED} 4 (ids 1, no_conversations, ...)" in report
    assert f"{user_data.MISSING_IMAGE} 1 (ids missing)" in report
    # a question file may end with the question (open_end): that row is then usable
    open_rows, open_skipped = user_data.load_llava(folder / "mixed.json", open_end=True)
    assert "ends_with_question" in [r.id for r in open_rows] and "ends_with_question" not in sum(open_skipped.values(), [])


def test_malformed_json_is_one_line_naming_file_line_and_column(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[\n {"id": 1, "conversations": []},\n {"id": 2 "conversations": []}\n]')
    with pytest.raises(data.DataError, match=r"broken\.json: line 3, column 11: invalid JSON \(Expecting ','"):
        user_data.load_llava(broken)
    lines = tmp_path / "broken.jsonl"
    lines.write_text('{"id": 1, "conversations": []}\n\n{"id": 2, "conversations": [}\n')
    with pytest.raises(data.DataError, match=r"broken\.jsonl: line 3, column 29: invalid JSON"):
        user_data.load_llava(lines)
    one_object = write_json(tmp_path / "object.json", {"id": 1, "conversations": []})
    with pytest.raises(data.DataError, match="expected a JSON list of rows .* found a JSON dict"):
        user_data.load_llava(one_object)
    (tmp_path / "latin1.json").write_bytes('[{"id": "caf\xe9"}]'.encode("latin-1"))
    with pytest.raises(data.DataError, match="not UTF-8"):
        user_data.load_llava(tmp_path / "latin1.json")
    with pytest.raises(data.DataError, match="no such file"):
        user_data.load_llava(tmp_path / "absent.json")
    assert issubclass(data.ImageError, data.DataError)   # one except clause catches both


def test_llava_row_and_save_round_trip(tmp_path):
    """What the export writes (llava_row + save_llava) reads back as the same messages."""
    messages = [{"role": "user", "content": "<image>\nA?"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "<image> and c?"}, {"role": "assistant", "content": "d"}]
    text_only = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    Image.new("RGB", (4, 4)).save(tmp_path / "x.png")
    for name in ("out.json", "out.jsonl"):
        user_data.save_llava(tmp_path / name, [user_data.llava_row("r1", ["x.png", "x.png"], messages),
                                               user_data.llava_row("r2", [], text_only)])
        rows, skipped = user_data.load_llava(tmp_path / name)
        assert skipped == {} and [r.id for r in rows] == ["r1", "r2"]
        assert rows[0].messages == messages and rows[0].images == [tmp_path / "x.png"] * 2
        assert rows[1].messages == text_only and rows[1].images == []
    assert "image" not in user_data.llava_row("r", [], messages) and user_data.llava_row("r", ["a"], messages)["image"] == "a"


# ----------------------------------------------------------------------------- your data in a run


def test_mixed_folder_with_broken_rows_trains_on_the_good_rows_and_reports_the_bad(user_files, capsys, monkeypatch):
    """Every stage trains on a folder of JPEG/PNG/RGBA/greyscale/palette/16-bit/GIF/WebP/BMP
    images of different sizes; each file's bad rows are reported once, by reason, in one
    line; metrics.json holds the held-out figures (and none of the shapes world's)."""
    seen = {}
    train_loop = train.train_loop
    monkeypatch.setattr(train, "train_loop", lambda *a, **k: seen.setdefault(k["name"], train_loop(*a, **k)))
    train.main([*user_files.run_flags, f"--caption_data={user_files.captions}", f"--instruct_data={user_files.instruct}",
                f"--out_dir={user_files.out}"])
    out = capsys.readouterr().out
    n = len(user_files.names)
    reports = [line for line in out.splitlines() if line.startswith(str(user_files.folder))]
    assert reports == [
        f"{user_files.captions}: {n} of {n + 3} rows usable; skipped 3: {user_data.MISSING_IMAGE} 1 (ids c_missing); "
        f"{user_data.NOT_ONE_IMAGE} 1 (ids c_two_images); {user_data.FIRST_EXCHANGE_TOO_LONG} 1 (ids c_too_long); 2 held out for scoring",
        f"{user_files.instruct}: {n + 1} of {n + 3} rows usable; skipped 2: {user_data.MARKER_COUNT} 1 (ids i_no_marker); "
        f"{user_data.MISSING_IMAGE} 1 (ids i_missing); 2 held out for scoring"]
    assert set(seen) == set(train.STAGES) and all(len(v) == 2 and all(map(math.isfinite, v)) for v in seen.values())
    metrics = json.loads((user_files.out / "metrics.json").read_text())
    assert {"clip_retrieval_r1", "clip_retrieval_r5", "lm_val_loss", "vqa_acc"} <= set(metrics)
    assert not {"clip_zero_shot_acc", "pope_random_acc", "caption_acc", "grounding_acc"} & set(metrics)
    assert sorted(p.name for p in user_files.out.glob("*.pt")) == ["align.pt", "clip.pt", "instruct.pt", "lm.pt"]



def test_held_out_rows_never_train_and_every_row_trains_once_per_epoch(user_files):
    cfg, tok, user = user_files.load("--holdout=3")
    for kind in ("pairs", "conversations"):
        train_ids = {r.id for r in user.rows(kind)}
        held_ids = {r.id for r in user.rows(kind, held_out=True)}
        assert len(held_ids) == 3 and not train_ids & held_ids
    n = len(user.rows("conversations"))
    epoch = [k for step in range(n) for k in batches.row_indices(cfg, "instruct", step, 0, 1, n)]
    assert sorted(epoch) == list(range(n))                        # one epoch: every row exactly once
    assert batches.row_indices(cfg, "instruct", 5, 0, 4, n) == batches.row_indices(cfg, "instruct", 5, 0, 4, n)
    assert batches.row_indices(cfg, "instruct", 0, 0, n, n) != batches.row_indices(cfg, "instruct", 1, 0, n, n)  # reshuffled
    # lm reads the text of both files' training rows, nothing held out
    assert {r.id for r in user.rows("text")} == {r.id for r in user.rows("pairs")} | {r.id for r in user.rows("conversations")}


def test_user_data_refusals(user_files, tmp_path):
    with pytest.raises(ConfigError, match="--holdout=9 leaves none of the 9 usable rows of .*captions.json"):
        user_files.load("--holdout=9")
    for flags, message in ([["--image_folder=x"], "--image_folder is for"], [["--holdout=-1"], "--holdout must be >= 0"],
                           [["--instruct_data=x.json"], "--instruct_data without --caption_data"],
                           [["--caption_data=x.json", "--vision_from=x.pt", "--stage=clip"], "nothing to train"]):
        with pytest.raises(ConfigError, match=message):
            user_data.check_data_flags(parse_flags(Config, flags, PRESETS))
    user_data.check_data_flags(parse_flags(Config, ["--instruct_data=x.json", "--stage=instruct"], PRESETS))  # align.pt exists


def run_train(*args):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("flags, message", [
    (["--instruct_data=INSTRUCT"], "--instruct_data without --caption_data"),
    (["--caption_data=BROKEN"], "no usable row (0 of 3 rows usable; skipped 3: missing image 2 (ids a, b); "),
    (["--caption_data=NOTJSON"], "notjson.json: line 1, column 3: invalid JSON"),
])
def test_data_mistakes_stop_before_any_training_in_one_line(user_files, flags, message):
    (user_files.folder / "broken.json").write_text(json.dumps(
        [user_files.llava("a", "gone.png", ("<image>\nQ", "A")), user_files.llava("b", "gone2.png", ("<image>\nQ", "A")),
         user_files.llava("c", [], ("Q", "A"))]))
    (user_files.folder / "notjson.json").write_text("[{oops}]")
    flags = [f.replace("INSTRUCT", str(user_files.instruct)).replace("BROKEN", str(user_files.folder / "broken.json"))
             .replace("NOTJSON", str(user_files.folder / "notjson.json")) for f in flags]
    r = run_train(*user_files.run_flags, *flags, f"--out_dir={user_files.out}")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error:"), r.stderr
    assert message in r.stderr, r.stderr
    assert not list(user_files.out.glob("*.pt")) and "step" not in r.stdout


def test_captions_only_then_instructions_only_from_vision_from(user_files, monkeypatch):
    """Captions alone: instruct trains on them as one-turn conversations. Instructions alone,
    with --vision_from=an earlier align.pt: clip does not run, align takes that ViT and
    projector as they are (0 steps), instruct trains its projector from there, ViT frozen.
    A --vision_from without a ViT (an lm.pt) is refused before anything trains."""
    seen = {}
    train_loop = train.train_loop

    def recording(model, get_batch, loss_fn, **kwargs):
        seen[kwargs["name"]] = get_batch(0, 0) if kwargs["steps"] else None
        return train_loop(model, get_batch, loss_fn, **kwargs)
    monkeypatch.setattr(train, "train_loop", recording)
    first = user_files.out / "captions_only"
    train.main([*user_files.run_flags, f"--caption_data={user_files.captions}", f"--out_dir={first}"])
    tok = Tokenizer.from_state(load_checkpoint(str(first / "instruct.pt"))["tokenizer"])
    prompts = {tok.decode(ids).split("user\n")[1].split("<|im_end|>")[0].replace("<|image|>", "")
               for ids in seen["instruct"]["input_ids"]}
    assert prompts == {"\nDescribe the image briefly."}     # the caption rows, one turn each
    assert "vqa_acc" in json.loads((first / "metrics.json").read_text())

    seen.clear()
    wrong = user_files.out / "wrong_vision"
    with pytest.raises(ConfigError, match="a 'lm' checkpoint holds no vision weights"):
        train.main([*user_files.run_flags, f"--instruct_data={user_files.instruct}", f"--vision_from={first / 'lm.pt'}",
                    f"--out_dir={wrong}"])
    assert seen == {} and not list(wrong.glob("*.pt"))   # refused before anything trained
    second = user_files.out / "instructions_only"
    train.main([*user_files.run_flags, f"--instruct_data={user_files.instruct}", f"--vision_from={first / 'align.pt'}",
                f"--out_dir={second}"])
    assert "clip" not in seen and seen["align"] is None and seen["instruct"] is not None
    assert sorted(p.name for p in second.glob("*.pt")) == ["align.pt", "instruct.pt", "lm.pt"]
    start = load_checkpoint(str(first / "align.pt"))["model"]
    align, instruct = (load_checkpoint(str(second / f"{s}.pt"))["model"] for s in ("align", "instruct"))
    towers = lambda state, prefix: {k: v for k, v in state.items() if k.startswith(prefix)}
    for prefix in ("vision.", "projector."):
        assert all(torch.equal(v, start[k]) for k, v in towers(align, prefix).items()) and towers(align, prefix)
    assert all(torch.equal(v, start[k]) for k, v in towers(instruct, "vision.").items())
    assert not all(torch.equal(v, start[k]) for k, v in towers(instruct, "projector.").items())


def test_export_round_trips_to_the_same_conversations(tmp_path):
    """--export writes LLaVA rows that load back (user_data.load_llava) to exactly the conversations
    the stages build from the same scenes, with images equal to the rendered scenes (PNG is
    lossless); questions.json is evaluate.vqa_items without grounding, answer last."""
    flags = ["--config=tiny", f"--export={tmp_path}", "--export_scenes=6", "--eval_questions=14", "--eval_grounding=3"]
    train.main(flags)
    cfg, world = parse_flags(Config, flags, PRESETS), batches.world_config(parse_flags(Config, flags, PRESETS))
    raw = json.loads((tmp_path / "captions.json").read_text())
    assert list(raw[0]) == ["id", "image", "conversations"] and raw[0]["image"] == "images/train_000000.png"
    assert [t["from"] for t in raw[0]["conversations"]] == ["human", "gpt"]
    loaded = {name: user_data.load_llava(tmp_path / name) for name in ("captions.json", "instruct.json", "questions.json")}
    assert all(skipped == {} for _, skipped in loaded.values())
    (captions, _), (instruct, _), (questions, _) = loaded.values()
    assert len(captions) == len(instruct) == 6
    pixels = lambda path: np.asarray(data.load_image(path))
    for i in range(6):
        scene, rng = shapes.make_scene("train", i, world), random.Random(f"{cfg.seed}/export/{i}")
        caption = [(rng.choice(batches.CAPTION_PROMPTS), shapes.caption(scene, rng))]
        assert captions[i].messages == batches.chat_messages(caption)
        assert instruct[i].messages == batches.chat_messages(batches.instruct_turns(scene, rng, cfg.instruct_turns))
        assert captions[i].images == instruct[i].images
        assert np.array_equal(pixels(captions[i].images[0]), np.asarray(shapes.render(scene)))
    expected = [item for item in evaluate.vqa_items(cfg) if item[1] != "grounding"]
    assert len(questions) == len(expected) == 14
    for row, (scene, qtype, question, answer) in zip(questions, expected):
        assert row.messages == batches.chat_messages([(question, answer)]) and row.id.endswith(qtype)
        assert np.array_equal(pixels(row.images[0]), np.asarray(shapes.render(scene)))
