"""
tokenizer.py — the byte-level BPE tokenizer: trained here from the training text, served by
`tiktoken`.

BPE: Sennrich et al., "Neural Machine Translation of Rare Words with Subword Units", 2016,
arXiv:1508.07909, on raw UTF-8 bytes with the GPT-2 pre-tokenisation regex (Radford et al.,
"Language Models are Unsupervised Multitask Learners", 2019), so any string encodes with no
unknown token. train_bpe learns the merge ranks; `tiktoken` does the encoding, we only supply
its ranks. The special tokens (the chat template's, data.py) get the ids right after the ranks.

    tok = Tokenizer(train_bpe(["a red circle", "a blue square"] * 10, vocab_size=300))
    tok.decode(tok.encode("a red square"))   # 'a red square'

Run the tests:  python -m pytest -q tests/test_tokenizer.py
"""
import collections
import heapq
import json
import os

import regex
import tiktoken
import torch

# GPT-2's split pattern, exactly tiktoken's `gpt2` pat_str: contractions, runs of letters,
# runs of digits, runs of other symbols (each with one optional leading space), whitespace.
# BPE never merges across these chunks, so " the" and "the." never share a token.
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>", "<|image|>",
                  "<global_image>"] + [f"<row_{i}_col_{j}>" for i in range(1, 5) for j in range(1, 5)]



def _merge(symbols, pair):
    """Replace every non-overlapping occurrence of `pair`, left to right, by its concatenation."""
    out, k = [], 0
    while k < len(symbols):
        if k + 1 < len(symbols) and (symbols[k], symbols[k + 1]) == pair:
            out.append(symbols[k] + symbols[k + 1])
            k += 2
        else:
            out.append(symbols[k])
            k += 1
    return out


def train_bpe(texts, vocab_size):
    """Learn byte-level BPE ranks: {token bytes: rank}, the 256 single bytes first.

    Each merge joins the most frequent adjacent pair of tokens (ties: the lexicographically
    smallest pair) and gets the next rank. Stops at vocab_size - len(SPECIAL_TOKENS) ranks or
    when no pair occurs twice. Works on unique chunks, updating pair counts incrementally
    (tests/test_tokenizer.py checks it against a naive version that recounts everything per merge).
    """
    n_ranks = vocab_size - len(SPECIAL_TOKENS)
    if n_ranks < 256:
        raise ValueError(f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)} "
                         f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens), got {vocab_size}")
    # A sentence set repeats the same words thousands of times: count each chunk once.
    pattern = regex.compile(GPT2_SPLIT_PATTERN)
    chunk_counts = collections.Counter(c for text in texts for c in pattern.findall(text))
    words = [[bytes([b]) for b in chunk.encode("utf-8")] for chunk in chunk_counts]
    freqs = list(chunk_counts.values())
    ranks = {bytes([b]): b for b in range(256)}
    # pair -> total frequency, and pair -> which words contain it (so a merge touches only those).
    pair_counts, where = collections.Counter(), collections.defaultdict(set)
    for i, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freqs[i]
            where[pair].add(i)
    # A max-heap of (-count, pair) finds the best pair without scanning every pair each merge;
    # ties pop the smallest pair. Counts change as words merge, so an entry whose count is no
    # longer the pair's current count is stale and skipped (the change pushed a fresh entry).
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    while len(ranks) < n_ranks and heap:
        neg_count, best = heapq.heappop(heap)
        if pair_counts.get(best) != -neg_count:
            continue
        if -neg_count < 2:
            break
        changed = set()
        for i in list(where[best]):
            old, new = words[i], _merge(words[i], best)
            for pair in zip(old, old[1:]):
                pair_counts[pair] -= freqs[i]
                where[pair].discard(i)
            for pair in zip(new, new[1:]):
                pair_counts[pair] += freqs[i]
                where[pair].add(i)
            changed.update(zip(old, old[1:]), zip(new, new[1:]))
            words[i] = new
        for pair in changed:
            if pair_counts[pair] > 0:
                heapq.heappush(heap, (-pair_counts[pair], pair))
            else:
                del pair_counts[pair], where[pair]
        # Two merge paths can spell the same bytes ("a"+"bc", "ab"+"c"): one rank per token.
        ranks.setdefault(best[0] + best[1], len(ranks))
    return ranks


class Tokenizer:
    """BPE ranks served by tiktoken, with SPECIAL_TOKENS given the ids right after the ranks."""

    def __init__(self, ranks):
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise ValueError("tokenizer ranks must be exactly 0 .. len(ranks) - 1")
        if any(bytes([b]) not in ranks for b in range(256)):
            raise ValueError("tokenizer ranks must contain all 256 single bytes (the byte fallback)")
        self.ranks = ranks
        self.special_ids = {s: len(ranks) + k for k, s in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(name="tinyvlm", pat_str=GPT2_SPLIT_PATTERN,
                                     mergeable_ranks=ranks, special_tokens=self.special_ids)
        self.vocab_size = len(ranks) + len(SPECIAL_TOKENS)
        self.eot_id = self.special_ids["<|endoftext|>"]
        self.pad_id = self.special_ids["<|pad|>"]
        self.im_start_id = self.special_ids["<|im_start|>"]
        self.im_end_id = self.special_ids["<|im_end|>"]
        self.image_id = self.special_ids["<|image|>"]
        self.global_image_id = self.special_ids["<global_image>"]

    def row_col_id(self, i, j):
        """Id of <row_i_col_j>, the tag before tile (i, j) of a tiled image (1-based, up to 4x4)."""
        return self.special_ids[f"<row_{i}_col_{j}>"]

    def encode(self, text):
        # encode_ordinary: a user who types "<|im_end|>" gets those characters as plain text,
        # never the control token — otherwise text could forge turns of the chat template.
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self.enc.decode(ids, errors="replace")   # a cut multi-byte character -> U+FFFD

    def state(self):
        """The ranks as tensors, which torch.load(weights_only=True) accepts in a checkpoint."""
        tokens = sorted(self.ranks, key=self.ranks.get)   # token bytes in rank order
        return {"ranks": {"token_bytes": torch.tensor(list(b"".join(tokens)), dtype=torch.uint8),
                          "token_lengths": torch.tensor([len(t) for t in tokens], dtype=torch.int64)},
                "special_tokens": list(SPECIAL_TOKENS)}

    def save(self, path):
        """A readable tokenizer.json: the tokens in rank order, each byte shown as the one
        Latin-1 character of the same number (so " circle" reads as itself), written atomically."""
        tokens = sorted(self.ranks, key=self.ranks.get)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"special_tokens": list(SPECIAL_TOKENS), "tokens": [t.decode("latin-1") for t in tokens]},
                      f, indent=0)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path):
        with open(path) as f:
            saved = json.load(f)
        if saved.get("special_tokens") != SPECIAL_TOKENS:
            raise ValueError("its special tokens differ from this tokenizer.py's")
        return cls({t.encode("latin-1"): rank for rank, t in enumerate(saved["tokens"])})

    @classmethod
    def from_state(cls, state):
        if state.get("special_tokens", SPECIAL_TOKENS) != SPECIAL_TOKENS:
            raise ValueError("checkpoint tokenizer has different special tokens than this tokenizer.py")
        blob = state["ranks"]["token_bytes"].numpy().tobytes()   # all tokens' bytes, end to end
        ranks, start = {}, 0
        for rank, length in enumerate(state["ranks"]["token_lengths"].tolist()):
            ranks[blob[start:start + length]] = rank
            start += length
        return cls(ranks)

    @classmethod
    def gpt2(cls):
        """GPT-2's ranks with our specials right after them, so <|endoftext|> keeps GPT-2's own id."""
        try:
            enc = tiktoken.get_encoding("gpt2")
        except Exception as e:
            raise RuntimeError(f"tokenizer gpt2 needs tiktoken's GPT-2 files from the network "
                               f"(or a TIKTOKEN_CACHE_DIR copy); loading failed: {type(e).__name__}") from e
        gpt2_specials = {enc.encode_single_token(s) for s in enc.special_tokens_set}
        ranks = {enc.decode_single_token_bytes(i): i for i in range(enc.n_vocab) if i not in gpt2_specials}
        return cls(ranks)
