"""The distributed paths on CUDA: an NCCL process group on one GPU (skipped without CUDA).

CI has no GPU; these run where one is (see the README's "GPU checks").
"""

import pytest
import torch

from tests.distributed import bodies_cuda as bodies

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("kind", ["plain", "fsdp2"])
def test_get_state_dict_on_cuda_matches_torch_and_truth(kind, pool_cuda):
    assert pool_cuda.run(bodies.get_matches_torch_and_truth, kind) == [["sharded", "full", "full_cpu", "flatten_full"]]


@pytest.mark.parametrize(
    "full, broadcast", [(False, False), (True, False), (True, True)], ids=["sharded", "full", "broadcast_from_rank0"]
)
@pytest.mark.parametrize("kind", ["plain", "fsdp2"])
def test_round_trip_on_cuda_trains_identically(kind, full, broadcast, pool_cuda):
    (losses,) = pool_cuda.run(bodies.round_trip, kind, full, broadcast)
    assert len(losses) == 2


def test_collective_utilities_on_cuda_match_torch(pool_cuda):
    assert pool_cuda.run(bodies.collectives_match_torch) == [
        [
            "gather cpu_offload=False",
            "gather cpu_offload=True",
            "offload",
            "broadcast",
            "distribute",
            "broadcast_from_rank0",
        ]
    ]


def test_checkpoint_formats_save_cuda_tensors_and_load_on_cpu(pool_cuda, tmp_path):
    assert pool_cuda.run(bodies.checkpoint_formats, str(tmp_path)) == [["torch", "safetensors", "dcp", "hf"]]
