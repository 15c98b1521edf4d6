"""Tied weights: ``tie_weights`` stores one tensor under a second key too;
``untie_weights``, its inverse, drops that second key after checking that
it still holds the same values.

A tied model's optimizer holds one parameter, under the first key (torch's
``named_parameters()`` lists a shared parameter once), so on optimizer state
dicts both transforms only check that the second key has no state of its
own (it would not be tied); they change nothing there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch

from sdtree.errors import KeyCollisionError, PatternMatchError, TensorMismatchError, preview as _preview
from sdtree.types import PARAMS, PG, PG_DOT, STATE, STATE_DOT, form_of
from sdtree.transforms.compose import Transform

__all__ = ["tie_weights", "untie_weights"]


class _Tying(Transform):
    source: str
    target: str

    def __call__(self, state_dict: Any, /) -> Any:
        if isinstance(state_dict, tuple) and len(state_dict) == 2:
            model, optim = state_dict
            return self(model), self._check_optimizer(optim)
        if form_of(state_dict, self._factory) == "model":
            return self._apply_model(state_dict)
        return self._check_optimizer(state_dict)

    def _apply_model(self, sd: Mapping[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def _check_optimizer(self, osd: Any) -> Any:
        form = form_of(osd, self._factory)
        if form == "optim":
            found = self.target in osd[STATE] or any(self.target in g[PARAMS] for g in osd[PG])
        elif form == "flat_optim":
            found = any(k.startswith((f"{STATE_DOT}{self.target}.", f"{PG_DOT}{self.target}.")) for k in osd)
        else:
            found = False  # a model state dict in the optimizer's place: nothing here is about it
        if found:
            raise TensorMismatchError(
                f"{self!r}: the optimizer has a parameter {self.target!r} of its own, so it is trained apart "
                f"from {self.source!r}, not tied to it. Convert without tying the weights."
            )
        return osd

    def _missing(self, key: str, sd: Mapping[str, Any], why: str) -> PatternMatchError:
        near = [k for k in sd if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]][:3]
        return PatternMatchError(
            f"{self!r}: the state dict has no {key!r} {why}"
            + (f"; keys like it: {_preview(near)}" if near else "")
            + ". Apply the key renames first."
        )


@attrs.frozen(repr=False)
class _TieWeights(_Tying):
    _factory = "tie_weights"
    source: str
    target: str

    def _apply_model(self, sd: Mapping[str, Any]) -> dict[str, Any]:
        if self.source not in sd:
            raise self._missing(self.source, sd, "to tie")
        if self.target in sd:
            raise KeyCollisionError(
                f"{self!r}: {self.target!r} exists already, so the state dict stores both weights (as a tied "
                "model's model.state_dict() does) and there is nothing to tie. Leave the tying step out "
                "(the llama recipes: tie_word_embeddings=False), which keeps both keys."
            )
        return {**sd, self.target: sd[self.source]}

    def inverse(self) -> Transform:
        return _UntieWeights(self.target, self.source)


def _show_difference(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"{tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"
    where = (a != b).nonzero()
    return f"first at index {tuple(where[0].tolist())}" if len(where) else "NaN payloads"


def _same_values(a: Any, b: Any) -> bool:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_meta or b.is_meta:
        return True  # planning: only the data could tell, and it is not here
    if a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
        return True
    return bool(torch.equal(a, b))


@attrs.frozen(repr=False)
class _UntieWeights(_Tying):
    _factory = "untie_weights"
    target: str
    source: str

    def _apply_model(self, sd: Mapping[str, Any]) -> dict[str, Any]:
        if self.target not in sd:
            raise self._missing(self.target, sd, "to untie")
        if self.source not in sd:
            raise self._missing(self.source, sd, "that it is tied to")
        tied, other = sd[self.target], sd[self.source]
        if not _same_values(tied, other):
            detail = _show_difference(tied, other) if isinstance(tied, torch.Tensor) and isinstance(other, torch.Tensor) else (
                f"{type(tied).__name__} vs {type(other).__name__}"
            )
            raise TensorMismatchError(
                f"{self!r}: {self.target!r} differs from {self.source!r} ({detail}), so the weights are not "
                "tied and dropping it would lose it. Convert without untying (the llama recipes: "
                "tie_word_embeddings=False)."
            )
        return {k: v for k, v in sd.items() if k != self.target}

    def inverse(self) -> Transform:
        return _TieWeights(self.source, self.target)


def tie_weights(source: str, target: str) -> Transform:
    """Return a transform that stores the tensor at ``source`` under
    ``target`` too (the same tensor, not a copy): the output embedding of a
    model whose checkpoint keeps only the input embedding.

    >>> import torch
    >>> out = tie_weights("emb", "out")({"emb": torch.ones(2)})
    >>> list(out), out["out"] is out["emb"]
    (['emb', 'out'], True)

    Its inverse, :func:`untie_weights`, drops ``target`` again.

    Raises (when applied):
        PatternMatchError: ``source`` is missing.
        KeyCollisionError: ``target`` exists already.
        TensorMismatchError: an optimizer has state for ``target`` (so it is
            not tied).
    """
    _check_keys("tie_weights", source, target)
    return _TieWeights(source, target)


def untie_weights(target: str, source: str) -> Transform:
    """Return a transform that drops ``target``, which must hold the values
    of ``source`` (tied weights): the inverse of :func:`tie_weights`.

    >>> import torch
    >>> w = torch.ones(2)
    >>> untie_weights("out", "emb")({"emb": w, "out": w})
    {'emb': tensor([1., 1.])}

    Raises (when applied):
        PatternMatchError: ``target`` or ``source`` is missing.
        TensorMismatchError: ``target`` differs from ``source`` (meta tensors:
            in shape or dtype), or an optimizer has state for ``target``.
    """
    _check_keys("untie_weights", target, source)
    return _UntieWeights(target, source)


def _check_keys(fn: str, a: Any, b: Any) -> None:
    for name, key in (("the first key", a), ("the second key", b)):
        if not isinstance(key, str) or not key:
            raise TypeError(f"{fn}: {name} must be a non-empty str, got {key!r}.")
    if a == b:
        raise ValueError(f"{fn}: both keys are {a!r}; name two different keys.")
