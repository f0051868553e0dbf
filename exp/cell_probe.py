# lm.pt reading oracle scene cells (SCENE_TOKENS): VQA per type.  usage: cell_probe.py RUN_DIR
import sys, collections, torch, dataclasses
import train, evaluate, shapes, data, checkpoint, batches
from model import VLM
from tokenizer import Tokenizer
torch.set_num_threads(1)
lm = checkpoint.load_checkpoint(sys.argv[1] + "/lm.pt")
cfg = train.Config(**{k: v for k, v in lm["config"].items() if k in {f.name for f in dataclasses.fields(train.Config)}})
tok = Tokenizer.from_state(lm["tokenizer"])
model = VLM(train.vlm_config(cfg, tok)); model.llm.load_state_dict(lm["model"]); model.eval()
items = [it for it in evaluate.vqa_items(cfg) if it[1] != "grounding"]
right, n = collections.Counter(), collections.Counter()
preds = []
for i in range(0, len(items), 100):
    chunk = items[i:i + 100]
    samples = [{"input_ids": data.encode_prompt(tok, data.question(q, 1), [model.num_image_tokens]),
                "images": batches.scene_cells(tok, s)} for s, _, q, _ in chunk]
    b = data.collate(samples, tok.pad_id, side="left")
    out = model.generate(b["input_ids"], b["images"], b["attention_mask"], max_new_tokens=8, stop_id=tok.im_end_id)
    preds += [tok.decode(o).strip() for o in out]
for (s, t, q, a), p in zip(items, preds):
    n[t] += 1; right[t] += evaluate.normalize_answer(p) == evaluate.normalize_answer(a)
print({t: round(right[t] / n[t], 2) for t in n}, "all", round(sum(right.values()) / sum(n.values()), 3))
