"""generate.py: the command line around a checkpoint. A small untrained VLM is enough to
check the plumbing (loading from the checkpoint's own config, images from disk, chat
history, error handling); whether answers are right is train.py's and evaluate.py's test."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import batches
import data
import evaluate
import generate
import shapes
import train
from checkpoint import load_checkpoint, save_checkpoint
from flags import ConfigError
from tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent


def run(*args, stdin=""):
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *args], input=stdin, text=True,
                          capture_output=True, cwd=ROOT, timeout=120)


def test_answer_from_a_png_on_disk_equals_the_in_memory_answer(ckpt, tmp_path):
    """The PNG written by --save_scene, read back through data.load_image, gives exactly the
    tokens the evaluation path gives for the rendered scene in memory (PNG is lossless)."""
    png = tmp_path / "scene.png"
    saved = run("--save_scene=3", f"--scene_file={png}", "--out_dir", str(ckpt))   # the tiny world: the default one
    assert saved.returncode == 0 and png.is_file(), saved.stderr
    asked = run("--image", str(png), "--prompt", "What colour is the circle?", "--out_dir", str(ckpt),
                "--max_new_tokens=8")
    assert asked.returncode == 0, asked.stderr
    model, tok, cfg = generate.load_vlm(str(ckpt / "instruct.pt"))
    scene = shapes.make_scene("test", 3, shapes.WorldConfig())
    expected = evaluate.answer_batch(model, tok, [shapes.render(scene)],
                                     [evaluate.question("What colour is the circle?")], cfg.image_size, "cpu", 8)
    assert asked.stdout.strip() == expected[0].strip()
    assert model.cfg.llm.dim == 48  # rebuilt from the checkpoint's config, not the defaults


def test_chat_keeps_the_history(ckpt, tmp_path):
    """--chat answers one line per question; the second answer is conditioned on the first
    turn, so it equals answering the full two-turn conversation directly."""
    png = tmp_path / "scene.png"
    shapes.render(shapes.make_scene("test", 5, shapes.WorldConfig())).save(png)
    chat = run("--image", str(png), "--chat", "--out_dir", str(ckpt), "--max_new_tokens=6",
               stdin="How many shapes are there?\nWhat colour is the square?\n\n")
    assert chat.returncode == 0, chat.stderr
    lines = chat.stdout.strip("\n").split("\n")
    assert len(lines) == 2
    model, tok, cfg = generate.load_vlm(str(ckpt / "instruct.pt"))
    image = shapes.render(shapes.make_scene("test", 5, shapes.WorldConfig()))
    history = [{"role": "user", "content": "<image>\nHow many shapes are there?"},
               {"role": "assistant", "content": lines[0].strip()},
               {"role": "user", "content": "What colour is the square?"}]
    expected = evaluate.answer_batch(model, tok, [image], [history], cfg.image_size, "cpu", 6)[0]
    assert lines[1].strip() == expected


@pytest.mark.parametrize("args, message", [
    (["--image", "missing.png", "--prompt", "hi"], "missing.png"),
    (["--image", "IMAGE", "--prompt", "   "], "--prompt is empty"),
    (["--prompt", "hi"], "--image is required"),
    (["--image", "IMAGE", "--prompt", "hi", "--temperature=warm"], "--temperature expects float"),
    (["--image", "IMAGE", "--prompt", "hi", "--bogus=1"], "unknown flag --bogus"),
    (["--image", "NOTANIMAGE", "--prompt", "hi"], "bad.png: not an image"),
    (["--image", "EMPTY", "--prompt", "hi"], "empty.png: empty file"),
    (["--image", "TRUNCATED", "--prompt", "hi"], "cut.png: corrupt or truncated image"),
    (["--image", "BOMB", "--prompt", "hi"], "over Pillow's decompression-bomb limit"),
    (["--image", "IMAGE", "--prompt", "hi", "--ckpt", "NOCKPT"], "no such checkpoint"),
    (["--image", "IMAGE", "--prompt", "why " * 300], "leaves room for"),
])
def test_user_mistakes_are_one_line_and_exit_2(ckpt, tmp_path, args, message):
    image = tmp_path / "ok.png"
    shapes.render(shapes.make_scene("test", 0, shapes.WorldConfig())).save(image)
    files = {"NOTANIMAGE": tmp_path / "bad.png", "EMPTY": tmp_path / "empty.png", "TRUNCATED": tmp_path / "cut.png",
             "BOMB": tmp_path / "bomb.png", "NOCKPT": tmp_path / "x.pt", "IMAGE": image}
    files["NOTANIMAGE"].write_text("not an image")
    files["EMPTY"].write_bytes(b"")
    files["TRUNCATED"].write_bytes(image.read_bytes()[:200])
    if "BOMB" in args:   # 10000 x 9000 = 90 M pixels, just over Pillow's 89.5 M limit (a 1-bit PNG of 20 kB)
        Image.new("1", (10000, 9000)).save(files["BOMB"])
    args = [next((str(files[k]) for k in files if a == k), a) for a in args]
    result = run(*args, "--out_dir", str(ckpt))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error:"), result.stderr
    assert message in result.stderr


def test_a_checkpoint_without_a_vlm_is_refused(ckpt, tmp_path):
    lm = load_checkpoint(str(ckpt / "instruct.pt"))
    lm["stage"] = "lm"
    save_checkpoint(str(tmp_path / "lm.pt"), lm)
    with pytest.raises(ConfigError, match="holds no VLM"):
        generate.load_vlm(str(tmp_path / "lm.pt"))


# ----------------------------------------------------------------------------- --questions: batch evaluation


def test_questions_file_gives_the_answer_file_and_the_scores(ckpt, tmp_path):
    """--questions answers every usable row (last human turn = question, earlier turns =
    history, images in <image> order), each answer equal to asking that conversation alone;
    the answer file has exactly question_id / prompt / text per question; rows with a
    reference are scored by exact match after normalisation, overall and per answer."""
    model, tok, cfg = generate.load_vlm(str(ckpt / "instruct.pt"))
    images = {}
    for i in range(3):
        images[f"s{i}.png"] = shapes.render(shapes.make_scene("test", i, shapes.WorldConfig()))
        images[f"s{i}.png"].save(tmp_path / f"s{i}.png")
    q = lambda text, image=True: {"from": "human", "value": f"<image>\n{text}" if image else text}
    a = lambda text: {"from": "gpt", "value": text}
    rows = [{"id": 10, "image": "s0.png", "conversations": [q("What colour is the circle?"), a("REF")]},
            {"id": "history", "image": "s1.png", "conversations": [q("How many shapes?"), a("two"), q("Which is larger?", False), a("REF")]},
            {"id": "no_reference", "image": "s2.png", "conversations": [q("Is there a ring?")]},
            {"id": "broken", "image": "missing.png", "conversations": [q("Anything?"), a("no")]},
            {"id": "two_images", "image": ["s2.png", "s0.png"],
             "conversations": [q("First?"), a("one"), q("And this one?"), a("REF")]},
            {"id": "wrong", "image": "s1.png", "conversations": [q("What shape is at the top?"), a("zzz")]}]
    usable = [r for r in rows if r["id"] != "broken"]
    expected = []
    for row in usable:   # each conversation asked alone, in memory, through evaluate.answer_batch
        paths = [row["image"]] if isinstance(row["image"], str) else row["image"]
        turns = row["conversations"] if row["conversations"][-1]["from"] == "human" else row["conversations"][:-1]
        messages = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in turns]
        expected.append(evaluate.answer_batch(model, tok, [[images[p] for p in paths]], [messages], cfg.image_size, "cpu", 6)[0])
    # a reference the normalisation must match (article, case, punctuation) for three rows; "zzz" never matches
    for row, answer in zip(usable, expected):
        if row["conversations"][-1]["value"] == "REF":
            row["conversations"][-1]["value"] = f"The {answer.upper()} !"
    (tmp_path / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    answers = tmp_path / "out" / "answers.jsonl"
    answers.parent.mkdir()
    result = run("--questions", str(tmp_path / "questions.jsonl"), "--answers", str(answers), "--out_dir", str(ckpt),
                 "--max_new_tokens=6", "--batch_size=2")
    assert result.returncode == 0, result.stderr
    assert "5 of 6 rows usable; skipped 1: missing image 1 (ids broken)" in result.stdout
    assert "answered 5/5" in result.stdout and "\r" not in result.stdout   # a pipe: the last line, no carriage returns
    lines = [json.loads(line) for line in answers.read_text().splitlines()]
    prompts = ["What colour is the circle?", "Which is larger?", "Is there a ring?", "And this one?", "What shape is at the top?"]
    assert lines == [{"question_id": r["id"], "prompt": p, "text": e} for r, p, e in zip(usable, prompts, expected)]
    assert all(list(line) == ["question_id", "prompt", "text"] for line in lines)
    scores = json.loads((tmp_path / "out" / "answers.scores.json").read_text())
    right = [evaluate.normalize_answer(e) == evaluate.normalize_answer(r["conversations"][-1]["value"])
             for r, e in zip(usable, expected) if r["conversations"][-1]["from"] == "gpt"]
    assert len(right) == 4 and scores["n"] == 4 and scores["exact_match"] == sum(right) / 4
    assert right == [True, True, True, False]   # the references built to match do; "zzz" does not
    assert scores["per_answer"]["zzz"] == {"exact_match": 0.0, "n": 1}
    assert f"exact match {100 * sum(right) / 4:.1f} % of 4 questions" in result.stdout


@pytest.mark.parametrize("content, message", [
    ('[{"id": 1,}]', "line 1, column 11: invalid JSON"),
    ('[{"id": 1, "image": "gone.png", "conversations": [{"from": "human", "value": "<image>\\nQ?"}]}]',
     "no question can be answered (0 of 1 rows usable; skipped 1: missing image 1 (ids 1))"),
])
def test_questions_file_mistakes_are_one_line_and_exit_2(ckpt, tmp_path, content, message):
    (tmp_path / "q.json").write_text(content)
    result = run("--questions", str(tmp_path / "q.json"), "--answers", str(tmp_path / "a.jsonl"), "--out_dir", str(ckpt))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and result.stderr.startswith("error:")
    assert message in result.stderr, result.stderr
    assert not (tmp_path / "a.jsonl").exists()


# ----------------------------------------------------------------------------- --save_scene, progress


def test_save_scene_draws_from_the_world_of_the_checkpoint(ckpt, tmp_path):
    """--save_scene=N writes test scene N of the world the checkpoint in --out_dir was trained
    on (its canvas, objects, object scale and seed), and of the default world without one."""
    payload = load_checkpoint(str(ckpt / "instruct.pt"))
    payload["config"].update(world_size=96, max_objects=1, object_scale=0.5, seed=7)
    (tmp_path / "run").mkdir()
    save_checkpoint(str(tmp_path / "run" / "instruct.pt"), payload)
    expected = {"run": batches.world_config(train.Config(image_size=64, world_size=96, max_objects=1, object_scale=0.5,
                                                         seed=7)),
                "empty": shapes.WorldConfig()}
    for folder, world in expected.items():
        png = tmp_path / f"{folder}.png"
        generate.main(["--save_scene=4", f"--scene_file={png}", "--out_dir", str(tmp_path / folder)])
        scene = shapes.make_scene("test", 4, world)
        assert np.array_equal(np.asarray(data.load_image(png)), np.asarray(shapes.render(scene))), folder
    assert data.load_image(tmp_path / "run.png").size == (96, 96)


class Stream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_progress_is_one_line_on_a_terminal_and_a_line_per_10_seconds_in_a_log():
    """A terminal gets one line rewritten in place (a carriage return before each update, a
    newline after the last); a log or a pipe at most a line every 10 seconds, and the last."""
    times = iter([0.0, 1.0, 2.0, 9.0, 12.0, 13.0, 25.0, 26.0])   # the start, then one reading per update
    log = Stream(tty=False)
    progress = generate.Progress(700, out=log, clock=lambda: next(times))
    for n in (100, 200, 300, 400, 500, 600, 700):
        progress(n)
    assert log.getvalue().splitlines() == ["answered 400/700 | 33.3 questions/s",
                                           "answered 600/700 | 24.0 questions/s",
                                           "answered 700/700 | 26.9 questions/s"]
    times = iter([0.0, 1.0, 2.0, 4.0])
    terminal = Stream(tty=True)
    progress = generate.Progress(3, out=terminal, clock=lambda: next(times))
    for n in (1, 2, 3):
        progress(n)
    assert terminal.getvalue() == ("\ranswered 1/3 | 1.0 questions/s\ranswered 2/3 | 1.0 questions/s"
                                   "\ranswered 3/3 | 0.8 questions/s\n")



def test_a_checkpoint_from_before_the_stem_and_region_fields_rebuilds_as_it_was(ckpt, tmp_path):
    """Checkpoints written before Config.vit_stem and Config.region_names existed hold no such
    keys; they had the patch stem and no region names, whatever today's defaults are, and must
    load as that (strictly, every weight)."""
    from model import VLM
    from vit import ConvStem, PatchEmbed
    saved = load_checkpoint(str(ckpt / "instruct.pt"))
    cfg = generate.run_config(saved)
    cfg.vit_stem, cfg.region_names = "patch", False
    tok = Tokenizer.from_state(saved["tokenizer"])
    model = VLM(train.vlm_config(cfg, tok))
    old = dict(saved, config={k: v for k, v in vars(cfg).items() if k not in generate.BEFORE_FIELD},
               model=model.state_dict())
    save_checkpoint(str(tmp_path / "instruct.pt"), old)
    loaded, _, loaded_cfg = generate.load_vlm(str(tmp_path / "instruct.pt"))
    assert loaded_cfg.vit_stem == "patch" and isinstance(loaded.vision.patch_embed, PatchEmbed)
    assert not loaded_cfg.region_names and loaded.regions is None
    today = VLM(train.vlm_config(train.Config(), tok))
    assert isinstance(today.vision.patch_embed, ConvStem) and today.regions.grid == 3
