import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter. This must be set before
# fastcl.kernels is imported (triton.jit picks the mode at decoration time).
HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def pytest_report_header(config):
    import fastcl
    return [f"fastcl device: {DEVICE}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}",
            f"backends: {fastcl.available_backends(DEVICE)}"]


requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
