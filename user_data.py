"""
user_data.py — your own data: LLaVA's conversation JSON (a list) or JSONL files of images and
conversations, read and checked row by row, split into rows to train on and rows held out
for scoring; and the shapes world written out in the same format (--export).

    python train.py --export=shapes_data          # the shapes world as PNG + LLaVA JSON files
    python train.py --caption_data=shapes_data/captions.json --instruct_data=shapes_data/instruct.json

A row is LLaVA's ("Visual Instruction Tuning", Liu et al. 2023, arXiv:2304.08485):
    {"id": "0", "image": "images/0.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is in the image?"}, {"from": "gpt", "value": "a red circle"}]}
A row that cannot be used is skipped and counted by reason (one line per file), never a
crash mid-run; a file with no usable row stops the run before any training. The batches of
your rows are batches.py's (user_clip_batch, user_vlm_batch); their scores, evaluate.py's.

Run the tests:  python -m pytest -q tests/test_user_data.py
"""
import collections
import json
import random
from dataclasses import dataclass
from pathlib import Path

import shapes
from batches import CAPTION_PROMPTS, chat_messages, instruct_turns, world_config
from data import DataError, ImageError, count_images, encode_chat, load_image, without_images
from flags import ConfigError

# -----------------------------------------------------------------------------
# LLaVA files -> checked rows

ROLES = {"human": "user", "gpt": "assistant"}   # LLaVA's speaker names -> the chat template's roles
SPEAKERS = {role: speaker for speaker, role in ROLES.items()}

# Why a row cannot be used, in the order the checks run (a row is counted under the first).
MALFORMED = "malformed row"                     # not an object, no list of {"from", "value"} turns, ...
EMPTY_TURN = "no turns or an empty turn"
NOT_ALTERNATING = "turns not alternating human, gpt"
MARKER_COUNT = "<image> markers != images"
MISSING_IMAGE = "missing image"
UNREADABLE_IMAGE = "unreadable image"
# checked by load_user_data, which has the tokenizer and knows what each stage needs:
NOT_ONE_IMAGE = "caption row without exactly one image"
FIRST_EXCHANGE_TOO_LONG = "first exchange longer than the context"


@dataclass
class Row:
    """One usable row of a LLaVA file."""
    id: object       # the row's "id" (its position in the file when it has none)
    images: list     # Paths: the k-th image fills the k-th <image> marker
    messages: list   # [{"role": "user" | "assistant", "content": str}], alternating, user first


def read_rows(path):
    """The raw rows of a LLaVA file: a JSON list, or one JSON object per line for a .jsonl
    file. Anything that is not valid JSON is a DataError naming the line and column."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")   # -sig: a byte-order mark some editors write is skipped
    except UnicodeDecodeError as e:
        raise DataError(path, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.suffix == ".jsonl":
        return [_parse_json(path, line, n) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    rows = _parse_json(path, text, 1)
    if not isinstance(rows, list):
        raise DataError(path, f"expected a JSON list of rows (LLaVA format; one object per line needs "
                              f"a .jsonl name), found a JSON {type(rows).__name__}")
    return rows


def _parse_json(path, text, first_line):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, f"line {first_line + e.lineno - 1}, column {e.colno}: invalid JSON ({e.msg})") from None


def id_of(raw, position):
    """A row's "id", or its position in the file when it has none."""
    return raw.get("id", position) if isinstance(raw, dict) else position


def parse_row(raw, position, image_folder, open_end=False):
    """(Row, None) for a row whose text is usable, else (None, the reason). No image is
    opened here. open_end: the last turn may be a question (a question file for generate.py)."""
    if not isinstance(raw, dict):
        return None, MALFORMED
    turns, paths = raw.get("conversations"), raw.get("image") or []
    paths = [paths] if isinstance(paths, str) else paths
    if (not isinstance(turns, list) or not isinstance(paths, list) or not all(isinstance(p, str) for p in paths)
            or not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns)):
        return None, MALFORMED
    if not turns or any(not t["value"].strip() for t in turns):
        return None, EMPTY_TURN
    roles = [ROLES.get(t.get("from")) for t in turns]
    if roles != [("user", "assistant")[k % 2] for k in range(len(turns))] or (roles[-1] == "user" and not open_end):
        return None, NOT_ALTERNATING
    messages = [{"role": role, "content": t["value"]} for role, t in zip(roles, turns)]
    if count_images(messages) != len(paths):
        return None, MARKER_COUNT
    return Row(id_of(raw, position), [Path(image_folder) / p for p in paths], messages), None   # an absolute p stays as it is


def load_llava(path, image_folder="", open_end=False, check_images=True):
    """(rows, skipped) of a LLaVA JSON / JSONL file: the usable rows in file order, and
    {reason: [row ids]} for the others. Relative image paths are under image_folder
    (default: the file's own folder).

    Every image is opened and decoded here, once (check_images=False skips that): a row with
    a broken image is dropped before training starts, so a long run never meets one.
    Decoding costs about a millisecond per small image; the pixels are not kept, training
    reads each file again when a batch needs it."""
    folder = Path(image_folder) if image_folder else Path(path).parent
    rows, skipped, image_problems = [], collections.defaultdict(list), {}
    for position, raw in enumerate(read_rows(path)):
        row, reason = parse_row(raw, position, folder, open_end)
        if row is not None and check_images:
            for p in row.images:
                if p not in image_problems:
                    image_problems[p] = _image_problem(p)
            reason = next((image_problems[p] for p in row.images if image_problems[p]), None)
        if reason:
            skipped[reason].append(id_of(raw, position))
        else:
            rows.append(row)
    return rows, dict(skipped)


def _image_problem(path):
    try:
        load_image(path)
    except ImageError as e:
        return MISSING_IMAGE if e.reason == "no such file" else UNREADABLE_IMAGE
    return None


def drop_rows(rows, skipped, reason, keep):
    """The rows for which keep(row) holds; the ids of the others are added to skipped[reason]."""
    dropped = [r.id for r in rows if not keep(r)]
    if dropped:
        skipped.setdefault(reason, []).extend(dropped)
    return [r for r in rows if keep(r)]


def report_rows(n_usable, skipped, max_ids=5):
    """How a data file was read, in one line: rows usable, rows skipped per reason with their
    first few ids."""
    n_skipped = sum(len(ids) for ids in skipped.values())
    line = f"{n_usable:,} of {n_usable + n_skipped:,} rows usable"
    if n_skipped:
        parts = [f"{reason} {len(ids):,} (ids {', '.join(map(str, ids[:max_ids]))}{', ...' if len(ids) > max_ids else ''})"
                 for reason, ids in skipped.items()]
        line += f"; skipped {n_skipped:,}: " + "; ".join(parts)
    return line


def llava_row(row_id, images, messages):
    """A row in LLaVA's format from chat messages (the inverse of parse_row): `image` is one
    path, a list of paths, or absent for a text-only conversation."""
    row = {"id": row_id}
    if images:
        row["image"] = images[0] if len(images) == 1 else list(images)
    row["conversations"] = [{"from": SPEAKERS[m["role"]], "value": m["content"]} for m in messages]
    return row


def save_llava(path, rows):
    """Write rows as a JSON list (or one object per line for a .jsonl path)."""
    with open(path, "w", encoding="utf-8") as f:
        if str(path).endswith(".jsonl"):
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        else:
            json.dump(rows, f, indent=1, ensure_ascii=False)


# -----------------------------------------------------------------------------
# your data files in a run: checked, split, held out

@dataclass
class UserData:
    """Your data files after checking: the rows to train on, and the rows held out for scoring."""
    captions: list                # Row: one image, its caption the first answer
    instructions: list            # Row: conversations, any number of images
    held_out_captions: list
    held_out_instructions: list

    def rows(self, kind, held_out=False):
        """The rows a stage trains on (or is scored on), by the kind of sample it reads (its
        STAGES data): "pairs" (clip) and "captions" (align) the caption rows, "conversations"
        (instruct) the conversations, or the captions as one-turn ones when there are none,
        "text" (lm) the text of both."""
        captions = self.held_out_captions if held_out else self.captions
        instructions = self.held_out_instructions if held_out else self.instructions
        if kind in ("pairs", "captions"):
            return captions
        if kind == "conversations":
            return instructions or captions
        return captions + instructions


def check_data_flags(cfg):
    """Refuse what the data flags cannot do, before anything is loaded or trained."""
    if cfg.image_folder and not (cfg.caption_data or cfg.instruct_data):
        raise ConfigError("--image_folder is for the images of --caption_data / --instruct_data; give one of them")
    if cfg.holdout < 0:
        raise ConfigError(f"--holdout must be >= 0, got {cfg.holdout}")
    if cfg.vision_from and cfg.stage == "clip":
        raise ConfigError("--vision_from replaces the clip stage: there is nothing to train with --stage=clip")
    if cfg.instruct_data and not cfg.caption_data and not cfg.vision_from and cfg.stage in ("all", "clip", "align"):
        raise ConfigError("--instruct_data without --caption_data: the clip and align stages have no image-caption "
                          "pairs to learn from; add --caption_data, or --vision_from=CKPT to take the ViT and "
                          "projector from an earlier run's align.pt or instruct.pt")


def user_texts(cfg):
    """The text of your data files, for the tokenizer: every message of every row whose text
    is usable, <image> markers removed (images are not opened here), and the chat template's
    role names. Held-out rows are included: the tokenizer learns spellings, not answers."""
    texts = ["user\nassistant\n"]
    for path in (cfg.caption_data, cfg.instruct_data):
        if path:
            rows, _ = load_llava(path, cfg.image_folder, check_images=False)
            texts += [m["content"] for row in rows for m in without_images(row.messages)]
    return texts


def load_user_data(cfg, tok, image_tokens):
    """Your data files, read and checked row by row (load_llava: every image decoded once),
    then a caption row needs exactly one image and any row a first exchange that fits in
    max_seq_len, each image counted at image_tokens ids (the most one can take). One line per
    file says what was used and what was skipped, by reason. `holdout` rows of each (a
    seeded choice) are set aside for scoring. A file with no usable row stops
    the run here, before any training."""
    parts = {}
    for name, path in (("captions", cfg.caption_data), ("instructions", cfg.instruct_data)):
        parts[name], parts[f"held_out_{name}"] = [], []
        if not path:
            continue
        rows, skipped = load_llava(path, cfg.image_folder)
        if name == "captions":
            rows = drop_rows(rows, skipped, NOT_ONE_IMAGE, lambda r: len(r.images) == 1)
        rows = drop_rows(rows, skipped, FIRST_EXCHANGE_TOO_LONG,
                         lambda r: len(encode_chat(tok, r.messages[:2], image_tokens)[0]) <= cfg.max_seq_len)
        report = report_rows(len(rows), skipped)
        if not rows:
            raise DataError(path, f"no usable row ({report})")
        if cfg.holdout >= len(rows):
            raise ConfigError(f"--holdout={cfg.holdout} leaves none of the {len(rows)} usable rows of {path} to train on; lower it")
        held = set(random.Random(f"{cfg.seed}/holdout").sample(range(len(rows)), cfg.holdout))
        parts[name] = [r for k, r in enumerate(rows) if k not in held]
        parts[f"held_out_{name}"] = [r for k, r in enumerate(rows) if k in held]
        print(f"{path}: {report}; {len(held)} held out for scoring", flush=True)
    return UserData(**parts)


# -----------------------------------------------------------------------------
# the shapes world as LLaVA files

def export_world(cfg, test_questions):
    """--export=DIR: the shapes world written the way your own data would be, to look at, edit
    and train on. images/ holds export_scenes training scenes as PNG; captions.json gives each
    one caption exchange (as the align stage asks for it) and instruct.json one conversation
    (instruct_turns, as the instruct stage builds them); questions.json holds the VQA test
    questions, test_questions = evaluate.vqa_items (grounding left out: a box is scored by
    IoU, not by exact match), one per row, its reference answer the last gpt turn."""
    root = Path(cfg.export)
    (root / "images").mkdir(parents=True, exist_ok=True)
    world, captions, instructions, questions = world_config(cfg), [], [], []
    for i in range(cfg.export_scenes):
        scene, rng = shapes.make_scene("train", i, world), random.Random(f"{cfg.seed}/export/{i}")
        image = f"images/train_{i:06d}.png"
        shapes.render(scene).save(root / image)
        caption = [(rng.choice(CAPTION_PROMPTS), shapes.caption(scene, rng))]
        captions.append(llava_row(f"train_{i:06d}", [image], chat_messages(caption)))
        conversation = instruct_turns(scene, rng, cfg.instruct_turns)
        instructions.append(llava_row(f"train_{i:06d}", [image], chat_messages(conversation)))
    for scene, qtype, question, answer in test_questions:
        if qtype != "grounding":
            image = f"images/test_{len(questions):06d}.png"
            shapes.render(scene).save(root / image)
            row_id = f"test_{len(questions):06d}_{qtype}"   # the type in the id: per-type scores stay possible
            questions.append(llava_row(row_id, [image], chat_messages([(question, answer)])))
    for name, rows in (("captions.json", captions), ("instruct.json", instructions), ("questions.json", questions)):
        save_llava(root / name, rows)
    print(f"wrote {root}: {cfg.export_scenes} training images with captions.json and instruct.json, "
          f"{len(questions)} test questions in questions.json")
