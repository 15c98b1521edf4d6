import pytest

from tests.distributed.pool import WorkerPool


@pytest.fixture(scope="session")
def pool2():
    """Two gloo workers shared by every distributed test of the session."""
    pool = WorkerPool(2)
    yield pool
    pool.close()
