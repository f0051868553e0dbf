# relation answers of an instruct checkpoint, split by where the first-named object sits.  usage: PYTHONPATH=. python exp/rel_probe.py out/instruct.pt [threads]
import sys, collections, torch, re
import generate, evaluate, shapes
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
model, tok, cfg = generate.load_vlm(sys.argv[1])
items = [it for it in evaluate.vqa_items(cfg) if it[1] == "relation"]
preds = evaluate.answer_all(model, tok, [(s, q) for s, _, q, _ in items], cfg, "cpu")
stats = collections.Counter()
conf = collections.Counter()
for (s, t, q, a), p in zip(items, preds):
    axis = "x" if a in ("left", "right") else "y"
    # which object is A? parse names from question
    m = re.match(r"Is (.+?) (?:to the left or to the right of|left or right of|located above or below|above or below) (.+)\?", q)
    ra, rb = m.group(1), m.group(2)
    def find(ref):
        for o in s.objects:
            if shapes._refer(s, o, ("region",)) == ref: return o
    A, B = find(ra), find(rb)
    ca = (A.region % 3) if axis == "x" else (A.region // 3)
    cb = (B.region % 3) if axis == "x" else (B.region // 3)
    edge_a = "A-mid" if ca == 1 else "A-edge"
    edge_b = "B-mid" if cb == 1 else "B-edge"
    ok = evaluate.normalize_answer(p) == a
    stats[(axis, edge_a, edge_b, ok)] += 1
    conf[(axis, a, p)] += 1
for axis in "xy":
    for ea in ("A-edge", "A-mid"):
        for eb in ("B-edge", "B-mid"):
            r, w = stats[(axis, ea, eb, True)], stats[(axis, ea, eb, False)]
            if r + w: print(axis, ea, eb, f"{r}/{r+w} = {r/(r+w):.2f}")
for k, n in sorted(conf.items()): print(k, n)
