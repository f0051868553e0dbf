import torch

# The test models are tiny: one thread is as fast as two on their matmuls, and on a shared
# 2-core machine two threads per process contend with everything else running (measured: the
# tiny CLIP stage took 2.5 s with one thread and 18 s with two while another job was running).
torch.set_num_threads(1)
