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
