"""First contact with the CUDA C++ kernels on a GPU, in its own process: a few small cases per
dtype and flag set against float64. scripts/gpu_run.sh runs it before the test suite, and under
compute-sanitizer when it fails, so a kernel fault shows where it is instead of poisoning the
CUDA context of a whole pytest run. Exit status 1 on a wrong number, non-zero on a crash."""
import os
import sys

import torch

import fastcl
import fastcl.functional as FCL

# `--backend torch --device cpu` checks this script itself on a machine without a GPU
BACKEND = sys.argv[sys.argv.index("--backend") + 1] if "--backend" in sys.argv else "cuda"
DEVICE = sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cuda"
why = fastcl.available_backends(DEVICE)[BACKEND]
if why is not None:
    sys.exit(f"{BACKEND} backend not usable: {why}")
tiny = "--tiny" in sys.argv  # for compute-sanitizer: one launch of each kernel
# On a Hopper GPU running the sm_90a build, the 16-bit kernels run both score-tile variants.
paths = ["default"]
if BACKEND == "cuda":
    from fastcl import cuda_backend
    wg = cuda_backend.wgmma_available()
    print(f"wgmma (sm_90a code on this GPU): {'yes' if wg else 'no'}", flush=True)
    paths = ["wgmma", "wmma"] if wg else ["wmma"]
# B=2: DCL needs a negative. D % 8 != 0: element-wise tile loads; D = 64, 520: 16-byte loads
# (520: two D-slabs in the backward for every dtype).
shapes = [(5, 7), (5, 64)] if tiny else [(2, 3), (70, 33), (130, 300), (70, 64), (66, 520)]
bad = 0
for B, D in shapes:
    g = torch.Generator().manual_seed(B + D)
    q = torch.randn(B, D, generator=g, dtype=torch.float64)
    k = q + 2.0 * torch.randn(B, D, generator=g, dtype=torch.float64)  # no saturated softmax: p - 1 stays representable
    lab = torch.randint(0, max(B // 3, 1), (B,), generator=g)
    cases = {
        "clip": lambda a, b, **kw: FCL.info_nce(a, b, temperature=0.07, symmetric=True, **kw),
        "clip_ls": lambda a, b, **kw: FCL.info_nce(a, b, temperature=0.07, symmetric=True, label_smoothing=0.3,
                                                   **kw),
        "nt_xent": lambda a, b, **kw: FCL.nt_xent(a, b, temperature=0.2, **kw),
        "dcl": lambda a, b, **kw: FCL.dcl(a, b, temperature=0.1, **kw),
        "supcon": lambda a, b, **kw: FCL.supcon(torch.cat([a, b]), torch.cat([lab, lab]).to(a.device),
                                                temperature=0.1, **kw),
    }
    runs = [(torch.float32, 1e-3, "default")] + [(dt, tol, p) for dt, tol in ((torch.bfloat16, 5e-2),
                                                                                (torch.float16, 1e-2)) for p in paths]
    for dtype, tol, path in runs:
        os.environ["FASTCL_CUDA_WGMMA"] = "0" if path == "wmma" else "1"
        for name, fn in cases.items():
            qq = q.to(DEVICE, dtype).requires_grad_()
            kk = k.to(DEVICE, dtype).requires_grad_()
            q64, k64 = q.clone().requires_grad_(), k.clone().requires_grad_()
            out = fn(qq, kk, backend=BACKEND)
            out.backward()
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            ref = fn(q64, k64, backend="reference")
            ref.backward()
            errs = [abs(out.item() - ref.item()) / max(abs(ref.item()), 1e-12)]
            errs += [float((a.grad.double().cpu() - b.grad).norm() / b.grad.norm().clamp_min(1e-30))
                     for a, b in ((qq, q64), (kk, k64))]
            # fp16 cannot hold small gradients (subnormals): the float64 gradient rounded to the
            # dtype sets the floor no kernel can beat
            floor = [0.0] + [float((b.grad.to(dtype).double() - b.grad).norm() / b.grad.norm().clamp_min(1e-30))
                             for b in (q64, k64)]
            ok = all(e == e and e <= max(tol, 2 * f) for e, f in zip(errs, floor))  # NaN fails
            bad += not ok
            print(f"{'ok ' if ok else 'BAD'} {name:8}{str(dtype):16}{path:8}B={B:<4}D={D:<4} rel err loss/dq/dk "
                  + " ".join(f"{e:.1e}" for e in errs), flush=True)
x = torch.randn(256, 128, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
y = FCL.group_whiten(x.to(DEVICE).float(), 2, method="newton_schulz", backend=BACKEND).double().cpu()
r = FCL.group_whiten(x, 2, method="newton_schulz", backend="reference")
e = float((y - r).norm() / r.norm())
bad += not e <= 1e-4
print(f"{'ok ' if e <= 1e-4 else 'BAD'} newton_schulz fp32 N=256 D=128 g=64 rel err {e:.1e}")
sys.exit(1 if bad else 0)
