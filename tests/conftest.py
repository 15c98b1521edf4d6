import pytest

from tests.distributed.pool import WorkerPool


@pytest.fixture(scope="session")
def pool2():
    """Two gloo workers shared by every distributed test of the session."""
    pool = WorkerPool(2)
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def pool4():
    """Four gloo workers, for topologies and world sizes that need them."""
    pool = WorkerPool(4)
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def pool_cuda():
    """One NCCL worker on the first GPU (tests that ask for it skip without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pool = WorkerPool(1, backend="nccl")
    yield pool
    pool.close()
