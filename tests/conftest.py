import pytest
import torch

import train
from model import VLM

# The test models are tiny: one thread is as fast as two on their matmuls, and on a shared
# 2-core machine two threads per process contend with everything else running (measured: the
# tiny CLIP stage took 2.5 s with one thread and 18 s with two while another job was running).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    """An instruct.pt written the way train.py writes it, for a tiny config that differs
    from the defaults (so loading must use the checkpoint's config, not Config()). Untrained:
    enough for the plumbing of generate.py and its chat server, not for right answers."""
    out = tmp_path_factory.mktemp("gen")
    cfg = train.parse_flags(train.Config, ["--config=tiny", "--out_dir", str(out), "--llm_dim=48",
                                           "--llm_ffn_hidden=128"], train.PRESETS)
    tok = train.get_tokenizer(cfg)
    torch.manual_seed(0)
    model = VLM(train.vlm_config(cfg, tok))
    for p in model.llm.parameters():  # larger weights: varied tokens instead of one repeated id
        p.data.normal_(0, 0.3)
    train.save_checkpoint(str(out / "instruct.pt"), {"stage": "instruct", "config": vars(cfg).copy(),
                                                     "model": model.state_dict(), "tokenizer": tok.state()})
    return out
