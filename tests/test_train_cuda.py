"""The trainer on a GPU; tests/test_train.py runs it on the CPU. A file of its own so that
scripts/gpu_run.sh, which leaves the CPU trainer tests to CI, runs this one."""
import math

import pytest
import torch
from torch import nn

from conftest import requires_cuda
from fastcl import train as T
from test_train import _batches, _cfg, _noise, _params


@requires_cuda
@pytest.mark.parametrize("amp", [None, "bf16", "fp16"])
def test_cuda_training_resumes_exactly(tmp_path, amp):
    """The trainer on a GPU (the other tests run it on the CPU): GradCache chunks, autocast and
    fp16's GradScaler on CUDA, the fused loss on the GPU's default backend, and a resume that
    restores the CUDA RNG (the augmentation noise is drawn on the GPU): the resumed run goes on
    as the uninterrupted one."""
    data = [x.float() for x in _batches(n=4, b=32)]

    def run(steps, init_seed=0, **kw):
        torch.manual_seed(init_seed)
        recipe = T.SimCLR(nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 8)), _noise, loss="nt_xent")
        torch.manual_seed(0)  # seeds the CUDA generator too
        trainer = T.Trainer(recipe, data, _cfg(steps=steps, amp=amp, chunk_size=12, log_every=1,
                                               device="cuda", **kw))
        return recipe, trainer, trainer.train()

    full, _, hist_full = run(6)
    assert all(p.device.type == "cuda" for p in full.parameters())
    path = str(tmp_path / "ckpt.pt")
    run(3, checkpoint_path=path)
    resumed, trainer, hist = run(6, init_seed=99, checkpoint_path=path, resume=True)
    assert trainer.scaler.is_enabled() == (amp == "fp16")
    assert all(math.isfinite(h["loss"]) for h in hist_full)
    assert [h["loss"] for h in hist] == pytest.approx([h["loss"] for h in hist_full], abs=1e-6)
    assert torch.allclose(_params(resumed), _params(full), rtol=0, atol=1e-6)
