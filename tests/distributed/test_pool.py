import pytest

from tests.distributed import bodies_pool as bodies


def test_ranks_have_different_hash_seeds(pool2):
    seeds = pool2.run(bodies.hash_seed)
    assert len(set(seeds)) == 2


def test_a_raise_on_one_rank_fails_fast_and_the_pool_recovers(pool2):
    with pytest.raises(AssertionError, match=r"(?s)one_rank_raises.*ValueError: bad input on rank 1"):
        pool2.run(bodies.one_rank_raises, timeout=60)
    assert pool2.run(bodies.sum_ranks) == [1, 1]
