"""
serve.py — the chat page behind `python generate.py --serve`: a local web page (chat.html,
beside this file) to chat about an image, the way LLaVA shipped a demo beside its code
("Visual Instruction Tuning", Liu et al. 2023, arXiv:2304.08485).

    python generate.py --serve                         # then open http://127.0.0.1:8000
    python generate.py --serve --port=0 --out_dir=out  # any free port, out/instruct.pt

The standard library's http.server serves the page and a small JSON API over the functions
the command line uses (generate.py: load_vlm, check_length; evaluate.answer_batch); answers
stream token by token from VLM.stream. One generation runs at a time; conversations live in
the server under ids the page holds.

  GET  /              the page (chat.html)
  GET  /api/info      the checkpoint, the default settings and the upload limit
  POST /api/image     body: the image file's bytes  -> {"chat": id, "width", "height"}
  POST /api/scene     a random held-out shapes-world scene -> {"chat": id, "scene", "image": PNG data URL, "examples"}
  POST /api/new       {"chat": id} -> {"chat": new id}: the same image, an empty history
  POST /api/chat      {"chat": id, "question", "temperature"?, "max_new_tokens"?, "stream"?}
                      -> {"answer", "box"}; with "stream": true, newline-delimited JSON:
                      {"token": text} per piece, then {"done": true, "answer", "box"}
Errors are {"error": message} with a 4xx status. "box" is the answer's first
<box>(x0,y0),(x1,y1)</box> as [x0, y0, x1, y1] in percent of width and height, or null.

Shapes: V image views, S image side, T prompt tokens.
Run the tests:  python -m pytest -q tests/test_serve.py
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
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import torch

import data
import evaluate
import shapes
from flags import ConfigError
from generate import add_question, check_length, checkpoint_path, load_vlm, pick_device, sampling_settings

MAX_CHATS = 64               # the oldest conversation is dropped beyond this many
MAX_JSON_BYTES = 64 * 1024   # a request body with a question, not an image
PAGE = Path(__file__).with_name("chat.html")


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
        except (ConfigError, data.ImageError) as e:   # the same one-line errors as the command line
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
        raise ConfigError("--max_upload_mb must be positive")
    if not 0 <= gen.port <= 65535:
        raise ConfigError(f"--port must be between 0 (any free port) and 65535, not {gen.port}")
    device = pick_device(gen)
    model, tok, cfg = load_vlm(checkpoint_path(gen), device)
    try:
        return ChatServer((gen.host, gen.port), model, tok, cfg, gen, device)
    except OSError as e:   # port in use, an address this machine does not have, ...
        raise ConfigError(f"cannot listen on {gen.host}:{gen.port} ({e.strerror or e})") from None


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
