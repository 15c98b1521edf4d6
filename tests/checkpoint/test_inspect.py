import json
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

from sdtree.checkpoint import Difference, describe, diff, save
from sdtree.errors import InvalidToleranceError, NothingToCompareError
from tests.checkpoint import cases


@pytest.mark.parametrize("name", ["ckpt", "ckpt.pt"])
def test_describe_lists_tensors_param_groups_and_values(tmp_path, name):
    checkpoint = cases.combined()
    save(checkpoint, tmp_path / name)
    summary = describe(tmp_path / name)
    by_key = {t.key: t for t in summary.tensors}
    assert by_key["model.mlp.0.weight"].shape == (5, 4) and by_key["model.mlp.0.weight"].nbytes == 80
    assert by_key["model.scale"].dtype == "bfloat16"
    assert "optim.state.mlp.0.weight.exp_avg" in by_key
    assert [(g.key, g.params, g.hyper["lr"]) for g in summary.param_groups] == [
        ("optim.param_groups.0", 1, 0.01),
        ("optim.param_groups.1", 4, 0.02),
    ]
    assert summary.values == (("step", 3),)
    report = json.loads(json.dumps(summary.to_json()))
    assert report["param_groups"][1]["hyper"]["betas"] == [0.9, 0.999]
    assert report["totals"]["bytes"] == summary.stored_bytes


def test_describe_marks_tied_tensors_and_counts_them_once(tmp_path):
    save(cases.model_state_dict(), tmp_path / "m.safetensors")
    summary = describe(tmp_path / "m.safetensors")
    tied = [t for t in summary.tensors if t.tied_to]
    assert [(t.key, t.tied_to) for t in tied] == [("head.weight", "embed.weight")]
    assert summary.stored_bytes == sum(t.nbytes for t in summary.tensors) - tied[0].nbytes
    assert summary.by_dtype()["bfloat16"] == (1, 8)


def test_diff_finds_the_same_checkpoint_equal_across_formats(tmp_path):
    checkpoint = cases.combined()
    save(checkpoint, tmp_path / "a")
    save(checkpoint, tmp_path / "b.pt")
    result = diff(tmp_path / "a", tmp_path / "b.pt")
    assert result.equal and result.compared > 20


def test_diff_reports_every_kind_of_difference(tmp_path):
    a = {"same": torch.ones(2), "gone": torch.ones(1), "shape": torch.ones(2), "dtype": torch.ones(2), "value": torch.arange(4.0), "kind": 1}
    b = {"same": torch.ones(2), "new": torch.ones(1), "shape": torch.ones(3), "dtype": torch.ones(2, dtype=torch.float64), "value": torch.tensor([0.0, 1.0, 2.5, 3.0]), "kind": torch.ones(1)}
    save(a, tmp_path / "a.pt")
    save(b, tmp_path / "b.pt")
    found = {(d.kind, d.key): d.detail for d in diff(tmp_path / "a.pt", tmp_path / "b.pt").differences}
    assert set(found) == {("missing", "gone"), ("unexpected", "new"), ("shape", "shape"), ("dtype", "dtype"), ("value", "value"), ("type", "kind")}
    assert found[("value", "value")] == "1 of 4 element(s) differ; first at index [2]: 2.0 vs 2.5; max |A-B| = 0.5"
    assert found[("shape", "shape")] == "[2] vs [3]"
    assert found[("type", "kind")] == "int 1 vs tensor [1] float32"


def test_diff_tolerances(tmp_path):
    save({"w": torch.tensor([1.0, 2.0])}, tmp_path / "a.pt")
    save({"w": torch.tensor([1.0, 2.001])}, tmp_path / "b.safetensors")
    assert not diff(tmp_path / "a.pt", tmp_path / "b.safetensors").equal
    assert diff(tmp_path / "a.pt", tmp_path / "b.safetensors", atol=0.01).equal
    assert diff(tmp_path / "a.pt", tmp_path / "b.safetensors", rtol=0.001).equal


@pytest.mark.parametrize("bad", [{"rtol": -1e-3}, {"atol": float("nan")}, {"atol": float("inf")}])
def test_diff_refuses_tolerances_that_cannot_tell_values_apart(tmp_path, bad):
    save({"w": torch.tensor([1.0])}, tmp_path / "a.pt")
    name = next(iter(bad))
    with pytest.raises(InvalidToleranceError, match=rf"diff: {name} \(--{name}\) must be a finite number >= 0 \(0: exact\), not "):
        diff(tmp_path / "a.pt", tmp_path / "a.pt", **bad)


def test_diff_of_two_empty_checkpoints_is_an_error_not_equal(tmp_path):
    torch.save({}, tmp_path / "a.pt")
    torch.save({"model": {}}, tmp_path / "b.pt")
    with pytest.raises(NothingToCompareError, match=r"neither '.*a\.pt' nor '.*b\.pt' holds an entry, so nothing was compared"):
        diff(tmp_path / "a.pt", tmp_path / "b.pt")
    torch.save({"step": 3}, tmp_path / "c.pt")  # one entry: compared, and a difference
    result = diff(tmp_path / "a.pt", tmp_path / "c.pt")
    assert not result.equal and [d.kind for d in result.differences] == ["unexpected"]


def _dcp_save(state_dict, path):
    """Save with torch's own ``dcp.save``, as a trainer does."""
    with warnings.catch_warnings():  # torch warns about no_dist even when asked for it
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state_dict, checkpoint_id=path, no_dist=True)


def test_diff_tells_int_keys_from_str_keys(tmp_path):
    # dcp.save stores the int keys of optim.state_dict() as strings: that state loads into no parameter
    _, optim = cases.trained()
    torch.save({"optim": optim.state_dict()}, tmp_path / "a.pt")
    _dcp_save({"optim": optim.state_dict()}, tmp_path / "b")
    result = diff(tmp_path / "a.pt", tmp_path / "b")
    assert not result.equal
    assert {d.kind for d in result.differences} == {"key"}
    assert len(result.differences) == sum(len(entry) for entry in optim.state_dict()["state"].values())  # each state entry
    assert Difference(
        "key", "optim.state.0.exp_avg", "A has ['optim']['state'][0]['exp_avg'], B has ['optim']['state']['0']['exp_avg']: key 0 (int) vs '0' (str)"
    ) in result.differences
    assert diff(tmp_path / "b", tmp_path / "b").equal


def test_diff_tells_a_dotted_key_from_nested_keys(tmp_path):
    w, v = torch.ones(2), torch.zeros(2)
    save({"a.b": w}, tmp_path / "flat.pt")
    save({"a": {"b": w}}, tmp_path / "nested.pt")
    assert diff(tmp_path / "flat.pt", tmp_path / "nested.pt").differences == (
        Difference("key", "a.b", "A has ['a.b'], B has ['a']['b']"),
    )
    # both in one checkpoint: neither is dropped, and each is named by its path
    save({"a.b": v, "a": {"b": w}}, tmp_path / "both.pt")
    result = diff(tmp_path / "both.pt", tmp_path / "nested.pt")
    assert result.differences == (Difference("missing", "['a.b']", "in A, not in B"),) and result.compared == 1


def test_describe_names_entries_that_share_a_flat_key_by_their_paths(tmp_path):
    save({"a.b": torch.ones(1), "a": {"b": torch.zeros(2)}, "n.m": 1, "n": {"m": 2}}, tmp_path / "both.pt")
    summary = describe(tmp_path / "both.pt")
    assert [(t.key, t.shape) for t in summary.tensors] == [("['a.b']", (1,)), ("['a']['b']", (2,))]
    assert summary.to_json()["values"] == {"['n.m']": 1, "['n']['m']": 2}
