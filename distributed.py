"""
distributed.py — where training runs: the device and its precision (pick_device), and several
processes at once under torchrun: DistributedDataParallel ("PyTorch Distributed: Experiences on
Accelerating Data Parallel Training", Li et al. 2020, arXiv:2006.15704), NCCL between GPUs,
gloo between CPU processes.

    torchrun --nproc_per_node=2 train.py          # two ranks, the same run as one process

A step is the same global batch as in one process, grad_accum micro-batches of batch_size
samples: every rank runs every micro-batch, but builds only its share of the samples, rank r
samples r·b/N .. (r+1)·b/N - 1 of a micro-batch of b (rank_share; the batch builders draw
sample i from its own seeded RNG, so a slice is the very samples one process draws). So N
must divide each stage's batch size. DDP averages the gradients over the ranks; each loss
is written so that this average is the gradient of the one-process loss (share_of_mean,
gather_rows, and train.contrastive_loss). Rank 0 alone logs, evaluates and writes files.

Shapes: b samples on this rank, N ranks, E embedding width.
Run the tests:  python -m pytest -q tests/test_distributed.py
"""
import contextlib
import os
import sys

import torch
import torch.distributed as dist

from flags import ConfigError


def pick_device(cfg):
    """CUDA when present (bf16 autocast where the GPU supports it, fp16 otherwise), else CPU fp32."""
    if cfg.device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device={cfg.device} but no CUDA GPU is visible")
    else:
        device = cfg.device
    if device.startswith("cuda"):
        # TF32 (Ampere and later): fp32 matmuls and convolutions run on tensor cores with 10-bit
        # mantissa inputs and fp32 sums; it serves what runs outside autocast, or --dtype=float32
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg.dtype == "auto":
        if device.startswith("cuda"):
            # bf16 tensor cores from Ampere (compute capability 8.0) on. Not is_bf16_supported():
            # it also says yes for a T4 (7.5), which can only emulate bf16, slowly
            dtype = "bfloat16" if torch.cuda.get_device_capability(device)[0] >= 8 else "float16"
        else:
            dtype = "float32"  # bf16 matmuls are very slow on most CPUs
    else:
        dtype = cfg.dtype
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"--dtype must be auto, float32, bfloat16 or float16, not {dtype!r}")
    return device, getattr(torch, dtype)


def init_distributed(device):
    """Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK in the environment) join the process group:
    NCCL between GPUs, gloo between CPU processes; rank r drives GPU LOCAL_RANK. Returns the
    device. Only rank 0 prints: the others' stdout goes to /dev/null (errors still show)."""
    if "RANK" not in os.environ:
        return device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")
    return device


def rank_and_world():
    """(this process's rank, how many processes train together): (0, 1) without torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def world_size():
    return rank_and_world()[1]


def is_main():
    return rank_and_world()[0] == 0


def check_batch_sizes(batch_sizes):
    """Each rank builds batch_size / N samples of every micro-batch: refuse, before anything
    trains, a batch size that the N ranks do not divide. batch_sizes: {flag name: size}."""
    n = world_size()
    for name, size in batch_sizes.items():
        if size % n:
            raise ConfigError(f"--{name}={size} is not a multiple of the {n} ranks: each rank builds "
                              f"{name} / ranks samples of every micro-batch")


def rank_share(batch_size):
    """The samples of a micro-batch of batch_size that this rank builds: a range, all of them
    in one process."""
    rank, n = rank_and_world()
    return range(rank * batch_size // n, (rank + 1) * batch_size // n)


def training_model(model, cfg, device):
    """What the training step calls: the model, inside DistributedDataParallel under torchrun
    (its backward averages the gradients over the ranks), compiled with --compile."""
    if dist.is_initialized():
        device_ids = [device] if device.startswith("cuda") else None
        # The conv stem's BatchNorm normalises by its batch: on GPUs by the global batch's statistics.
        # gloo has no SyncBatchNorm, so on CPU each rank uses its own share (close to one process, not equal).
        if device.startswith("cuda"):
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return torch.compile(model) if cfg.compile else model


def gradient_sync(step_model, last_micro):
    """DDP averages gradients in every backward; during gradient accumulation only the last
    micro-batch's backward needs to (no_sync: the others just add into .grad locally)."""
    if dist.is_initialized() and not last_micro:
        return step_model.no_sync()
    return contextlib.nullcontext()


def mean_over_ranks(x):
    """The mean of a tensor over all ranks, the same on each (x itself in one process)."""
    if dist.is_initialized():
        dist.all_reduce(x)  # a sum: gloo has no average
        x = x / dist.get_world_size()
    return x


def share_of_mean(loss, count):
    """This rank's share of a mean over the whole global batch. loss: the mean over this rank's
    `count` items (labelled tokens, answers; a tensor). The share is loss · count · N / (the
    count of all ranks): averaged over the ranks, as the logged loss is and as DDP averages the
    gradients, the shares give the global mean and its gradient. (The plain average of the
    ranks' means would weigh the tokens of a rank with few of them more than the others'.)
    One process: the loss as it is."""
    if not dist.is_initialized():
        return loss
    total = count.detach().float()
    dist.all_reduce(total)  # every rank's count, summed
    return loss * (count * dist.get_world_size() / total)


def gather_rows(x):
    """(N·b, ...): the rows x of every rank, in rank order (the order of the global batch);
    only this rank's own rows carry a gradient, since all_gather does not backpropagate."""
    everyone = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, x.detach())
    everyone[dist.get_rank()] = x   # (b, ...) with its gradient
    return torch.cat(everyone)      # (N·b, ...)


def check_replicas(model, name):
    """Every rank started from rank 0's weights (DDP broadcasts them) and applied the same
    averaged gradients, so all must end with the same weights. A fingerprint of every tensor
    (its sum and sum of squares, in float64) is compared across ranks; a difference stops all."""
    if not dist.is_initialized():
        return
    for buffer in model.buffers():  # BatchNorm's running statistics: DDP hands every rank rank 0's before
        dist.broadcast(buffer, 0)   # each forward, so the last forward's update is this rank's own
    tensors = [t.double() for t in model.state_dict().values() if t.is_floating_point()]
    fingerprint = torch.stack([s for t in tensors for s in (t.sum(), t.pow(2).sum())])  # (2 x tensors,)
    everyone = [torch.empty_like(fingerprint) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, fingerprint)
    differ = [r for r, f in enumerate(everyone) if not torch.equal(f, everyone[0])]
    if differ:
        raise RuntimeError(f"{name}: the weights of ranks {differ} differ from rank 0's after training")
    print(f"{name}: weights identical on all {len(everyone)} ranks")


def finish():
    """Leave the process group together: wait at a barrier until every rank is done (rank 0
    evaluates and writes files while the others are already through), then tear it down.
    Without the barrier a rank that finished first closes its gloo connections while a peer
    still holds them open, and the process can abort at exit."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
