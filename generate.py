"""
generate.py — ask a trained tinyvlm about an image.

    python generate.py --save_scene=7                  # write a held-out shapes-world scene to scene.png
    python generate.py --image scene.png --prompt "What colour is the circle?"
    python generate.py --image scene.png --chat        # multi-turn: one question per line, empty line ends
    python generate.py --config=sample --image scene.png --prompt "Describe the image."
    python generate.py --questions questions.json --answers answers.jsonl   # a whole question file
    python generate.py --serve                         # a chat page at http://127.0.0.1:8000

Batch evaluation (--questions) follows LLaVA's model_vqa answer-file convention: one JSON line
{"question_id", "prompt", "text"} per question; scores, where the rows carry the reference
answer, go to a separate <answers>.scores.json.

The model is always rebuilt from the checkpoint's own config (out/instruct.pt, or --ckpt),
so any checkpoint tinyvlm wrote answers here whatever the current defaults are. Presets
and flags change generation settings only: greedy decoding by default, or temperature /
top-k / top-p sampling ("The Curious Case of Neural Text Degeneration", Holtzman et al.
2019, arXiv:1904.09751, for top-p). Answers come from VLM.generate, with the KV cache.

--serve starts a local web page (chat.html, beside this file) to chat about an image, the
way LLaVA shipped a demo beside its code ("Visual Instruction Tuning", Liu et al. 2023,
arXiv:2304.08485). The standard library's http.server serves the page and a small JSON
API over the same functions the command line uses; answers stream token by token from
VLM.stream. One generation runs at a time; conversations live in the server under ids
the page holds.
"""

import base64
import collections
import io
import json
import math
import os
import random
import socket
import sys
import threading
import time
from dataclasses import dataclass, fields, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import torch

import data
import evaluate
import shapes
import train
from model import VLM


@dataclass
class GenerateConfig:
    out_dir: str = "out"
    ckpt: str = ""                 # a checkpoint file; default <out_dir>/instruct.pt
    image: str = ""                # the image to ask about
    prompt: str = ""               # one question
    chat: bool = False             # read questions from stdin, one per line, keeping the history
    save_scene: int = -1           # write test scene N of the shapes world to --scene_file and stop
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


def load_vlm(path, device="cpu"):
    """(model, tokenizer, training config) from a checkpoint written by train.py."""
    ckpt = train.load_checkpoint(path)
    if ckpt.get("stage") not in ("align", "instruct"):
        raise train.ConfigError(f"{path}: a {ckpt.get('stage')!r} checkpoint holds no VLM; use align.pt or instruct.pt")
    known = {f.name for f in fields(train.Config)}
    cfg = train.Config(**{k: v for k, v in ckpt["config"].items() if k in known})
    tok = data.Tokenizer.from_state(ckpt["tokenizer"])
    model = VLM(train.vlm_config(cfg, tok))
    train.load_weights(model, ckpt["model"], path)
    return model.to(device).eval(), tok, cfg


def check_length(messages, model, tok, cfg, gen):
    """A conversation that does not fit the model's context is refused with a clear message
    (never cut silently: which part to drop is the user's choice)."""
    n = evaluate.prompt_length_at_most(model, tok, messages)
    room = cfg.max_seq_len - gen.max_new_tokens + 1
    if n > room:
        raise train.ConfigError(f"the conversation is {n} tokens, but with --max_new_tokens={gen.max_new_tokens} "
                                f"the model's context of {cfg.max_seq_len} tokens leaves room for {room}")


def answer_questions(gen):
    """--questions: answer every row of a LLaVA file in batches, greedily, and write the answer
    file. Rows whose prompt and --max_new_tokens do not fit in the context are skipped like
    any bad row, and counted. Where rows carry their reference answer (a last gpt turn), print
    the exact-match accuracy after evaluate.normalize_answer, overall and per reference answer,
    and write it to <answers>.scores.json."""
    if gen.temperature > 0:
        raise train.ConfigError("--questions decodes greedily, so that its scores are reproducible; drop --temperature")
    device = pick_device(gen)
    model, tok, cfg = load_vlm(checkpoint_path(gen), device)
    rows, skipped = data.load_llava(gen.questions, gen.image_folder, open_end=True)
    rows = data.drop_rows(rows, skipped, "prompt longer than the context", lambda r: evaluate.prompt_fits(
        model, tok, evaluate.split_question(r)[0], cfg.max_seq_len, gen.max_new_tokens))
    if not rows:
        raise data.DataError(gen.questions, f"no question can be answered ({data.report_rows(0, skipped)})")
    print(f"{gen.questions}: {data.report_rows(len(rows), skipped)}", flush=True)
    t0 = time.time()
    progress = lambda n: print(f"answered {n}/{len(rows)} | {n / (time.time() - t0):.1f} questions/s", flush=True)
    answers = evaluate.answer_rows(model, tok, rows, cfg.image_size, device, gen.batch_size, gen.max_new_tokens, progress)
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
    world = shapes.WorldConfig()
    scene = shapes.make_scene("test", gen.save_scene, world)
    shapes.render(scene).save(gen.scene_file)
    print(f"wrote {gen.scene_file}: {shapes.caption(scene, random.Random(0))}")
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


def stream_answer(model, tok, image, messages, image_size, device, max_new_tokens, **sampling):
    """Yield the answer to a conversation about one image in pieces of text, as the tokens are
    sampled. Joined, the pieces are exactly evaluate.answer_batch's answer: the same prompt, the
    same decoding steps, the same strip()."""
    ids, pixels = evaluate.prompt_inputs(model, tok, messages, [image], image_size)
    ids, pixels = torch.tensor([ids], device=device), pixels.to(device)  # (1, T), (V, 3, S, S)
    answer_ids, shown = [], ""
    for next_id in model.stream(ids, pixels, max_new_tokens=max_new_tokens, stop_id=tok.im_end_id, **sampling):
        if next_id.item() == tok.im_end_id:
            break
        answer_ids.append(next_id.item())
        # Show only text that can no longer change: not trailing spaces (the final strip() may
        # drop them) and not a U+FFFD standing for a character whose bytes are still arriving.
        text = tok.decode(answer_ids).strip().rstrip("\ufffd").rstrip()
        if len(text) > len(shown):
            yield text[len(shown):]
            shown = text
    rest = tok.decode(answer_ids).strip()[len(shown):]
    if rest:
        yield rest


def main(argv):
    gen = train.parse_flags(GenerateConfig, argv, PRESETS)
    if gen.save_scene >= 0:
        return save_scene(gen)
    if gen.questions:
        return answer_questions(gen)
    if gen.serve:
        return serve(gen)
    if not gen.image:
        raise train.ConfigError("--image is required (try --save_scene=0 to write a test scene first)")
    if not gen.chat and not gen.prompt.strip():
        raise train.ConfigError("--prompt is empty; ask a question, or use --chat")
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


# ----------------------------------------------------------------------------- the chat page (--serve)
#
#   GET  /              the page (chat.html)
#   GET  /api/info      the checkpoint, the default settings and the upload limit
#   POST /api/image     body: the image file's bytes  -> {"chat": id, "width", "height"}
#   POST /api/scene     a random held-out shapes-world scene -> {"chat": id, "scene", "image": PNG data URL, "examples"}
#   POST /api/new       {"chat": id} -> {"chat": new id}: the same image, an empty history
#   POST /api/chat      {"chat": id, "question", "temperature"?, "max_new_tokens"?, "stream"?}
#                       -> {"answer", "box"}; with "stream": true, newline-delimited JSON:
#                       {"token": text} per piece, then {"done": true, "answer", "box"}
# Errors are {"error": message} with a 4xx status. "box" is the answer's first
# <box>(x0,y0),(x1,y1)</box> as [x0, y0, x1, y1] in percent of width and height, or null.

MAX_CHATS = 64               # the oldest conversation is dropped beyond this many
MAX_JSON_BYTES = 64 * 1024   # a request body with a question, not an image
PAGE = Path(__file__).with_name("chat.html")


class ApiError(Exception):
    """A refused request: the HTTP status and a one-line message for the page."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Chat:
    image: object        # PIL image, already squashed to the model's input size
    messages: list       # the conversation so far, in data.encode_chat's format


class ChatServer(ThreadingHTTPServer):
    """An HTTP server holding the model and the conversations. Each request runs in its own
    thread; `lock` makes one generation (and any change to `chats`) happen at a time."""

    def __init__(self, address, model, tok, cfg, gen, device):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET   # "::1" is IPv6
        super().__init__(address, ChatHandler)
        self.model, self.tok, self.cfg, self.gen, self.device = model, tok, cfg, gen, device
        self.sampling = sampling_settings(gen, device)
        self.chats = collections.OrderedDict()   # id -> Chat, oldest first
        self.lock = threading.Lock()
        self.rng = random.Random(gen.seed)        # picks scenes; ids come from os.urandom
        self.page = PAGE.read_bytes()

    def new_chat(self, image):
        # Keep the image the model sees (S x S): preprocess() gives the same tensor from it,
        # and a 4000-pixel upload does not stay in memory for the whole session.
        image = data.to_pil(data.preprocess(image, self.cfg.image_size))
        chat_id = os.urandom(8).hex()
        with self.lock:
            self.chats[chat_id] = Chat(image, [])
            while len(self.chats) > MAX_CHATS:
                self.chats.popitem(last=False)
        return chat_id

    def get_chat(self, chat_id):
        if not isinstance(chat_id, str) or chat_id not in self.chats:
            raise ApiError(404, "no such chat (the server may have restarted): choose an image again")
        return self.chats[chat_id]


def box_percent(answer):
    """The answer's first box as [x0, y0, x1, y1] in percent, or None (shapes.text_to_box with
    a 100-pixel image returns percent unchanged)."""
    box = shapes.text_to_box(answer, 100)
    return None if box is None else list(box)


def get_field(body, key, typ, default=None):
    value = body.get(key, default)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if value is None or not isinstance(value, typ) or (isinstance(value, bool) and typ is not bool):
        raise ApiError(400, f"{key!r} must be a {typ.__name__}")
    return value


class ChatHandler(BaseHTTPRequestHandler):
    """One request (http.server's default HTTP/1.0: one request per connection, so a stream
    simply ends when the connection closes). Handlers return a JSON-able dict, or write the
    response themselves (the page, a stream) and return None."""

    server: ChatServer
    timeout = 60   # seconds a socket read or write may wait: a stalled client does not hold a thread forever
    ROUTES = {"/": ("GET", "get_page"), "/api/info": ("GET", "get_info"), "/api/image": ("POST", "post_image"),
              "/api/scene": ("POST", "post_scene"), "/api/new": ("POST", "post_new"),
              "/api/chat": ("POST", "post_chat")}

    def do_GET(self):
        self.route("GET")

    def do_POST(self):
        self.route("POST")

    def route(self, method):
        path = urlsplit(self.path).path
        try:
            if path not in self.ROUTES:
                raise ApiError(404, f"no such page: {path}")
            allowed, handler = self.ROUTES[path]
            if method != allowed:
                raise ApiError(405, f"{path} takes {allowed}, not {method}")
            result = getattr(self, handler)()
            if result is not None:
                self.send_json(200, result)
        except ApiError as e:
            self.send_json(e.status, {"error": e.message})
        except (train.ConfigError, data.ImageError) as e:   # the same one-line errors as the command line
            self.send_json(400, {"error": str(e)})
        except (BrokenPipeError, ConnectionResetError, TimeoutError):   # the page went away or stalled
            pass

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (a malformed request, an unsupported method) as JSON too."""
        self.send_json(code, {"error": message or self.responses.get(code, ("error",))[0]})

    def send_json(self, status, obj):
        self.send_bytes(status, "application/json", json.dumps(obj).encode())

    def send_bytes(self, status, content_type, body):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def read_body(self, limit, content_types):
        """The request body, refused when too large (413) or of another type (415). Requiring
        application/json or a binary type also stops other web sites from posting here: a
        browser sends those types cross-origin only after asking, and this server never agrees."""
        kind = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if not any(kind == t or (t.endswith("/") and kind.startswith(t)) for t in content_types):
            raise ApiError(415, f"send the body as {' or '.join(content_types)}, not {kind or 'no type'}")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise ApiError(411, "the request needs a Content-Length") from None
        if length > limit:
            self.discard(length)   # read it anyway, or the client may miss the answer below
            raise ApiError(413, f"the body is {length} bytes; the limit is {limit} bytes (--max_upload_mb)")
        return self.rfile.read(max(length, 0))

    def discard(self, length):
        while length > 0:
            chunk = self.rfile.read(min(length, 1 << 16))
            if not chunk:
                break
            length -= len(chunk)

    def read_json(self):
        try:
            body = json.loads(self.read_body(MAX_JSON_BYTES, ["application/json"]))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(400, f"the body is not JSON ({e})") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    def get_page(self):
        self.send_bytes(200, "text/html; charset=utf-8", self.server.page)

    def get_info(self):
        s = self.server
        return {"checkpoint": checkpoint_path(s.gen),
                "temperature": s.gen.temperature, "max_new_tokens": s.gen.max_new_tokens,
                "context": s.cfg.max_seq_len, "max_upload_bytes": int(s.gen.max_upload_mb * 2**20)}

    def post_image(self):
        raw = self.read_body(int(self.server.gen.max_upload_mb * 2**20), ["application/octet-stream", "image/"])
        image = data.image_from_bytes(raw, "the uploaded file")   # load_image's checks, on bytes
        return {"chat": self.server.new_chat(image), "width": image.width, "height": image.height}

    def post_scene(self):
        s = self.server
        index = s.rng.randrange(1_000_000)
        scene = evaluate.test_scene(s.cfg, index)
        image, png = shapes.render(scene), io.BytesIO()
        image.save(png, "PNG")
        examples = [{"kind": k, "question": q, "answer": a} for k, q, a in shapes.questions(scene, random.Random(index))]
        return {"chat": s.new_chat(image), "scene": index, "examples": examples,
                "image": "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()}

    def post_new(self):
        s, body = self.server, self.read_json()
        with s.lock:
            old = s.get_chat(body.get("chat"))
            del s.chats[body["chat"]]
        return {"chat": s.new_chat(old.image)}

    def post_chat(self):
        s, body = self.server, self.read_json()
        question = get_field(body, "question", str).strip()
        if not question:
            raise ApiError(400, "the question is empty")
        temperature = get_field(body, "temperature", float, s.gen.temperature)
        if not (math.isfinite(temperature) and 0 <= temperature <= 10):
            raise ApiError(400, "temperature must be between 0 (greedy) and 10")
        max_new_tokens = get_field(body, "max_new_tokens", int, s.gen.max_new_tokens)
        if not 1 <= max_new_tokens <= s.cfg.max_seq_len:
            raise ApiError(400, f"max_new_tokens must be between 1 and the context, {s.cfg.max_seq_len}")
        stream = get_field(body, "stream", bool, False)
        sampling = dict(s.sampling, temperature=temperature)
        with s.lock:   # one generation at a time; the history is read and written under the same lock
            chat = s.get_chat(body.get("chat"))
            messages = add_question(chat.messages, question)
            check_length(messages, s.model, s.tok, s.cfg, replace(s.gen, max_new_tokens=max_new_tokens))
            if stream:
                self.send_response(200)
                self.send_header("Content-Type", "application/x-ndjson")
                self.end_headers()   # no Content-Length: HTTP/1.0, the body ends when the connection closes
                pieces = []
                for piece in stream_answer(s.model, s.tok, chat.image, messages, s.cfg.image_size, s.device,
                                           max_new_tokens, **sampling):
                    pieces.append(piece)
                    self.wfile.write(json.dumps({"token": piece}).encode() + b"\n")
                    self.wfile.flush()
                answer = "".join(pieces)
            else:
                answer = evaluate.answer_batch(s.model, s.tok, [chat.image], [messages], s.cfg.image_size,
                                               s.device, max_new_tokens, **sampling)[0]
            chat.messages = messages + [{"role": "assistant", "content": answer}]
        result = {"answer": answer, "box": box_percent(answer)}
        if not stream:
            return result
        self.wfile.write(json.dumps(dict(result, done=True)).encode() + b"\n")


def is_loopback(host):
    return host == "localhost" or host == "::1" or host.startswith("127.")


def make_server(gen):
    """Load the checkpoint and bind the server (it starts answering on serve_forever())."""
    if gen.max_upload_mb <= 0:
        raise train.ConfigError("--max_upload_mb must be positive")
    if not 0 <= gen.port <= 65535:
        raise train.ConfigError(f"--port must be between 0 (any free port) and 65535, not {gen.port}")
    device = pick_device(gen)
    model, tok, cfg = load_vlm(checkpoint_path(gen), device)
    try:
        return ChatServer((gen.host, gen.port), model, tok, cfg, gen, device)
    except OSError as e:   # port in use, an address this machine does not have, ...
        raise train.ConfigError(f"cannot listen on {gen.host}:{gen.port} ({e.strerror or e})") from None


def serve(gen):
    if not is_loopback(gen.host):
        print(f"warning: --host={gen.host} lets other machines reach this page and use the model; "
              "there is no login", file=sys.stderr)
    server = make_server(gen)
    host, port = server.server_address[:2]
    print(f"chat page: http://{'[' + host + ']' if ':' in host else host}:{port}/  (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (train.ConfigError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
