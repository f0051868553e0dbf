"""
generate.py — ask a trained tinyvlm about an image.

    python generate.py --save_scene=7                  # a held-out scene of the checkpoint's world -> scene.png
    python generate.py --image scene.png --prompt "What colour is the circle?"
    python generate.py --image scene.png --chat        # multi-turn: one question per line, empty line ends
    python generate.py --config=sample --image scene.png --prompt "Describe the image."
    python generate.py --questions questions.json --answers answers.jsonl   # a whole question file
    python generate.py --serve                         # a chat page at http://127.0.0.1:8000 (serve.py)

Batch evaluation (--questions) follows LLaVA's model_vqa answer-file convention: one JSON line
{"question_id", "prompt", "text"} per question; scores, where the rows carry the reference
answer, go to a separate <answers>.scores.json.

The model is always rebuilt from the checkpoint's own config (out/instruct.pt, or --ckpt),
so any checkpoint tinyvlm wrote answers here whatever the current defaults are. Presets
and flags change generation settings only: greedy decoding by default, or temperature /
top-k / top-p sampling ("The Curious Case of Neural Text Degeneration", Holtzman et al.
2019, arXiv:1904.09751, for top-p). Answers come from VLM.generate, with the KV cache.

Run the tests:  python -m pytest -q tests/test_generate.py   (the chat page: tests/test_serve.py)
"""

import json
import os
import random
import sys
import time
from dataclasses import dataclass, fields

import torch

import batches
import data
import evaluate
import shapes
import train
import user_data
from checkpoint import load_checkpoint, load_weights
from flags import ConfigError, parse_flags
from model import VLM
from tokenizer import Tokenizer


@dataclass
class GenerateConfig:
    out_dir: str = "out"
    ckpt: str = ""                 # a checkpoint file; default <out_dir>/instruct.pt
    image: str = ""                # the image to ask about
    prompt: str = ""               # one question
    chat: bool = False             # read questions from stdin, one per line, keeping the history
    save_scene: int = -1           # write test scene N of the checkpoint's world to --scene_file and stop
    scene_file: str = "scene.png"
    max_new_tokens: int = 48
    temperature: float = 0.0       # 0 = greedy
    top_k: int = 0                 # 0 = off
    top_p: float = 1.0             # 1 = off
    seed: int = 0
    device: str = "auto"
    # batch evaluation of a LLaVA JSON / JSONL file
    questions: str = ""            # answer the last human turn of every row (earlier turns: its history)
    image_folder: str = ""         # where its relative image paths point; default: the file's own folder
    answers: str = "answers.jsonl" # one {"question_id", "prompt", "text"} line per question
    batch_size: int = 32
    serve: bool = False            # start the chat page instead of answering once
    host: str = "127.0.0.1"        # --serve: the address to listen on (loopback: this machine only)
    port: int = 8000               # --serve: 0 picks a free port
    max_upload_mb: float = 10.0    # --serve: larger images are refused (HTTP 413)


PRESETS = {
    "greedy": {},
    "sample": dict(temperature=0.8, top_p=0.9),
}


# Config fields added after checkpoints were first written, with the value every checkpoint
# older than the field was trained with (today's default may differ): such a checkpoint
# rebuilds as what it was: a ViT with the patch stem, visual tokens without region names.
BEFORE_FIELD = {"vit_stem": "patch", "region_names": False}


def run_config(ckpt):
    """The train.Config a checkpoint was written with (fields this train.py no longer has are
    dropped; fields it did not have yet take their BEFORE_FIELD value)."""
    known = {f.name for f in fields(train.Config)}
    return train.Config(**{**BEFORE_FIELD, **{k: v for k, v in ckpt["config"].items() if k in known}})


def load_vlm(path, device="cpu"):
    """(model, tokenizer, training config) from a checkpoint written by train.py."""
    ckpt = load_checkpoint(path)
    if ckpt.get("stage") not in ("align", "instruct"):
        raise ConfigError(f"{path}: a {ckpt.get('stage')!r} checkpoint holds no VLM; use align.pt or instruct.pt")
    cfg = run_config(ckpt)
    tok = Tokenizer.from_state(ckpt["tokenizer"])
    model = VLM(train.vlm_config(cfg, tok))
    load_weights(model, ckpt["model"], path)
    return model.to(device).eval(), tok, cfg


def check_length(messages, model, tok, cfg, gen):
    """A conversation that does not fit the model's context is refused with a clear message
    (never cut silently: which part to drop is the user's choice)."""
    n = evaluate.prompt_length_at_most(model, tok, messages)
    room = cfg.max_seq_len - gen.max_new_tokens + 1
    if n > room:
        raise ConfigError(f"the conversation is {n} tokens, but with --max_new_tokens={gen.max_new_tokens} "
                          f"the model's context of {cfg.max_seq_len} tokens leaves room for {room}")


class Progress:
    """progress(n) after each batch of a long loop: "answered n/total | r questions/s". On a
    terminal one line, rewritten in place (a carriage return); in a log or a pipe at most one
    line every `every` seconds, and the last one, so a file of thousands of questions adds a
    few lines, not hundreds."""

    def __init__(self, total, out=sys.stdout, every=10.0, clock=time.monotonic):
        self.total, self.out, self.every, self.clock = total, out, every, clock
        self.start = self.last = clock()   # when the loop started; when the last line was written
        self.width = 0                     # the longest line so far: a shorter one must cover it

    def __call__(self, n):
        now = self.clock()
        line = f"answered {n}/{self.total} | {n / max(now - self.start, 1e-9):.1f} questions/s"
        done = n >= self.total
        if self.out.isatty():
            self.width = max(self.width, len(line))
            self.out.write("\r" + line.ljust(self.width) + ("\n" if done else ""))
        elif done or now - self.last >= self.every:
            self.out.write(line + "\n")
            self.last = now
        self.out.flush()


def answer_questions(gen):
    """--questions: answer every row of a LLaVA file in batches, greedily, and write the answer
    file. Rows whose prompt and --max_new_tokens do not fit in the context are skipped like
    any bad row, and counted. Where rows carry their reference answer (a last gpt turn), print
    the exact-match accuracy after evaluate.normalize_answer, overall and per reference answer,
    and write it to <answers>.scores.json."""
    if gen.temperature > 0:
        raise ConfigError("--questions decodes greedily, so that its scores are reproducible; drop --temperature")
    device = pick_device(gen)
    model, tok, cfg = load_vlm(checkpoint_path(gen), device)
    rows, skipped = user_data.load_llava(gen.questions, gen.image_folder, open_end=True)
    rows = user_data.drop_rows(rows, skipped, "prompt longer than the context", lambda r: evaluate.prompt_fits(
        model, tok, evaluate.split_question(r)[0], cfg.max_seq_len, gen.max_new_tokens))
    if not rows:
        raise data.DataError(gen.questions, f"no question can be answered ({user_data.report_rows(0, skipped)})")
    print(f"{gen.questions}: {user_data.report_rows(len(rows), skipped)}", flush=True)
    answers = evaluate.answer_rows(model, tok, rows, cfg.image_size, device, gen.batch_size, gen.max_new_tokens,
                                   Progress(len(rows)))
    questions = [evaluate.split_question(row) for row in rows]   # (conversation, reference or None)
    with open(gen.answers, "w", encoding="utf-8") as f:
        for row, (conversation, _), answer in zip(rows, questions, answers):
            prompt = data.without_images(conversation[-1:])[0]["content"]   # the question, as model_vqa writes it
            f.write(json.dumps({"question_id": row.id, "prompt": prompt, "text": answer}, ensure_ascii=False) + "\n")
    print(f"wrote {gen.answers}")
    scored = [(answer, reference) for (_, reference), answer in zip(questions, answers) if reference is not None]
    if scored:
        scores = evaluate.exact_match(*zip(*scored))
        print(f"exact match {100 * scores['exact_match']:.1f} % of {scores['n']} questions; "
              f"per reference answer (the {min(20, len(scores['per_answer']))} commonest):")
        for answer, s in list(scores["per_answer"].items())[:20]:
            print(f"  {answer[:40]:40s} {100 * s['exact_match']:5.1f} % of {s['n']}")
        path = os.path.splitext(gen.answers)[0] + ".scores.json"
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"questions": gen.questions, "checkpoint": checkpoint_path(gen),
                       **scores}, f, indent=1, ensure_ascii=False)
        print(f"wrote {path}")


def save_scene(gen):
    """--save_scene=N: test scene N of the world the checkpoint (--ckpt, or instruct.pt in
    --out_dir) was trained on: its config's canvas size, objects, object scale and seed. Without
    a checkpoint, of the default world."""
    path = checkpoint_path(gen)
    if os.path.isfile(path):
        world, source = batches.world_config(run_config(load_checkpoint(path))), f"the world of {path}"
    else:
        world, source = shapes.WorldConfig(), "the default world"
    scene = shapes.make_scene("test", gen.save_scene, world)
    shapes.render(scene).save(gen.scene_file)
    print(f"wrote {gen.scene_file} ({source}): {shapes.caption(scene, random.Random(0))}")
    for kind, question, answer in shapes.questions(scene, random.Random(gen.save_scene)):
        print(f"  {kind:10s} {question}  ->  {answer}")


def checkpoint_path(gen):
    return gen.ckpt or os.path.join(gen.out_dir, "instruct.pt")


def pick_device(gen):
    if gen.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return gen.device


def sampling_settings(gen, device):
    """The keyword arguments of VLM.generate / VLM.stream that choose the next token."""
    return dict(temperature=gen.temperature, top_k=gen.top_k or None, top_p=gen.top_p if gen.top_p < 1 else None,
                generator=torch.Generator(device).manual_seed(gen.seed))


def add_question(messages, text):
    """The conversation with the user's next question: LLaVA puts the image before the first one."""
    return messages + [{"role": "user", "content": text if messages else f"{data.IMAGE_MARKER}\n{text}"}]


def main(argv):
    gen = parse_flags(GenerateConfig, argv, PRESETS)
    if gen.save_scene >= 0:
        return save_scene(gen)
    if gen.questions:
        return answer_questions(gen)
    if gen.serve:
        from serve import serve   # here, not at the top: serve.py is built on this file's functions
        return serve(gen)
    if not gen.image:
        raise ConfigError("--image is required (try --save_scene=0 to write a test scene first)")
    if not gen.chat and not gen.prompt.strip():
        raise ConfigError("--prompt is empty; ask a question, or use --chat")
    device = pick_device(gen)
    image = data.load_image(gen.image)
    model, tok, cfg = load_vlm(checkpoint_path(gen), device)
    sampling = sampling_settings(gen, device)
    messages = []
    questions = iter(sys.stdin.readline, "") if gen.chat else [gen.prompt]
    for text in questions:
        text = text.strip()
        if not text:
            break
        messages = add_question(messages, text)
        check_length(messages, model, tok, cfg, gen)
        answer = evaluate.answer_batch(model, tok, [image], [messages], cfg.image_size, device,
                                       gen.max_new_tokens, **sampling)[0]
        messages.append({"role": "assistant", "content": answer})
        print(answer, flush=True)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ConfigError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
