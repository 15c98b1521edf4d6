import torch
from hypothesis import given, settings

from sdtree.testing import DTYPES, optimizer_state_dicts, state_dicts


def test_strategies_eventually_generate_every_feature():
    seen = set()

    @settings(max_examples=400, derandomize=True, database=None)
    @given(state_dicts(), optimizer_state_dicts())
    def collect(sd, osd):
        for key, value in sd.items():
            if "." in key:
                seen.add("dotted key")
            if isinstance(value, torch.Tensor):
                seen.add(value.dtype)
            elif isinstance(value, (list, tuple, dict)):
                seen.add("nested")
        ids = [id(v) for v in sd.values() if isinstance(v, torch.Tensor)]
        if len(ids) != len(set(ids)):
            seen.add("shared")
        groups = osd["param_groups"]
        if len(groups) > 1:
            seen.add("several groups")
        if any(not g["params"] for g in groups):
            seen.add("empty group")
        for g in groups:
            seen.update(type(k).__name__ for k in g["params"])
        if any(isinstance(v, dict) for entry in osd["state"].values() for v in entry.values()):
            seen.add("nested state")

    collect()
    wanted = {"dotted key", "nested", "shared", "several groups", "empty group", "int", "str", "nested state"}
    assert wanted <= seen, wanted - seen
    assert set(DTYPES) <= seen, set(DTYPES) - seen
