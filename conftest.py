import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers is imported by tests and doctests: never the network
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: one OpenMP thread each (and in the processes they spawn), or their threads
    # spin-wait on each other (see one_torch_thread below).
    os.environ["OMP_NUM_THREADS"] = "1"


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_torch_thread():
    """One OpenMP thread for a module's tests, restored afterwards.

    Two OpenMP threads on two shared cores spin-wait each other when other processes compete (a step measured
    100x slower than with one thread); one thread also sums in the same order as a subprocess with
    OMP_NUM_THREADS=1, so weights compare equal.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
