"""Splitting flat optimizer keys into their section, FQN and name.

A flat optimizer key is ``"state.<fqn>.<name>"`` or
``"param_groups.<fqn>.<hyper>"``. FQNs hold dots too, so a key splits only
against the FQNs it may name: at the longest of them that the key continues
with. :func:`split_flat_keys` reads those FQNs off the ``param_groups.`` keys
(hyper-parameter names hold no dot); :func:`parse_flat_key` takes them from
the caller (an optimizer layout).
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from typing import Any, Optional

from sdtree.errors import LayoutMismatchError
from sdtree.types import PG_DOT, STATE_DOT

__all__ = ["parse_flat_key", "split_flat_keys"]


def _owner(rest: str, fqns: Container[str]) -> Optional[tuple[str, str]]:
    """Split ``"<fqn>.<name>"`` at the longest FQN of ``fqns`` it starts with
    (``None`` when it starts with none)."""
    cut = len(rest)
    while (cut := rest.rfind(".", 0, cut)) >= 0:
        if rest[:cut] in fqns:
            return rest[:cut], rest[cut + 1 :]
    return None


def parse_flat_key(key: str, fqns: Container[str]) -> Optional[tuple[str, str, str]]:
    """``(section, fqn, rest)`` of the flat optimizer key ``key``, ``section``
    being ``"state."`` or ``"param_groups."`` and ``fqn`` one of ``fqns``;
    ``None`` when the key is in neither section or names none of ``fqns``.

    >>> parse_flat_key("state.layer.weight.exp_avg", {"layer", "layer.weight"})
    ('state.', 'layer.weight', 'exp_avg')
    """
    for section in (STATE_DOT, PG_DOT):
        if key.startswith(section):
            found = _owner(key[len(section) :], fqns)
            return None if found is None else (section, *found)
    return None


def split_flat_keys(flat: Mapping[str, Any], fn: str) -> list[tuple[str, str, str]]:
    """Split each key of the flat optimizer state dict ``flat`` into
    ``(section, fqn, rest)``, in order.

    FQNs are read off the ``param_groups.<fqn>.<hyper>`` keys; a ``state.``
    key belongs to the longest such FQN it starts with.

    Raises:
        LayoutMismatchError: a ``state.`` key names no FQN of the
            ``param_groups.`` keys (``fn`` names the caller).
    """
    fqns = {k[len(PG_DOT) :].rpartition(".")[0] for k in flat if k.startswith(PG_DOT)}
    parsed = []
    for key in flat:
        if key.startswith(PG_DOT):
            fqn, _, hyper = key[len(PG_DOT) :].rpartition(".")
            parsed.append((PG_DOT, fqn, hyper))
            continue
        found = _owner(key[len(STATE_DOT) :], fqns)
        if found is None:
            raise LayoutMismatchError(
                f"{fn}: flat optimizer key {key!r} belongs to no parameter listed "
                "under 'param_groups.<fqn>.<hyper>'. Every state entry needs its "
                "parameter's param_groups keys; flatten with flatten_optimizer()."
            )
        parsed.append((STATE_DOT, *found))
    return parsed
