"""Distributed ops fwd+bwd vs world size, time and per-rank peak memory: the CLIP loss with
all_gather and with the ring, NT-Xent (its views gathered; two views of local-batch pairs), and
group whitening with the global batch's statistics (ZCA and Newton-Schulz, groups of
--group channels; its backward all-reduces W's and the mean's gradients).

CPU: gloo processes on this machine (peak memory = each process's peak RSS, which includes
torch itself, so compare the growth between sizes). With several GPUs: NCCL, one GPU per rank,
peak = torch.cuda.max_memory_allocated.
"""
import argparse
import os
import resource
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastcl.distributed import group_whiten_distributed, info_nce_distributed, nt_xent_distributed

# name -> one fwd+bwd step of q, k [local batch, D] (both require grad) and a fixed gy [local batch, D]
OPS = {
    "clip_all_gather": lambda q, k, gy, grp: info_nce_distributed(
        q, k, temperature=0.07, symmetric=True, gather="all_gather").backward(),
    "clip_ring": lambda q, k, gy, grp: info_nce_distributed(
        q, k, temperature=0.07, symmetric=True, gather="ring").backward(),
    "nt_xent": lambda q, k, gy, grp: nt_xent_distributed(q, k, temperature=0.5).backward(),
    "whiten_zca": lambda q, k, gy, grp: group_whiten_distributed(
        q, q.shape[1] // grp, method="zca").backward(gy),
    "whiten_ns": lambda q, k, gy, grp: group_whiten_distributed(
        q, q.shape[1] // grp, method="newton_schulz").backward(gy),
}


def _worker(rank, world, init_file, local_b, dim, reps, op, group, out, cuda=False):
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init_file}",
                            rank=rank, world_size=world)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    g = torch.Generator(device=device).manual_seed(rank)
    q = torch.randn(local_b, dim, device=device, generator=g, requires_grad=True)
    k = torch.randn(local_b, dim, device=device, generator=g, requires_grad=True)
    gy = torch.randn(local_b, dim, device=device, generator=g)
    times = []
    for i in range(reps + 1):
        dist.barrier()
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        OPS[op](q, k, gy, group)
        if cuda:
            torch.cuda.synchronize(device)
        if i:  # the first step warms up
            times.append((time.perf_counter() - t0) * 1e3)
    peak = (torch.cuda.max_memory_allocated(device) if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    torch.save((statistics.median(times), peak), f"{out}{rank}.pt")
    dist.barrier()  # every rank is done talking
    # Results are on disk; skip the process-group teardown, whose C++ destructors race with
    # gloo threads at exit and now and then abort ("terminate called without an active exception").
    os._exit(0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--local-batch", type=int, default=1024)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--worlds", default="1,2,4")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, of {', '.join(OPS)}")
    p.add_argument("--group", type=int, default=64, help="the whitening's channels per group (divides --dim)")
    a = p.parse_args(argv)
    ops = a.ops.split(",")
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        p.error(f"unknown --ops {unknown}; choose from {list(OPS)}")
    if any(o.startswith("whiten") for o in ops) and (a.group < 1 or a.dim % a.group):
        p.error(f"--group {a.group} must divide --dim {a.dim}")
    worlds = [int(w) for w in a.worlds.split(",")]
    # One backend for every world: GPUs (NCCL, one per rank) only where every world fits on them
    # (world 1 on the GPU beside worlds 2 and 4 on gloo mixed devices under one header).
    cuda = torch.cuda.device_count() >= max(worlds)
    print(f"distributed ops fwd+bwd | local batch {a.local_batch} | D={a.dim} | whitening groups of {a.group} | "
          f"median of {a.reps} | {'NCCL (GPUs)' if cuda else 'gloo (CPU)'} | "
          f"torch {torch.__version__}")
    print(f"{'op':<20}{'world':>6}{'global B':>10}{'ms':>10}{'max peak MiB/rank':>19}")
    for op in ops:
        for world in worlds:
            with tempfile.TemporaryDirectory() as tmp:
                mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), a.local_batch, a.dim, a.reps,
                                        op, a.group, os.path.join(tmp, "r"), cuda), nprocs=world, join=True)
                res = [torch.load(os.path.join(tmp, f"r{r}.pt")) for r in range(world)]
            ms = max(r[0] for r in res)
            peak = max(r[1] for r in res) / 2**20
            print(f"{op:<20}{world:>6}{world * a.local_batch:>10}{ms:>10.1f}{peak:>19.1f}", flush=True)


if __name__ == "__main__":
    main()
