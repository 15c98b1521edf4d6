"""Small models and optimizers shared by the adapter tests (importable by workers)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, dim)
        self.linear2 = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.register_buffer("scale", torch.ones(dim))
        self.register_buffer("cache", torch.zeros(dim), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.linear2(torch.relu(self.linear1(x)))) * self.scale


class WithExtraState(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.proj(x)

    def get_extra_state(self) -> dict:
        return {"calls": self.calls}

    def set_extra_state(self, state: dict) -> None:
        self.calls = state["calls"]


class Net(nn.Module):
    def __init__(self, tied: bool = False, n_blocks: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.blocks = nn.Sequential(*[Block() for _ in range(n_blocks)])
        self.extra = WithExtraState()
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 16, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.extra(self.blocks(self.embed(tokens)))))


def batch(seed: int = 0, n: int = 6) -> torch.Tensor:
    return torch.randint(0, 16, (n,), generator=torch.Generator().manual_seed(seed))


def train(model: nn.Module, optims, steps: int = 2, seed: int = 0) -> list[float]:
    optims = optims if isinstance(optims, (list, tuple)) else [optims]
    losses = []
    device = next(model.parameters()).device
    for step in range(steps):
        tokens = batch(seed + step).to(device)
        loss = nn.functional.cross_entropy(model(tokens), tokens)
        loss.backward()
        for optim in optims:
            optim.step()
            optim.zero_grad()
        losses.append(loss.item())
    return losses


def make(
    *, seed: int = 0, tied: bool = False, frozen: bool = False, optim: str = "adam", groups: bool = False
) -> tuple[Net, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Net(tied=tied)
    if frozen:
        model.blocks[0].linear1.requires_grad_(False)
    return model, make_optim(model, optim, groups)


def make_optim(model: nn.Module, kind: str = "adam", groups: bool = False) -> torch.optim.Optimizer:
    params = [p for p in model.parameters()]
    if groups:
        decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
        rest = [p for n, p in model.named_parameters() if not n.endswith("weight")]
        spec = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "lr": 0.05}, {"params": [], "lr": 0.3}]
    else:
        spec = params
    if kind == "adam":
        return torch.optim.Adam(spec, lr=1e-2)
    if kind == "adamw":
        return torch.optim.AdamW(spec, lr=1e-2, weight_decay=0.01)
    if kind == "sgd":
        return torch.optim.SGD(spec, lr=1e-2, momentum=0.9)
    raise ValueError(kind)


def clone_setup(model: nn.Module, optim: torch.optim.Optimizer):
    """A deep copy of a model and its optimizer (same parameters mapped over)."""
    model2 = copy.deepcopy(model)
    mapping = {id(p): q for p, q in zip(model.parameters(), model2.parameters())}
    optim2 = type(optim)([{**g, "params": [mapping[id(p)] for p in g["params"]]} for g in optim.param_groups])
    optim2.load_state_dict(optim.state_dict())
    return model2, optim2


def snapshot_module(model: nn.Module) -> dict:
    out = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)}
    out.update({f"{n}.grad": p.grad.clone() if p.grad is not None else None for n, p in model.named_parameters()})
    out.update({f"{n}.version": p._version for n, p in model.named_parameters()})
    return out


def snapshot_optim(optim: torch.optim.Optimizer) -> dict:
    return copy.deepcopy(torch.optim.Optimizer.state_dict(optim))
