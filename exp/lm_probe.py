# lm.pt answering VQA with the scene in words (shapes.describe) before each question.  usage: PYTHONPATH=. python exp/lm_probe.py RUN_DIR
import sys, collections, random, torch
import train, evaluate, shapes, data, checkpoint
from model import VLM
from tokenizer import Tokenizer
torch.set_num_threads(1)
lm = checkpoint.load_checkpoint(sys.argv[1] + "/lm.pt")
cfg = train.Config(**{k: v for k, v in lm["config"].items() if k in {f.name for f in __import__("dataclasses").fields(train.Config)}})
tok = Tokenizer.from_state(lm["tokenizer"])
model = VLM(train.vlm_config(cfg, tok)); model.llm.load_state_dict(lm["model"]); model.eval()
items = evaluate.vqa_items(cfg)
right, n = collections.Counter(), collections.Counter()
convs, metas = [], []
for scene, t, q, a in items:
    if t == "grounding": continue
    convs.append(data.question(shapes.describe(scene) + "\n" + q, 0)); metas.append((t, a))
preds = []
for i in range(0, len(convs), 100):
    preds += evaluate.answer_batch(model, tok, [[] for _ in convs[i:i+100]], convs[i:i+100], cfg.image_size, "cpu")
for (t, a), p in zip(metas, preds):
    n[t] += 1; right[t] += evaluate.normalize_answer(p) == evaluate.normalize_answer(a)
print({t: round(right[t] / n[t], 2) for t in n})
