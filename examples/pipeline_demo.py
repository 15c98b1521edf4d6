"""The quick-start job: real model and optimizer state dicts through an sdtree pipeline.

Builds a small model wrapped the way trainers wrap it (a compile-style
``_orig_mod.`` and a DDP-style ``module.`` prefix), trains it one step with
AdamW in two param groups, then composes sdtree transforms on its model and
optimizer state dicts and prints what each step did.
"""

from __future__ import annotations

import torch
from torch import nn

import sdtree
from sdtree.testing import assert_state_dict_equal
from sdtree.transforms import (
    flatten_optimizer,
    offload_to_cpu,
    optimizer_layout,
    param_ids_to_fqns,
    rename,
    select_keys,
    strip_prefix,
    unflatten_optimizer,
)


class Wrapper(nn.Module):
    def __init__(self, inner: nn.Module, attr: str) -> None:
        super().__init__()
        setattr(self, attr, inner)
        self._attr = attr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self._attr)(x)


def _nbytes(tree: object) -> int:
    leaves = sdtree.flatten_state_dict({"x": tree})[0].values()
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))


def _show(step: str, before: dict, after: dict) -> None:
    keys_b, keys_a = list(before), list(after)
    print(f"  {step}")
    print(f"      keys {len(keys_b):>3} -> {len(keys_a):<3} bytes {_nbytes(before):>7} -> {_nbytes(after):<7}"
          f" first key {keys_b[0]!r} -> {keys_a[0]!r}")


def main() -> None:
    torch.manual_seed(0)
    core = nn.Sequential()
    core.add_module("layers", nn.Sequential(*[nn.Linear(16, 16) for _ in range(3)]))
    core.add_module("head", nn.Linear(16, 4))
    model = Wrapper(Wrapper(core, "_orig_mod"), "module")
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    optim = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-3)
    model(torch.randn(8, 16)).square().mean().backward()
    optim.step()

    print("model state dict")
    msd = model.state_dict()
    steps = [
        strip_prefix("module."),
        strip_prefix("_orig_mod."),
        rename([(r"^layers\.(\d+)\.", r"blocks.\1.")]),
        select_keys("blocks."),
        offload_to_cpu(share_memory=True),
    ]
    current = msd
    for step in steps:
        nxt = step(current)
        _show(repr(step), current, nxt)
        current = nxt
    clean = sdtree.pipeline(*steps)
    print(f"  composed: {clean!r}")
    assert_state_dict_equal(clean(msd), current)

    print("optimizer state dict")
    osd = optim.state_dict()
    # Optimizer.state_dict() numbers parameters in param-group order.
    name_of = {p: n for n, p in model.named_parameters()}
    ordered = [p for group in optim.param_groups for p in group["params"]]
    ids = {i: name_of[p] for i, p in enumerate(ordered)}
    to_fqns = param_ids_to_fqns(ids)
    named = to_fqns(osd)
    _show(repr(to_fqns).split("(")[0] + "(...)", {str(k): v for k, v in osd["state"].items()}, named["state"])
    renamed = (strip_prefix("module.") >> strip_prefix("_orig_mod."))(named)
    _show("strip_prefix('module.') >> strip_prefix('_orig_mod.')", named["state"], renamed["state"])
    flat = flatten_optimizer()(renamed)
    _show("flatten_optimizer()", renamed["state"], flat)
    back = unflatten_optimizer(optimizer_layout(renamed))(flat)
    assert_state_dict_equal(back, renamed)
    print("  unflatten_optimizer(optimizer_layout(...)) restores it exactly")
    print("inputs untouched:", list(msd)[0], "still starts with 'module.'; optimizer state keys", list(osd["state"])[:3])


if __name__ == "__main__":
    main()
