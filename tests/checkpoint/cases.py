"""Small checkpoints for the checkpoint tests: real model and optimizer state dicts."""

from __future__ import annotations

import torch
from torch import nn

import sdtree
from sdtree.transforms import add_prefix


class TinyLM(nn.Module):
    """Embedding tied to the output head, a bf16 buffer, and a frozen-free MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 4)
        self.mlp = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 4))
        self.head = nn.Linear(4, 6, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 4).to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mlp(self.embed(x)) * self.scale.float())


def trained() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = TinyLM()
    optim = torch.optim.AdamW(
        [
            {"params": [model.embed.weight], "lr": 0.01},
            {"params": list(model.mlp.parameters()), "lr": 0.02, "weight_decay": 0.1},
        ]
    )
    model(torch.tensor([[0, 1, 2]])).sum().backward()
    optim.step()
    return model, optim


def combined() -> dict:
    """``{"model", "optim", "step"}``: FQN-keyed, with a tied pair and a bf16 tensor."""
    model, optim = trained()
    model_sd, optim_sd = sdtree.get_state_dict(model, optim)
    return {"model": dict(model_sd), "optim": optim_sd, "step": 3}


def compiled(checkpoint: dict) -> dict:
    """The same checkpoint with the FQNs of a ``torch.compile``d model (``_orig_mod.``)."""
    prefix = add_prefix("_orig_mod.")
    return {**checkpoint, "model": prefix(checkpoint["model"]), "optim": prefix(checkpoint["optim"])}


def model_state_dict() -> dict:
    """A plain model state dict with tied tensors (``head.weight`` is ``embed.weight``)."""
    model, _ = trained()
    return dict(model.state_dict())


class Payload:
    """Unpickling it creates ``marker``: proof that code from the file ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))
