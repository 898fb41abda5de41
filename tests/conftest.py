import os
import signal

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

# The kernel backends every loss test runs over. The optional CUDA C++ extension, where it cannot
# run here (no GPU, no build), is skipped with the dispatcher's reason; torch and triton
# (installed by scripts/test.sh) are never skipped: a broken one fails the tests.
KERNEL_BACKENDS = ["torch", "triton", "cuda"]
OPTIONAL_BACKENDS = ["cuda"]


def why_not_here(backend, dtype=torch.float32):
    from fastcl import _dispatch
    return _dispatch.why_not(backend, DEVICE, dtype)


USABLE_BACKENDS = [b for b in KERNEL_BACKENDS if b not in OPTIONAL_BACKENDS or why_not_here(b) is None]


@pytest.fixture(autouse=True)
def _skip_unusable_backend(request):
    callspec = getattr(request.node, "callspec", None)
    backend = callspec.params.get("backend") if callspec else None
    if backend in OPTIONAL_BACKENDS and why_not_here(backend) is not None:
        pytest.skip(f"backend={backend!r}: {why_not_here(backend)}")


def pytest_runtest_logreport(report):
    """With FASTCL_FAILURE_LOG set, each failure's traceback is appended to that file when it
    happens (by the xdist controller only), so a run stopped by a time limit, as on the lent GPU,
    still tells why its tests failed."""
    path = os.environ.get("FASTCL_FAILURE_LOG")
    if path and report.failed and not os.environ.get("PYTEST_XDIST_WORKER"):
        with open(path, "a") as f:
            f.write(f"=== FAILED {report.nodeid} ({report.when})\n{report.longreprtext[-2500:]}\n")


# The tests that took longest on the H100 (2026-11-24, tests/gpu_slow_tests.txt), run first with
# FASTCL_SLOW_FIRST=1 (scripts/gpu_run.sh): xdist's workers start on them together instead of
# one worker meeting a 60 s test at the end of its queue while the others sit idle.
SLOW_TESTS_FILE = os.path.join(os.path.dirname(__file__), "gpu_slow_tests.txt")


def slow_test_names():
    """The test function names of SLOW_TESTS_FILE, longest first (# starts a comment)."""
    with open(SLOW_TESTS_FILE) as f:
        return [n for n in (ln.split("#")[0].strip() for ln in f) if n]


def slow_first(items, names):
    """items reordered: those whose test function is in `names` first, in the list's order
    (longest first), the rest after them in their own order. Stable and complete: only the
    order changes."""
    rank = {n: i for i, n in enumerate(names)}
    return sorted(items, key=lambda it: rank.get(getattr(it, "originalname", it.name), len(rank)))


def pytest_collection_modifyitems(config, items):
    if os.environ.get("FASTCL_SLOW_FIRST") == "1":
        items[:] = slow_first(items, slow_test_names())


def _sigterm_handler(pid, worker):
    def handler(signum, frame):
        if os.getpid() != pid:  # a process forked from this one (a DataLoader worker): die as asked
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        elif not worker:
            raise KeyboardInterrupt("SIGTERM (a time limit?): the summary of the tests run so far")
    return handler


def pytest_configure(config):
    """A test run stopped by SIGTERM, as gpu_run.sh's time limit stops it, still ends with
    pytest's summary (the counts so far, the failures, the durations) instead of dying without
    one. The controlling process turns SIGTERM into KeyboardInterrupt; xdist's workers, which get
    the signal too (timeout signals the whole process group), let the controller stop them."""
    try:
        signal.signal(signal.SIGTERM, _sigterm_handler(os.getpid(), bool(os.environ.get("PYTEST_XDIST_WORKER"))))
    except ValueError:  # not the main thread: leave the default
        pass
