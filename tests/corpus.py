"""A shared corpus of state dicts for parametrized example tests."""

from collections import OrderedDict

import torch

MODEL_STATE_DICTS = {
    "empty": {},
    "plain": {"layer.weight": torch.arange(6.0).view(2, 3), "layer.bias": torch.zeros(2)},
    "ordered": OrderedDict([("b", torch.ones(1)), ("a", torch.zeros(1))]),
    "none_and_scalars": {"w": torch.ones(2), "extra": None, "count": 3, "name": "x"},
    "extra_state": {"norm._extra_state": {"version": 2, "history": [1, 2]}, "norm.weight": torch.ones(3)},
    "odd_dtypes": {
        "h": torch.ones(2, dtype=torch.float16),
        "b": torch.ones(2, dtype=torch.bfloat16),
        "m": torch.tensor([True, False]),
        "z": torch.empty(0, 4),
        "s": torch.tensor(5),
    },
}


def tied_state_dict():
    shared = torch.randn(4, 3)
    return {"embed.weight": shared, "head.weight": shared, "head.bias": torch.zeros(4)}


def int_keyed_optimizer_state_dict():
    return {
        "state": {
            0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2, 3), "exp_avg_sq": torch.ones(2, 3)},
            1: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2), "exp_avg_sq": torch.zeros(2)},
        },
        "param_groups": [
            {"lr": 0.1, "betas": (0.9, 0.999), "weight_decay": 0.0, "params": [0]},
            {"lr": 0.01, "betas": (0.9, 0.95), "weight_decay": 0.1, "params": [1, 2]},
            {"lr": 0.5, "betas": (0.9, 0.95), "weight_decay": 0.0, "params": []},
        ],
    }


FQNS = {0: "module.layer.weight", 1: "module.layer.bias", 2: "module.frozen.weight"}
