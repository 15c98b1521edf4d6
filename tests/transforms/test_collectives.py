"""gather_into, and broadcasts received in place or scattered (issue 14), in 2 gloo workers."""

from tests.distributed import bodies_collectives as bodies


def test_gather_into_writes_the_destination_in_place(pool2):
    keys = pool2.run(bodies.gather_into_writes_the_destination)
    assert keys[0] == keys[1] and {"big_even", "big_uneven", "legacy", "cols"} <= set(keys[0])


def test_gather_into_raises_on_every_rank_naming_the_key(pool2):
    messages = pool2.run(bodies.gather_into_checks_on_every_rank)
    for per_rank in messages:
        assert len(per_rank) == 4
        assert "rank 1 of 2" in per_rank[0] and "['uneven']" in per_rank[0] and "(5, 3)" in per_rank[0]
        assert "['even']" in per_rank[1] and "torch.float64" in per_rank[1]
        assert "['ints']" in per_rank[2] and "NoneType" in per_rank[2]
        assert "missing" in per_rank[3]
