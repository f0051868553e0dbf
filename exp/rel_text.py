# text-only: can a small LLM learn relation from a scene described in words?  usage: rel_text.py LAYERS STEPS [types]  (TOKENIZER=out/tokenizer.json)
import sys, random, torch, torch.nn.functional as F
import shapes, data, checkpoint, batches, train
from model import LanguageModel, LLMConfig
from tokenizer import Tokenizer
torch.manual_seed(0); torch.set_num_threads(1)
layers, steps = int(sys.argv[1]), int(sys.argv[2]); types = sys.argv[3].split(",") if len(sys.argv) > 3 else ["relation"]
tok = Tokenizer.load(__import__("os").environ.get("TOKENIZER", "out/tokenizer.json"))  # the run's tokenizer
cfg = train.Config(); world = batches.world_config(cfg)
llm = LanguageModel(LLMConfig(vocab_size=tok.vocab_size, dim=192, n_layers=layers, n_heads=4, n_kv_heads=4, ffn_hidden=512, max_seq_len=256))
opt = torch.optim.AdamW(llm.parameters(), lr=2e-3, weight_decay=0.1)
def sample(split, index, rng):
    s = shapes.make_scene(split, index, world)
    qs = [(q, a) for t, q, a in shapes.questions(s, rng) if t in types]
    if not qs: return None
    q, a = rng.choice(qs)
    msgs = [{"role": "user", "content": shapes.describe(s) + "\n" + q}, {"role": "assistant", "content": a}]
    return data.encode_chat(tok, msgs, 0)
def batch(split, start, n):
    out, i = [], start
    while len(out) < n:
        r = sample(split, i, random.Random(i)); i += 1
        if r: out.append(r)
    T = max(len(x) for x, _ in out)
    ids = torch.full((n, T), tok.pad_id); lab = torch.full((n, T), -100)
    for k, (x, y) in enumerate(out): ids[k, :len(x)] = torch.tensor(x); lab[k, :len(y)] = torch.tensor(y)
    return ids, lab, i
@torch.no_grad()
def acc():
    ids, lab, _ = batch("test", 0, 400)
    logits = llm(ids)
    pred = logits[:, :-1].argmax(-1); tgt = lab[:, 1:]
    m = tgt != -100
    # first answer token right
    first = m.float().argmax(1)
    return (pred[torch.arange(len(ids)), first] == tgt[torch.arange(len(ids)), first]).float().mean().item()
pos = 0
for step in range(steps + 1):
    if step % 200 == 0: print(step, f"acc {acc():.3f}", flush=True)
    lr = 2e-3 * min(1, (step + 1) / 50)
    for g in opt.param_groups: g["lr"] = lr
    ids, lab, pos = batch("train", pos, 32)
    logits = llm(ids)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), lab[:, 1:].reshape(-1))
    opt.zero_grad(); loss.backward(); opt.step()
    if step % 100 == 0: print(step, f"loss {loss.item():.3f}", flush=True)
