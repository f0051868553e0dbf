"""Tests for clip.py: the loss against a hand loop, the temperature, the eot pooling,
the evaluation helpers on hand-made cases, and a tiny CLIP that must learn."""
import math

import pytest
import torch

from clip import (CLIP, CLIPConfig, clip_loss, linear_probe, retrieval_recall, tokenize,
                  zero_shot_classifier, zero_shot_predict, zero_shot_weights)
from vit import ViTConfig

EOT, PAD = 1, 0  # stand-ins for the tokenizer's ids; the model only needs eot_id


def tiny_clip(seed=0):
    torch.manual_seed(seed)
    cfg = CLIPConfig(vit=ViTConfig(image_size=16, patch_size=4, width=32, depth=2, heads=2),
                     vocab_size=16, context_length=8, text_width=32, text_depth=2, text_heads=2, embed_dim=32)
    return CLIP(cfg, eot_id=EOT)


def test_clip_loss_matches_hand_loop():
    torch.manual_seed(0)
    logits = torch.randn(5, 5) * 3
    L = logits.tolist()
    n = len(L)
    # -log softmax of the diagonal, row-wise (image -> text) and column-wise (text -> image)
    rows = sum(-L[i][i] + math.log(sum(math.exp(L[i][j]) for j in range(n))) for i in range(n)) / n
    cols = sum(-L[j][j] + math.log(sum(math.exp(L[i][j]) for i in range(n))) for j in range(n)) / n
    assert abs(clip_loss(logits).item() - (rows + cols) / 2) < 1e-5


def test_temperature_init_and_clamp():
    m = tiny_clip()
    assert abs(m.scale().item() - 1 / 0.07) < 1e-4
    with torch.no_grad():
        m.logit_scale.fill_(10.0)  # exp(10) ~ 22026 without the clamp
    assert abs(m.scale().item() - 100.0) < 1e-3
    images, ids = torch.randn(3, 3, 16, 16), torch.tensor([[2, 3, EOT], [4, EOT, PAD], [5, 6, EOT]])
    _, logits = m(images, ids)
    cos = m.encode_image(images) @ m.encode_text(ids).T
    torch.testing.assert_close(logits, 100.0 * cos)
    assert cos.abs().max() <= 1 + 1e-5


def test_text_pooling_reads_first_eot_and_ignores_padding():
    m = tiny_clip().eval()
    ids = torch.tensor([[2, 3, 4, EOT, PAD, PAD, PAD],
                        [5, EOT, PAD, PAD, PAD, PAD, PAD],
                        [6, 7, EOT, 8, EOT, 9, PAD]])  # two eots: the first counts
    emb = m.encode_text(ids)
    # each row alone, cut right after its first eot (no padding at all), gives the same vector
    for i, end in enumerate([4, 2, 3]):
        torch.testing.assert_close(m.encode_text(ids[i:i + 1, :end])[0], emb[i], atol=1e-5, rtol=1e-5)
    # anything after the eot may change, the embedding does not
    noisy = ids.clone()
    noisy[0, 4:] = torch.tensor([9, 10, 11])
    noisy[1, 2:] = 15
    torch.testing.assert_close(m.encode_text(noisy), emb, atol=1e-5, rtol=1e-5)
    # a token before the eot does change it (the test above is not vacuous)
    changed = ids.clone()
    changed[0, 0] = 12
    assert (m.encode_text(changed)[0] - emb[0]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="end-of-text"):
        m.encode_text(torch.tensor([[2, 3, 4]]))


def test_retrieval_recall_known_ranks():
    # 4 pairs; similarity matrix sim = image_emb @ text_emb.T is built directly by
    # taking text_emb = identity, so sim = image_emb
    text = torch.eye(4)
    image = torch.tensor([[0.9, 0.1, 0.0, 0.0],   # image 0: its text ranks 1st
                          [0.8, 0.5, 0.0, 0.0],   # image 1: 2nd
                          [0.7, 0.6, 0.4, 0.0],   # image 2: 3rd
                          [0.3, 0.2, 0.1, 0.0]])  # image 3: 4th
    r = retrieval_recall(image, text, ks=(1, 2, 3))
    assert r["image_to_text_r1"] == 0.25 and r["image_to_text_r2"] == 0.5 and r["image_to_text_r3"] == 0.75
    # columns: text 0 ranks image 0 first (0.9); text 1's image scores 0.5 < 0.6: 2nd;
    # text 2's 0.4 is its column's max: 1st; text 3's column is all zeros, ties count against: 4th
    assert r["text_to_image_r1"] == 0.5 and r["text_to_image_r2"] == 0.75 and r["text_to_image_r3"] == 0.75
    collapsed = retrieval_recall(torch.ones(5, 3), torch.ones(5, 3), ks=(1,))
    assert collapsed == {"image_to_text_r1": 0.0, "text_to_image_r1": 0.0}


def test_zero_shot_ensembling_math():
    # class 0: templates (3,4) and (0,2) -> normalised (0.6,0.8),(0,1) -> mean (0.3,0.9) -> /sqrt(0.9)
    # class 1: templates (2,0) and (5,0) -> both (1,0)
    emb = torch.tensor([[[3.0, 4.0], [0.0, 2.0]], [[2.0, 0.0], [5.0, 0.0]]])
    w = zero_shot_weights(emb)
    s = math.sqrt(0.9)
    torch.testing.assert_close(w, torch.tensor([[0.3 / s, 0.9 / s], [1.0, 0.0]]))
    pred = zero_shot_predict(torch.tensor([[0.1, 1.0], [1.0, 0.2], [0.9, 0.5], [0.7, 0.6]]), w)
    # third: 0.9*0.316 + 0.5*0.949 = 0.76 < 0.9 -> class 1; fourth: 0.79 > 0.7 -> class 0
    assert pred.tolist() == [0, 1, 1, 0]


class ByteTok:
    """A stand-in tokenizer: one id per character, ids 2.. ; eot 1, pad 0."""
    eot_id, pad_id = EOT, PAD

    def encode(self, text):
        return [2 + ord(ch) % 14 for ch in text]


def test_tokenize_and_zero_shot_classifier():
    tok = ByteTok()
    ids = tokenize(tok, ["ab", "abcd", "a" * 20], context_length=8)
    assert ids.tolist()[0] == [tok.encode("ab")[0], tok.encode("b")[0], EOT, 0, 0, 0, 0, 0]
    assert ids.shape == (3, 8) and ids[2, 7] == EOT  # the long one is cut so its eot fits
    m = tiny_clip().eval()
    classes, templates = ["ab", "cd", "ef"], ["{}", "x {}", "{} y"]
    w = zero_shot_classifier(m, tok, classes, templates)
    for c, name in enumerate(classes):
        per_template = torch.cat([m.encode_text(tokenize(tok, [t.format(name)], 8)) for t in templates])
        ref = per_template.mean(0)
        torch.testing.assert_close(w[c], ref / ref.norm(), atol=1e-5, rtol=1e-5)


def test_linear_probe_separable_and_random():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 3
    def sample(n):
        y = torch.randint(0, 4, (n,), generator=g)
        return centres[y] + torch.randn(n, 16, generator=g), y
    (xtr, ytr), (xte, yte) = sample(400), sample(400)
    assert linear_probe(xtr, ytr, xte, yte, steps=100) >= 0.99
    # random labels carry no signal: test accuracy stays near chance (0.25); with 400
    # test samples a score above 0.35 would be 4.6 standard deviations from chance
    ytr_rand, yte_rand = torch.randint(0, 4, (400,), generator=g), torch.randint(0, 4, (400,), generator=g)
    with torch.no_grad():  # it must train even when called under no_grad
        acc = linear_probe(xtr, ytr_rand, xte, yte_rand, steps=100)
    assert acc < 0.35


COLOURS = torch.tensor([[r, g, b] for r in (-1.0, 1.0) for g in (-1.0, 1.0) for b in (-1.0, 1.0)])  # 8 corners


def colour_batch(classes, gen):
    """Solid-colour 16x16 images (plus a little noise) and their class captions
    `c+2, 10+c%3, eot` (two tokens per class)."""
    images = COLOURS[classes][:, :, None, None].expand(-1, -1, 16, 16)
    images = images + 0.3 * torch.randn(len(classes), 3, 16, 16, generator=gen)
    ids = torch.stack([torch.tensor([2 + c, 10 + c % 3, EOT]) for c in classes.tolist()])
    return images, ids


def test_tiny_clip_learns_colour_classes():
    """8 classes, one pair per class in each batch: chance is loss ln 8 = 2.08 and R@1 = 1/8."""
    m = tiny_clip(seed=0)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for step in range(150):
        images, ids = colour_batch(torch.randperm(8, generator=gen), gen)
        loss, _ = m(images, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert last < first / 2, (first, last)
    m.eval()
    with torch.no_grad():
        images, ids = colour_batch(torch.randperm(8, generator=gen), gen)  # fresh noise
        r = retrieval_recall(m.encode_image(images), m.encode_text(ids), ks=(1,))
    assert r["image_to_text_r1"] >= 0.75 and r["text_to_image_r1"] >= 0.75, r
