"""Tests for tokenizer.py: BPE training against hand-computed merges and a naive reference,
round trips of any text, special tokens, the checkpoint state and tokenizer.json.
Run: python -m pytest -q tests/test_tokenizer.py"""
import collections
import io
import json
import random
import time

import pytest
import regex
import tiktoken
import torch

import tokenizer
from tokenizer import Tokenizer, train_bpe

N_SPECIAL = len(tokenizer.SPECIAL_TOKENS)


# ----------------------------------------------------------------------------- BPE

# The Hugging Face course's BPE example, one chunk per text (no spaces, so the GPT-2 regex
# keeps each word whole). Pair counts worked out by hand:
#   u+g 20 (hug 10, pug 5, hugs 5) > p+u 17 > u+n 16 > h+u 15          -> merge "ug"
#   u+n 16 (pun 12, bun 4) > h+ug 15 > p+u 12                          -> merge "un"
#   h+ug 15 (hug 10, hugs 5) > p+un 12                                 -> merge "hug"
#   p+un 12 > p+ug 5 = hug+s 5 > b+un 4                                -> merge "pun"
#   tie at 5: (b"hug", b"s") < (b"p", b"ug") lexicographically         -> merge "hugs"
#   then "pug" (5), then "bun" (4); every word is then one token, so training stops.
HUG_CORPUS = ["hug"] * 10 + ["pug"] * 5 + ["pun"] * 12 + ["bun"] * 4 + ["hugs"] * 5
HUG_MERGES = [b"ug", b"un", b"hug", b"pun", b"hugs", b"pug", b"bun"]


def merged_tokens(ranks):
    return sorted((t for t in ranks if ranks[t] >= 256), key=ranks.get)


def test_bpe_first_merges_are_the_hand_computed_ones():
    ranks = train_bpe(HUG_CORPUS, vocab_size=1000)
    assert all(ranks[bytes([b])] == b for b in range(256))   # the 256 bytes first, in byte order
    assert merged_tokens(ranks) == HUG_MERGES                # stopped: no pair occurs twice
    ranks3 = train_bpe(HUG_CORPUS, vocab_size=256 + N_SPECIAL + 3)
    assert merged_tokens(ranks3) == HUG_MERGES[:3] and len(ranks3) == 259
    tok = Tokenizer(ranks)
    assert tok.encode("hugs") == [ranks[b"hugs"]] and tok.encode("bun") == [ranks[b"bun"]]


def naive_bpe(texts, vocab_size):
    """Reference: recount every pair over every chunk occurrence at each step (slow, obvious)."""
    chunks = [list(c.encode()) for t in texts for c in regex.findall(tokenizer.GPT2_SPLIT_PATTERN, t)]
    words = [[bytes([b]) for b in c] for c in chunks]
    ranks = {bytes([b]): b for b in range(256)}
    while len(ranks) < vocab_size - N_SPECIAL:
        counts = collections.Counter(p for w in words for p in zip(w, w[1:]))
        if not counts or max(counts.values()) < 2:
            break
        top = max(counts.values())
        best = sorted(p for p, c in counts.items() if c == top)[0]
        for w in words:
            k = 0
            while k < len(w) - 1:
                if (w[k], w[k + 1]) == best:
                    w[k:k + 2] = [w[k] + w[k + 1]]
                k += 1
        ranks.setdefault(best[0] + best[1], len(ranks))
    return ranks


def random_corpus(seed, n_texts=300):
    rng = random.Random(seed)
    words = ["".join(rng.choice("aab cdé日") for _ in range(rng.randint(1, 7))) for _ in range(40)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 8))) + rng.choice([".", "!", "", " 42"])
            for _ in range(n_texts)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bpe_matches_naive_reference(seed):
    texts = random_corpus(seed)
    assert train_bpe(texts, 256 + N_SPECIAL + 80) == naive_bpe(texts, 256 + N_SPECIAL + 80)


def test_bpe_is_deterministic_and_independent_of_text_order():
    texts = random_corpus(3)
    shuffled = texts[:]
    random.Random(0).shuffle(shuffled)
    assert train_bpe(texts, 400) == train_bpe(texts, 400) == train_bpe(shuffled, 400)


def test_bpe_vocab_size_respected_and_fast():
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
             for _ in range(200)]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 10))) + "." for _ in range(20000)]
    start = time.perf_counter()
    ranks = train_bpe(texts, 512)
    assert time.perf_counter() - start < 3.0
    assert len(ranks) == 512 - N_SPECIAL and sorted(ranks.values()) == list(range(512 - N_SPECIAL))
    assert Tokenizer(ranks).vocab_size == 512
    with pytest.raises(ValueError):
        train_bpe(texts, 256 + N_SPECIAL - 1)


# ----------------------------------------------------------------------------- tokenizer


def test_round_trip_any_text(tok):
    rng = random.Random(0)
    texts = ["What colour is the circle?", "crème brûlée à la façon", "日本語のテキスト", "👋🏽 hi 👋",
             "", "  \n\t  trailing   ", "tabs\tand\r\nlines\n\n"]
    texts += [rng.randbytes(rng.randint(1, 64)).decode("utf-8", errors="replace") for _ in range(50)]
    for text in texts:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size - N_SPECIAL for i in ids)
        assert tok.decode(ids) == text
    assert tok.encode("") == []


def test_special_strings_in_text_stay_text_and_specials_decode(tok):
    n = tok.vocab_size - N_SPECIAL
    for k, s in enumerate(tokenizer.SPECIAL_TOKENS):
        assert tok.special_ids[s] == n + k
        ids = tok.encode(f"say {s} now")
        assert all(i < n for i in ids) and tok.decode(ids) == f"say {s} now"
        assert tok.decode([n + k]) == s
    assert (tok.eot_id, tok.pad_id, tok.im_start_id, tok.im_end_id, tok.image_id, tok.global_image_id) == \
        tuple(range(n, n + 6))
    assert tok.row_col_id(1, 1) == n + 6 and tok.row_col_id(4, 4) == n + N_SPECIAL - 1
    assert tok.decode([tok.row_col_id(2, 3)]) == "<row_2_col_3>"
    assert tok.decode([ord("a"), 0xC3]) == "a\ufffd"   # a cut UTF-8 sequence -> replacement char


def test_state_survives_torch_save_weights_only(tok):
    buf = io.BytesIO()
    torch.save({"tokenizer": tok.state()}, buf)
    buf.seek(0)
    loaded = Tokenizer.from_state(torch.load(buf, weights_only=True)["tokenizer"])
    assert loaded.ranks == tok.ranks and loaded.vocab_size == tok.vocab_size
    text = "Is there a blue 👋🏽 square? <|im_end|> yes"
    assert loaded.encode(text) == tok.encode(text)
    bad = tok.state() | {"special_tokens": ["<|endoftext|>"]}
    with pytest.raises(ValueError):
        Tokenizer.from_state(bad)


def test_gpt2_tokenizer_puts_specials_after_its_vocabulary(monkeypatch):
    # Stand-in for tiktoken's gpt2 (no network in tests): 256 bytes + one merge, eot last.
    ranks = {bytes([b]): b for b in range(256)} | {b"hi": 256}
    fake = tiktoken.Encoding(name="fake", pat_str=tokenizer.GPT2_SPLIT_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 257})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: fake)
    tok = Tokenizer.gpt2()
    assert tok.eot_id == 257 and tok.vocab_size == 257 + N_SPECIAL and tok.encode("hi") == [256]

    def offline(name):
        raise ConnectionError("no network")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(RuntimeError, match="gpt2"):
        Tokenizer.gpt2()


def test_tokenizer_file_round_trips_and_reads_as_text(tmp_path):
    tok = Tokenizer(train_bpe(["the red circle is left of the blue square"] * 20, 320))
    tok.save(str(tmp_path / "tokenizer.json"))
    again = Tokenizer.load(str(tmp_path / "tokenizer.json"))
    assert again.ranks == tok.ranks and again.encode("a red circle") == tok.encode("a red circle")
    assert " circle" in json.loads((tmp_path / "tokenizer.json").read_text())["tokens"]
