"""Distributed losses fwd+bwd vs world size, time and per-rank peak memory: the CLIP loss with
all_gather and with the ring, and NT-Xent (its views gathered; two views of local-batch pairs).

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

from fastcl.distributed import info_nce_distributed, nt_xent_distributed


def _worker(rank, world, init_file, local_b, dim, reps, gather, out):
    cuda = torch.cuda.device_count() >= world
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init_file}",
                            rank=rank, world_size=world)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    g = torch.Generator(device=device).manual_seed(rank)
    q = torch.randn(local_b, dim, device=device, generator=g, requires_grad=True)
    k = torch.randn(local_b, dim, device=device, generator=g, requires_grad=True)
    times = []
    for i in range(reps + 1):
        dist.barrier()
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        if gather == "nt_xent":
            nt_xent_distributed(q, k, temperature=0.5).backward()
        else:
            info_nce_distributed(q, k, temperature=0.07, symmetric=True, gather=gather).backward()
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
    a = p.parse_args(argv)
    print(f"distributed losses fwd+bwd | local batch {a.local_batch} | D={a.dim} | median of {a.reps} | "
          f"{'NCCL' if torch.cuda.device_count() > 1 else 'gloo (CPU)'} | torch {torch.__version__}")
    print(f"{'loss':<20}{'world':>6}{'global B':>10}{'ms':>10}{'max peak MiB/rank':>19}")
    for gather in ("all_gather", "ring", "nt_xent"):
        for world in (int(w) for w in a.worlds.split(",")):
            with tempfile.TemporaryDirectory() as tmp:
                mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), a.local_batch, a.dim, a.reps,
                                        gather, os.path.join(tmp, "r")), nprocs=world, join=True)
                res = [torch.load(os.path.join(tmp, f"r{r}.pt")) for r in range(world)]
            ms = max(r[0] for r in res)
            peak = max(r[1] for r in res) / 2**20
            name = "nt_xent all_gather" if gather == "nt_xent" else f"clip {gather}"
            print(f"{name:<20}{world:>6}{world * a.local_batch:>10}{ms:>10.1f}{peak:>19.1f}", flush=True)


if __name__ == "__main__":
    main()
