"""sdtree.Stager from CUDA into the pinned mirror (skipped without CUDA)."""

import concurrent.futures

import pytest
import torch

import sdtree

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _state_dict():
    torch.manual_seed(0)
    embed = torch.randn(1024, 256, device="cuda")
    return {
        "embed": embed,
        "head": embed,  # tied
        "layers": [torch.randn(512, 512, device="cuda") for _ in range(8)],
        "bf16": torch.randn(4096, device="cuda").to(torch.bfloat16),
        "step": 3,
    }


def test_stage_from_cuda_lands_in_pinned_mirror_after_wait():
    sd = _state_dict()
    stager = sdtree.Stager(sd)
    staged = stager.stage(sd)
    assert isinstance(staged, concurrent.futures.Future)  # the copy is in flight
    mirror = stager.wait()
    assert staged.result() is mirror
    for key in ("embed", "head", "bf16"):
        assert mirror[key].is_cpu and mirror[key].is_pinned(), key
        assert torch.equal(mirror[key], sd[key].cpu()), key
    assert all(torch.equal(m, s.cpu()) for m, s in zip(mirror["layers"], sd["layers"]))
    assert mirror["embed"].data_ptr() == mirror["head"].data_ptr()
    assert mirror["step"] == 3
    stager.close()


def test_training_after_stage_does_not_change_what_was_staged():
    """Work queued on the current stream after stage() runs after the copy."""
    sd = _state_dict()
    expected = [t.cpu() for t in sd["layers"]]
    stager = sdtree.Stager(sd)
    future = stager.stage(sd)
    for t in sd["layers"]:
        t.mul_(2).add_(1)  # the optimizer step, queued right after
    mirror = future.result()
    assert all(torch.equal(m, e) for m, e in zip(mirror["layers"], expected))
    again = stager.stage(sd)
    mirror = again.result()
    assert all(torch.equal(m, s.cpu()) for m, s in zip(mirror["layers"], sd["layers"]))
    stager.close()


def test_non_blocking_false_returns_the_mirror_done():
    sd = _state_dict()
    stager = sdtree.Stager(sd, non_blocking=False)
    mirror = stager.stage(sd)
    assert isinstance(mirror, dict) and torch.equal(mirror["embed"], sd["embed"].cpu())
    stager.close()
