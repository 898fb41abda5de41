"""Short, ad-hoc GPU check of the Triton kernel variants: each loss and the whitening kernel,
Triton vs the torch backend on the same GPU tensors (fp32 and bf16). One line per case, then a
summary. (gpu_run.sh runs the full test suite on the GPU instead, which covers the same variants
against float64.)"""
import sys

import torch

import fastcl.functional as FCL

torch.manual_seed(0)
dev = "cuda"
cases = {
    "info_nce_labels_smooth": lambda q, k, b: FCL.info_nce(q, k, labels=(torch.arange(200, device=dev) + 7) % 200,
                                                           label_smoothing=0.1, backend=b),
    "clip": lambda q, k, b: FCL.info_nce(q, k, symmetric=True, backend=b),
    "nt_xent": lambda q, k, b: FCL.nt_xent(q, k, temperature=0.1, backend=b),
    "dcl_joint_vmf": lambda q, k, b: FCL.dcl(q, k, weight="vmf", backend=b),
    "dcl_split": lambda q, k, b: FCL.dcl(q, k, negatives="split", backend=b),
    "supcon": lambda q, k, b: FCL.supcon(torch.stack([q, k], 1), torch.arange(200, device=dev) % 17, backend=b),
    "mnrl": lambda q, k, b: FCL.multiple_negatives_ranking(q, k, k.flip(0)[:, None].repeat(1, 2, 1), backend=b),
    "whiten_ns": lambda q, k, b: FCL.group_whiten(q + 3, 4, method="newton_schulz", backend=b).square().mean(),
}
bad = 0
for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
    q0 = torch.randn(200, 256, device=dev)
    k0 = q0 + 0.5 * torch.randn(200, 256, device=dev)
    for name, fn in cases.items():
        res = []
        for b in ("torch", "triton"):
            # clone: .to() of a same-dtype tensor returns it, and both backends would share .grad
            q, k = q0.to(dtype).clone().requires_grad_(), k0.to(dtype).clone().requires_grad_()
            out = fn(q, k, b)
            out.backward()
            res.append([out.detach().float(), q.grad.float(), k.grad.float() if k.grad is not None else torch.zeros(1, device=dev)])
        errs = [float((a - c).norm() / c.norm().clamp_min(1e-12)) for a, c in zip(res[1], res[0])]
        ok = all(e < tol for e in errs)
        bad += not ok
        print(f"{'PASS' if ok else 'FAIL'} {str(dtype):15} {name:24} rel err loss/dq/dk " + " ".join(f"{e:.1e}" for e in errs), flush=True)
print(f"{16 - bad} passed, {bad} failed")
sys.exit(bool(bad))
