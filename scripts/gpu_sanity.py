"""Quick large-shape check on a GPU: fastcl's GPU backends (triton, and cuda where built) vs
float64 torch at B=4096, D=512. `python scripts/gpu_sanity.py cuda` checks one backend."""
import sys

import torch

import fastcl
import fastcl.functional as FCL

torch.manual_seed(0)
B, D = 4096, 512
q = torch.randn(B, D, device="cuda", dtype=torch.float64)
k = q + 0.5 * torch.randn(B, D, device="cuda", dtype=torch.float64)
backends = [b for b in (sys.argv[1:] or ("triton", "cuda")) if fastcl.available_backends("cuda")[b] is None]
for backend in backends:
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for sym in (True, False):
            qq, kk = q.to(dtype).requires_grad_(), k.to(dtype).requires_grad_()
            q64, k64 = qq.detach().double().requires_grad_(), kk.detach().double().requires_grad_()
            out = FCL.info_nce(qq, kk, temperature=0.07, symmetric=sym, backend=backend)
            out.backward()
            ref = fastcl.info_nce_reference(q64, k64, temperature=0.07, symmetric=sym)
            ref.backward()
            pairs = ((qq.grad, q64.grad), (kk.grad, k64.grad))
            rel = [float((a.double() - b).norm() / b.norm()) for a, b in pairs]
            # The floor any dtype-valued gradient has: the float64 gradient rounded to the dtype.
            best = [float((b.to(dtype).double() - b).norm() / b.norm()) for _, b in pairs]
            print(f"{backend:7}{str(dtype):15} sym={sym!s:5} loss {out.item():.6f} ref {ref.item():.6f} "
                  f"rel err dq {rel[0]:.2e} dk {rel[1]:.2e} (rounding floor {best[0]:.2e} {best[1]:.2e})")
