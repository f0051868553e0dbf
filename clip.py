"""
CLIP: an image tower and a text tower trained so that matching image-caption
pairs land close together in one joint embedding space.

The image tower is vit.ViT; the text tower is a small causal transformer read at
its end-of-text token. Both are projected linearly into the joint space and
L2-normalised, so a dot product is a cosine similarity. A batch of B pairs gives
a B x B similarity matrix whose diagonal holds the true pairs; the symmetric
InfoNCE loss asks each row and each column to pick its diagonal entry.
Evaluation: zero-shot classification from prompt templates, retrieval recall@k,
and a linear probe on frozen features.

Paper: "Learning Transferable Visual Models From Natural Language Supervision",
Radford et al. 2021, arXiv:2103.00020 (the pseudo-code of Figure 3 is clip_loss).
The image tower: "An Image is Worth 16x16 Words", Dosovitskiy et al. 2020,
arXiv:2010.11929.

Shapes:  B batch, L text length, W text width, D image width, E joint embedding
         dim, C classes, K prompt templates per class, F probe feature dim.

Run the tests:  python -m pytest -q tests/test_clip.py
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from vit import Block, ViT, ViTConfig, init_weights


@dataclass
class CLIPConfig:
    vit: ViTConfig = field(default_factory=ViTConfig)
    vocab_size: int = 512
    context_length: int = 32  # longest token sequence, end-of-text token included
    text_width: int = 128
    text_depth: int = 2
    text_heads: int = 4
    embed_dim: int = 128
    init_temperature: float = 0.07  # the paper's initial softmax temperature

    def __post_init__(self):
        if isinstance(self.vit, dict):  # rebuilt from asdict(cfg), e.g. out of a checkpoint
            self.vit = ViTConfig(**self.vit)
        if self.text_width % self.text_heads:
            raise ValueError(f"text_width {self.text_width} is not a multiple of text_heads {self.text_heads}")


class TextTransformer(nn.Module):
    """Token + learned position embeddings, causal Blocks, final LayerNorm, read at
    the end-of-text token.

    eot_id: the tokenizer's end-of-text id. Every row of ids must contain it; the
    row's feature is the output at its FIRST eot. Whatever follows (padding, any id)
    cannot change that feature, because causal attention never looks ahead.
    """

    def __init__(self, cfg: CLIPConfig, eot_id: int):
        super().__init__()
        self.eot_id, self.context_length = eot_id, cfg.context_length
        self.token_emb = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.pos_emb = nn.Parameter(torch.zeros(1, cfg.context_length, cfg.text_width))
        self.blocks = nn.ModuleList(Block(cfg.text_width, cfg.text_heads, causal=True) for _ in range(cfg.text_depth))
        self.ln_f = nn.LayerNorm(cfg.text_width)
        self.apply(init_weights)
        nn.init.normal_(self.pos_emb, std=0.02)

    def forward(self, ids):
        """ids (B, L) with L <= context_length -> (B, W) features at each row's first eot."""
        B, L = ids.shape
        if L > self.context_length:
            raise ValueError(f"text of {L} tokens is longer than context_length {self.context_length}")
        is_eot = ids == self.eot_id  # (B, L)
        if not is_eot.any(dim=1).all():
            raise ValueError(f"every row of ids needs the end-of-text token {self.eot_id}")
        x = self.token_emb(ids) + self.pos_emb[:, :L]  # (B, L, W)
        for block in self.blocks:
            x = block(x)  # (B, L, W)
        x = self.ln_f(x)  # (B, L, W)
        # the eot token has attended to the whole caption and to nothing after it,
        # so its output is the caption's summary (CLIP paper §2.4)
        first_eot = is_eot.int().argmax(dim=1)  # (B,), argmax returns the first maximum
        return x[torch.arange(B, device=ids.device), first_eot]  # (B, W)


class CLIP(nn.Module):
    """Two towers, two projections into the joint space, one learned temperature.
    eot_id: the tokenizer's end-of-text id, see TextTransformer."""

    def __init__(self, cfg: CLIPConfig, eot_id: int):
        super().__init__()
        self.cfg = cfg
        self.visual = ViT(cfg.vit)  # open_clip's name; train.py hands its weights to VLM.vision
        self.text = TextTransformer(cfg, eot_id)
        self.image_projection = nn.Linear(cfg.vit.width, cfg.embed_dim, bias=False)
        self.text_projection = nn.Linear(cfg.text_width, cfg.embed_dim, bias=False)
        init_weights(self.image_projection)
        init_weights(self.text_projection)
        # learn log(1/temperature) rather than the temperature: it stays positive and
        # its gradient is scale-free (paper §2.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / cfg.init_temperature)))

    def scale(self):
        """1 / temperature, clamped at 100 as in the paper so training stays stable."""
        return self.logit_scale.clamp(max=math.log(100)).exp()  # scalar

    def encode_image(self, images):
        x = self.visual.pooled(images)  # (B, D)
        return F.normalize(self.image_projection(x), dim=-1)  # (B, E), unit length

    def encode_text(self, ids):
        x = self.text(ids)  # (B, W)
        return F.normalize(self.text_projection(x), dim=-1)  # (B, E), unit length

    def forward(self, images, ids, gather=None):
        """images (B, 3, S, S), ids (B, L); pair i is (images[i], ids[i]).
        gather: under torchrun, distributed.gather_rows: the pairs of every rank join the batch,
        which becomes the global batch of N·B pairs (the other ranks' rows carry no gradient).
        Returns (loss, logits_per_image (B, B)); logits_per_text is its transpose."""
        image_emb = self.encode_image(images)  # (B, E)
        text_emb = self.encode_text(ids)  # (B, E)
        # the temperature goes into the image rows before they are gathered, so that under
        # torchrun its gradient too flows only through this rank's own rows
        scaled_emb = self.scale() * image_emb  # (B, E)
        if gather is not None:
            scaled_emb, text_emb = gather(scaled_emb), gather(text_emb)  # (N·B, E) each
        logits_per_image = scaled_emb @ text_emb.T  # (B, B), (N·B, N·B) gathered; cosine / temperature
        return clip_loss(logits_per_image), logits_per_image


def clip_loss(logits_per_image):
    """Symmetric InfoNCE: each image must pick its own caption among the batch's
    captions, and each caption its own image. (B, B) -> scalar."""
    labels = torch.arange(logits_per_image.size(0), device=logits_per_image.device)  # (B,), the diagonal
    loss_image = F.cross_entropy(logits_per_image, labels)  # rows: image -> text
    loss_text = F.cross_entropy(logits_per_image.T, labels)  # columns: text -> image
    return (loss_image + loss_text) / 2


# ---------------------------------------------------------------- evaluation

def tokenize(tok, texts, context_length):
    """Texts -> (B, L) ids, each row `text <eot> pad ...`, L = the longest row.
    tok needs .encode(str), .eot_id and .pad_id (tokenizer.Tokenizer has them). A text too
    long is cut so that its eot still fits: the text tower reads its feature there."""
    rows = [tok.encode(t)[: context_length - 1] + [tok.eot_id] for t in texts]
    L = max(len(r) for r in rows)
    return torch.tensor([r + [tok.pad_id] * (L - len(r)) for r in rows])  # (B, L)


@torch.no_grad()
def zero_shot_classifier(model, tok, classnames, templates):
    """Class embeddings (C, E) from prompts such as "a photo of a {}." (paper §3.1.4)."""
    texts = [t.format(c) for c in classnames for t in templates]  # class-major: C blocks of K
    ids = tokenize(tok, texts, model.cfg.context_length).to(model.logit_scale.device)  # (C*K, L)
    text_emb = model.encode_text(ids)  # (C*K, E)
    return zero_shot_weights(text_emb.view(len(classnames), len(templates), -1))  # (C, E)


def zero_shot_weights(text_emb):
    """Prompt ensembling: average each class's normalised template embeddings, then
    normalise again. (C, K, E) -> (C, E)."""
    text_emb = F.normalize(text_emb, dim=-1)  # (C, K, E)
    return F.normalize(text_emb.mean(dim=1), dim=-1)  # (C, E)


def zero_shot_predict(image_emb, class_emb):
    """The class whose embedding is most similar to each image. (B, E), (C, E) -> (B,)."""
    return (image_emb @ class_emb.T).argmax(dim=1)  # (B,)


def retrieval_recall(image_emb, text_emb, ks=(1, 5)):
    """Recall@k both ways over B pairs, pair i = (image_emb[i], text_emb[i]).

    Returns {"image_to_text_r1": ..., "text_to_image_r1": ..., ...} as fractions.
    The rank of the true match counts every other candidate scoring at least as high,
    so ties count against the model: collapsed, all-equal embeddings score 0, not 1.
    """
    sim = image_emb @ text_emb.T  # (B, B), rows: images, columns: texts
    true = sim.diagonal()  # (B,)
    others = ~torch.eye(sim.size(0), dtype=torch.bool, device=sim.device)  # (B, B)
    rank_i2t = ((sim >= true[:, None]) & others).sum(dim=1)  # (B,), 0 = found first
    rank_t2i = ((sim >= true[None, :]) & others).sum(dim=0)  # (B,)
    out = {}
    for k in ks:
        out[f"image_to_text_r{k}"] = (rank_i2t < k).float().mean().item()
        out[f"text_to_image_r{k}"] = (rank_t2i < k).float().mean().item()
    return out


def linear_probe(train_feats, train_labels, test_feats, test_labels, steps=100, weight_decay=1e-3):
    """Accuracy of a multinomial logistic regression on frozen features (paper §3.2 and
    appendix A.3 use sklearn's L-BFGS logistic regression; this is the same in torch).

    Features are standardised with the train split's statistics; the L2 penalty
    weight_decay/2 * ||W||^2 is added to the mean cross-entropy; L-BFGS runs at most
    `steps` iterations on the full batch. Returns a fraction in [0, 1].
    """
    train_feats, test_feats = train_feats.detach().float(), test_feats.detach().float()
    mean, std = train_feats.mean(dim=0), train_feats.std(dim=0) + 1e-6  # (F,), (F,)
    x_train, x_test = (train_feats - mean) / std, (test_feats - mean) / std  # (B, F)
    n_classes = int(max(train_labels.max(), test_labels.max())) + 1
    W = torch.zeros(x_train.size(1), n_classes, device=x_train.device, requires_grad=True)  # (F, C)
    b = torch.zeros(n_classes, device=x_train.device, requires_grad=True)  # (C,)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x_train @ W + b, train_labels) + weight_decay / 2 * W.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():  # callers often evaluate under torch.no_grad()
        opt.step(closure)
    with torch.no_grad():
        return ((x_test @ W + b).argmax(dim=1) == test_labels).float().mean().item()
