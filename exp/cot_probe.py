# relation answers that reason: are the two positions right, and is the comparison right given them?
import sys, collections, torch
import generate, evaluate, shapes
torch.set_num_threads(1)
model, tok, cfg = generate.load_vlm(sys.argv[1])
items = [it for it in evaluate.vqa_items(cfg) if it[1] == "relation"]
preds = evaluate.answer_all(model, tok, [(s, q) for s, _, q, _ in items], cfg, "cpu")
c = collections.Counter()
for (s, t, q, a), p in zip(items, preds):
    pa, ga = p.strip().split(", "), a.split(", ")
    if len(pa) != 3:
        c["malformed"] += 1; print("MALFORMED", q, "|", p); continue
    pos_ok = (pa[0] == ga[0], pa[1] == ga[1])
    final_ok = pa[2] == ga[2]
    # is the final word consistent with the positions the model itself wrote?
    def region(part):
        w = part.split(" is ", 1)[1]
        return shapes.REGIONS.index(w) if w in shapes.REGIONS else None
    ra, rb = region(pa[0]), region(pa[1])
    consistent = None
    if ra is not None and rb is not None:
        (ya, xa), (yb, xb) = divmod(ra, 3), divmod(rb, 3)
        word = pa[2].split()[-1]
        if word in ("left", "right") and xa != xb:
            consistent = word == ("left" if xa < xb else "right")
        elif word in ("above", "below") and ya != yb:
            consistent = word == ("above" if ya < yb else "below")
    c[("posA", pos_ok[0])] += 1; c[("posB", pos_ok[1])] += 1; c[("final", final_ok)] += 1
    c[("both_pos", all(pos_ok))] += 1; c[("consistent", consistent)] += 1
    if all(pos_ok): c[("final_given_both_pos", final_ok)] += 1
for k, n in sorted(c.items(), key=str): print(k, n)
for (s, t, q, a), p in list(zip(items, preds))[:12]: print(q, "|", a, "|", p)
