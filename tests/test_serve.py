"""serve.py (generate.py --serve): the chat page's JSON API, started on a free loopback port inside the
test, and the page itself driven in a real headless browser (Debian's chromium through
selenium). Answers from the API are compared with evaluate.answer_batch, the path the command
line and the evaluation use; the untrained `ckpt` (conftest.py) is enough for that."""

import base64
import contextlib
import http.client
import io
import json
import os
import random
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate
import generate
import serve
import shapes
from checkpoint import load_checkpoint, save_checkpoint
from flags import ConfigError

ROOT = Path(__file__).resolve().parent.parent
BOX = "<box>(20,30),(60,80)</box>"


@contextlib.contextmanager
def running(ckpt_dir, **flags):
    """A chat server on a free loopback port, answering from a background thread."""
    server = serve.make_server(generate.GenerateConfig(out_dir=str(ckpt_dir), port=0, **flags))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def server(ckpt):
    with running(ckpt, max_upload_mb=0.05) as s:   # 52,428 bytes: enough for the test PNGs
        yield s


def call(server, path, body=None, method="POST", raw=None, content_type="application/json"):
    """(status, parsed JSON reply) of one request; raw sends bytes instead of a JSON body."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    payload = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    conn.request(method, path, body=payload, headers={"Content-Type": content_type} if content_type else {})
    response = conn.getresponse()
    status, text = response.status, response.read()
    conn.close()
    return status, json.loads(text)


def png_bytes(image):
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def scene_image(index):
    return shapes.render(shapes.make_scene("test", index, shapes.WorldConfig()))


def upload(server, image):
    status, reply = call(server, "/api/image", raw=png_bytes(image), content_type="application/octet-stream")
    assert status == 200, reply
    return reply["chat"]


def ask(server, chat, question, **settings):
    status, reply = call(server, "/api/chat", dict(chat=chat, question=question, **settings))
    assert status == 200, reply
    return reply["answer"]


def ask_streaming(server, chat, question, **settings):
    """The newline-delimited JSON events of a streamed answer, read as they arrive."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    conn.request("POST", "/api/chat", body=json.dumps(dict(chat=chat, question=question, stream=True, **settings)),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("Content-Type") == "application/x-ndjson"
    events = [json.loads(line) for line in response]
    conn.close()
    return events


def expected(server, image, messages, max_new_tokens=48):
    s = server
    return evaluate.answer_batch(s.model, s.tok, [image], [messages], s.cfg.image_size, "cpu", max_new_tokens)[0]


# ----------------------------------------------------------------------------- the API


def test_an_uploaded_image_is_answered_like_the_command_line(server, tmp_path):
    """An RGBA, non-square PNG uploaded as bytes gets exactly the answer evaluate.answer_batch
    gives for the same file read by data.load_image (the command line's path): the same
    decoding checks, alpha over white, the same squash to the model's size."""
    rgba = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 90, 4), dtype=np.uint8), "RGBA")
    rgba.save(tmp_path / "odd.png")
    status, reply = call(server, "/api/image", raw=(tmp_path / "odd.png").read_bytes(),
                         content_type="image/png")
    assert status == 200 and (reply["width"], reply["height"]) == (90, 50)
    answer = ask(server, reply["chat"], "What colour is the circle?", max_new_tokens=12)
    truth = expected(server, data.load_image(tmp_path / "odd.png"), data.question("What colour is the circle?"), 12)
    assert answer == truth and answer


def test_streamed_pieces_join_to_the_non_streamed_answer(server):
    """Token by token (several pieces, then a final event) and in one reply give the same text,
    on a first and on a second turn; the untrained model's answers are long and varied."""
    image = scene_image(4)
    streamed, whole = upload(server, image), upload(server, image)
    for question in ("Describe the image.", "Is there a red square?"):
        events = ask_streaming(server, streamed, question, max_new_tokens=30)
        pieces = [e["token"] for e in events[:-1]]
        assert len(pieces) > 3 and events[-1]["done"]
        assert "".join(pieces) == events[-1]["answer"] == ask(server, whole, question, max_new_tokens=30)


def test_stream_answer_equals_answer_batch_when_sampling_too(server):
    """The streaming generator and the batched generate() draw the same tokens from the same
    seeded generator: one decoding loop (VLM.stream) serves both."""
    s, image = server, scene_image(6)
    messages = data.question("What shape is the blue object?")
    sampling = dict(temperature=1.0, top_k=20)
    pieces = list(serve.stream_answer(s.model, s.tok, image, messages, s.cfg.image_size, "cpu", 30,
                                         generator=torch.Generator().manual_seed(3), **sampling))
    batched = evaluate.answer_batch(s.model, s.tok, [image], [messages], s.cfg.image_size, "cpu", 30,
                                    generator=torch.Generator().manual_seed(3), **sampling)[0]
    assert "".join(pieces) == batched and len(pieces) > 3
    assert batched != expected(server, image, messages, 30)   # sampling did change the answer


class ScriptedModel:
    """Stands in for the VLM in serve.stream_answer: it "samples" a fixed list of ids."""

    def __init__(self, model, ids):
        self.num_image_tokens, self.cfg, self.ids = model.num_image_tokens, model.cfg, ids

    def stream(self, input_ids, images, max_new_tokens, stop_id, **sampling):
        for t in self.ids[:max_new_tokens]:
            yield torch.tensor([t])  # (B=1,)


def test_streamed_text_never_shows_half_a_character_or_an_edge_space(server):
    """Pieces are shown only once they cannot change: an "é" or "€" whose UTF-8 bytes come as
    separate byte tokens appears whole, and spaces that the final strip() removes never appear
    (a no-break space, C2 A0, is one of them once its second byte arrives). The pieces join to
    the answer answer_batch gives (decode, strip), without what follows <|im_end|>."""
    tok = server.tok
    byte = lambda b: tok.ranks[bytes([b])]   # every single byte is a token (the byte fallback)
    scripts = [(tok.encode("  caf") + [byte(0xC3), byte(0xA9)] + tok.encode(" costs 3 ") + [byte(0xE2), byte(0x82)]
                + [byte(0xAC), byte(0xE2)] + tok.encode("  ") + [tok.im_end_id] + tok.encode("never shown"),
                "café costs 3 €\ufffd"),
               (tok.encode("one two ") + [byte(0xC2), byte(0xA0)], "one two")]
    for ids, answer in scripts:
        pieces = list(serve.stream_answer(ScriptedModel(server.model, ids), tok, scene_image(0),
                                             data.question("?"), server.cfg.image_size, "cpu", 40))
        assert "".join(pieces) == answer == tok.decode(ids[:ids.index(tok.im_end_id)] if tok.im_end_id in ids
                                                       else ids).strip()
        assert "\ufffd" not in "".join(pieces[:-1]) and len(pieces) > 1 and not pieces[0][0].isspace()


def test_bad_uploads_are_4xx_with_a_message(server):
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    cases = [(b"not an image", "application/octet-stream", 400, "not an image file"),
             (b"", "application/octet-stream", 400, "empty"),
             (png_bytes(noise)[:2000], "image/png", 400, "truncated"),
             (png_bytes(noise), "text/plain", 415, "application/octet-stream"),
             (bytes(60_000), "application/octet-stream", 413, "limit is 52428 bytes"),
             (bytes(3_000_000), "application/octet-stream", 413, "limit is 52428 bytes")]  # past socket buffers
    for raw, kind, status, message in cases:
        got, reply = call(server, "/api/image", raw=raw, content_type=kind)
        assert (got, list(reply)) == (status, ["error"]) and message in reply["error"], (kind, reply)
        assert "\n" not in reply["error"] and "Traceback" not in reply["error"]
    assert upload(server, scene_image(0))   # the server still answers


def test_routes_and_bad_requests(server):
    chat = upload(server, scene_image(1))
    cases = [("GET", "/nope", None, 404, "no such page"),
             ("GET", "/chat.html", None, 404, "no such page"),          # only / serves a file, a fixed one
             ("GET", "/../generate.py", None, 404, "no such page"),
             ("GET", "/api/chat", None, 405, "takes POST"),
             ("PUT", "/", None, 501, "Unsupported method"),
             ("POST", "/api/chat", {"chat": "feedface", "question": "hi"}, 404, "no such chat"),
             ("POST", "/api/chat", {"chat": chat}, 400, "'question' must be a str"),
             ("POST", "/api/chat", {"chat": chat, "question": "  "}, 400, "empty"),
             ("POST", "/api/chat", {"chat": chat, "question": "hi", "temperature": "hot"}, 400, "'temperature'"),
             ("POST", "/api/chat", {"chat": chat, "question": "hi", "temperature": -1}, 400, "between 0"),
             ("POST", "/api/chat", {"chat": chat, "question": "hi", "max_new_tokens": 0}, 400, "between 1"),
             ("POST", "/api/chat", {"chat": chat, "question": "why " * 300}, 400, "leaves room for"),
             ("POST", "/api/chat", [1, 2], 400, "JSON object"),
             ("POST", "/api/new", {"chat": 7}, 404, "no such chat")]
    for method, path, body, status, message in cases:
        got, reply = call(server, path, body, method=method)
        assert got == status and message in reply["error"], (path, body, reply)
    assert call(server, "/api/chat", raw=b"{nope")[0] == 400
    assert ask(server, chat, "How many shapes are there?", max_new_tokens=4) is not None   # no harm done


def test_interleaved_conversations_keep_their_own_history(server):
    """Two chats about two images, their turns interleaved: each second answer equals the
    answer to its own two-turn history, and differs from the one the other history gives."""
    images = [scene_image(2), scene_image(5)]
    chats = [upload(server, im) for im in images]
    first_questions = ["How many shapes are there?", "Describe the image."]
    firsts = [ask(server, c, q, max_new_tokens=10) for c, q in zip(chats, first_questions)]
    seconds = [ask(server, c, "What colour is the square?", max_new_tokens=10) for c in chats]
    histories = [data.question(q) + [{"role": "assistant", "content": a},
                                         {"role": "user", "content": "What colour is the square?"}]
                 for q, a in zip(first_questions, firsts)]
    for k in range(2):
        assert seconds[k] == expected(server, images[k], histories[k], 10)
        assert seconds[k] != expected(server, images[k], histories[1 - k], 10)   # a mix-up would show


def test_concurrent_requests_are_answered_one_at_a_time_without_mixing(server):
    images = [scene_image(7), scene_image(8), scene_image(9)]
    questions = ["Describe the image.", "How many shapes are there?", "Is there a red square?"]
    chats = [upload(server, im) for im in images]
    results = [None] * 3

    def worker(k):
        events = ask_streaming(server, chats[k], questions[k], max_new_tokens=20)
        results[k] = "".join(e.get("token", "") for e in events)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    truths = [expected(server, im, data.question(q), 20) for im, q in zip(images, questions)]
    assert results == truths and len(set(truths)) == 3


def test_new_chat_starts_over_on_the_same_image(server):
    image = scene_image(3)
    chat = upload(server, image)
    ask(server, chat, "Describe the image.", max_new_tokens=8)
    status, reply = call(server, "/api/new", {"chat": chat})
    assert status == 200 and reply["chat"] != chat
    assert call(server, "/api/chat", {"chat": chat, "question": "hi"})[0] == 404   # the old one is gone
    fresh = ask(server, reply["chat"], "What colour is the circle?", max_new_tokens=8)
    assert fresh == expected(server, image, data.question("What colour is the circle?"), 8)


def test_random_scene_is_a_held_out_scene_with_its_questions(server):
    status, reply = call(server, "/api/scene", {})
    assert status == 200
    scene = evaluate.test_scene(server.cfg, reply["scene"])
    png = base64.b64decode(reply["image"].removeprefix("data:image/png;base64,"))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), np.asarray(shapes.render(scene)))
    assert [(e["question"], e["answer"]) for e in reply["examples"]] == \
        [(q, a) for _, q, a in shapes.questions(scene, random.Random(reply["scene"]))]
    assert ask(server, reply["chat"], "How many shapes are there?", max_new_tokens=4) is not None


def test_the_command_line_serves_the_page(ckpt):
    """`generate.py --serve --port=0` prints its address and serves the page and the API."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "generate.py"), "--serve", "--port=0",
                             "--out_dir", str(ckpt)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("chat page: http://127.0.0.1:"), line + proc.stderr.read()
        port = int(line.split(":")[3].split("/")[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/")
        page = conn.getresponse().read().decode()
        assert "<title>tinyvlm chat</title>" in page and "http" not in page.split("<body>")[1]   # no external URL
    finally:
        proc.terminate()
        proc.wait(30)


def test_serve_flags_are_checked_before_loading_anything(tmp_path):
    for flags, message in [(["--port=70000"], "--port must be between"), (["--max_upload_mb=0"], "positive")]:
        with pytest.raises(ConfigError, match=message):   # main() prints it as one line, exit 2
            generate.main(["--serve", "--out_dir", str(tmp_path), *flags])   # no checkpoint there


def test_only_loopback_hosts_count_as_private():
    assert all(serve.is_loopback(h) for h in ("127.0.0.1", "127.0.1.1", "localhost", "::1"))
    assert not any(serve.is_loopback(h) for h in ("0.0.0.0", "", "::", "192.168.1.5", "example.com"))


# ----------------------------------------------------------------------------- the page in a browser


@pytest.fixture(scope="module")
def box_ckpt(ckpt, tmp_path_factory):
    """The tiny checkpoint taught one answer, a grounding box for "Where is the circle?" about
    test scene 3, so that the page has a box to draw (a few dozen steps, about a second)."""
    model, tok, cfg = generate.load_vlm(str(ckpt / "instruct.pt"))
    messages = data.question("Where is the circle?") + [{"role": "assistant", "content": BOX}]
    ids, labels = data.encode_chat(tok, messages, model.num_image_tokens)
    pixels = data.preprocess(scene_image(3), cfg.image_size)[None]  # (1, 3, S, S)
    model.vision.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(400):
        _, loss = model(torch.tensor([ids]), pixels, labels=torch.tensor([labels]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.05:   # greedy decoding then gives BOX (the test below checks it)
            break
    payload = load_checkpoint(str(ckpt / "instruct.pt"))
    payload["model"] = model.state_dict()
    out = tmp_path_factory.mktemp("box")
    save_checkpoint(str(out / "instruct.pt"), payload)
    return out


def test_a_grounding_answer_comes_with_its_box(box_ckpt):
    with running(box_ckpt) as s:
        status, reply = call(s, "/api/chat", {"chat": upload(s, scene_image(3)), "question": "Where is the circle?"})
    assert status == 200 and reply == {"answer": BOX, "box": [20, 30, 60, 80]}


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless chromium. Missing here: skipped, with the reason in pytest's summary (-rs in
    pytest.ini); in CI (the CI variable set, as .ci/run does): a failure."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    try:
        from selenium import webdriver
    except ImportError:
        missing.append("the selenium package (requirements-dev.txt)")
    if missing:
        reason = "browser test needs " + ", ".join(missing) + " (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1100,720", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def test_the_page_in_a_browser(browser, box_ckpt, tmp_path):
    """Upload an image through the file input, ask, see the answer appear in the chat and the
    box drawn over the image where the answer puts it; a second turn; then "New chat"."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    scene_image(3).save(tmp_path / "scene.png")
    wait = WebDriverWait(browser, 20)
    with running(box_ckpt) as s:
        browser.get(f"http://127.0.0.1:{s.server_address[1]}/")
        browser.find_element(By.ID, "file").send_keys(str(tmp_path / "scene.png"))
        question = browser.find_element(By.ID, "question")
        wait.until(lambda _: question.is_enabled())
        question.send_keys("Where is the circle?\n")
        answers = lambda _: [m.text for m in browser.find_elements(By.CSS_SELECTOR, ".assistant:not(.pending)")]
        wait.until(lambda d: BOX in answers(d))
        box, picture = browser.find_element(By.ID, "box"), browser.find_element(By.ID, "picture")
        assert box.is_displayed()
        b, p = box.rect, picture.rect
        for got, want in [(b["x"], p["x"] + 0.2 * p["width"]), (b["y"], p["y"] + 0.3 * p["height"]),
                          (b["width"], 0.4 * p["width"]), (b["height"], 0.5 * p["height"])]:
            assert abs(got - want) <= 1, (b, p)
        question.send_keys("Where is the circle?\n")   # a second turn, with the first in its history
        wait.until(lambda d: len(answers(d)) == 2)
        assert [m.text for m in browser.find_elements(By.CSS_SELECTOR, ".user")] == ["Where is the circle?"] * 2
        browser.find_element(By.ID, "new-chat").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".message")) == 1)
        assert not box.is_displayed()
