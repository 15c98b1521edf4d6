"""Options of the drop-in API: the fields and defaults of torch's ``StateDictOptions``.

sdtree's ``StateDictOptions`` is a frozen, validated subclass of torch's
dataclass, so it goes wherever torch's goes: ``isinstance`` checks, and
torch's own ``get_*`` / ``set_*`` (which call ``dataclasses.asdict`` on it).
It is not an attrs class because torch's functions need a dataclass; it is
frozen by hand because a frozen dataclass cannot subclass torch's unfrozen one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from torch.distributed.checkpoint.state_dict import StateDictOptions as _TorchStateDictOptions

__all__ = ["StateDictOptions", "as_options"]


@dataclasses.dataclass(init=False, eq=True, unsafe_hash=True)
class StateDictOptions(_TorchStateDictOptions):
    """How ``get_*`` / ``set_*`` read and write state dicts (as torch's).

    Attributes:
        full_state_dict: gather sharded tensors into full tensors.
        cpu_offload: move every tensor to CPU; with ``full_state_dict``, only
            rank 0 keeps the result, the other ranks get ``{}``.
        ignore_frozen_params: leave out parameters with ``requires_grad=False``.
        keep_submodule_prefixes: with the deprecated ``submodules=``, keep the
            submodules' prefixes in the keys.
        strict: ``set_*`` raises on missing and unexpected keys.
        broadcast_from_rank0: ``set_*`` takes the full state dict on rank 0
            only and broadcasts it (needs ``full_state_dict``).
        flatten_optimizer_state_dict: use torch's flat optimizer form.
        dsd_fqn_modifiers: name of the module method that maps state-dict
            names to the hidden child modules they skip.

    Keyword-only, checked at construction, and frozen: update with
    ``dataclasses.replace(options, strict=False)``.

    >>> import dataclasses
    >>> dataclasses.replace(StateDictOptions(), strict=False).strict
    False
    """

    def __init__(
        self,
        *,
        full_state_dict: bool = False,
        cpu_offload: bool = False,
        ignore_frozen_params: bool = False,
        keep_submodule_prefixes: bool = True,
        strict: bool = True,
        broadcast_from_rank0: bool = False,
        flatten_optimizer_state_dict: bool = False,
        dsd_fqn_modifiers: str = "_fqn_modifiers",
    ) -> None:
        values: dict[str, Any] = {
            "full_state_dict": full_state_dict,
            "cpu_offload": cpu_offload,
            "ignore_frozen_params": ignore_frozen_params,
            "keep_submodule_prefixes": keep_submodule_prefixes,
            "strict": strict,
            "broadcast_from_rank0": broadcast_from_rank0,
            "flatten_optimizer_state_dict": flatten_optimizer_state_dict,
            "dsd_fqn_modifiers": dsd_fqn_modifiers,
        }
        for name, value in values.items():
            expected = str if name == "dsd_fqn_modifiers" else bool
            if not isinstance(value, expected):
                raise TypeError(
                    f"StateDictOptions: {name} must be a {expected.__name__}, got {name}={value!r}."
                )
        if broadcast_from_rank0 and not full_state_dict:
            raise ValueError(
                "StateDictOptions: broadcast_from_rank0=True needs full_state_dict=True "
                "(rank 0 broadcasts a full state dict). Pass full_state_dict=True too."
            )
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise dataclasses.FrozenInstanceError(
            f"StateDictOptions is frozen: cannot assign {name}={value!r}. "
            f"Use dataclasses.replace(options, {name}=...)."
        )

    def __delattr__(self, name: str) -> None:
        raise dataclasses.FrozenInstanceError(f"StateDictOptions is frozen: cannot delete {name!r}.")


_FIELDS = tuple(f.name for f in dataclasses.fields(StateDictOptions))


def as_options(options: Optional[Any]) -> StateDictOptions:
    """Return ``options`` as sdtree's options; accepts torch's ``StateDictOptions`` too."""
    if options is None:
        return StateDictOptions()
    if isinstance(options, StateDictOptions):
        return options
    if isinstance(options, _TorchStateDictOptions):
        return StateDictOptions(**{name: getattr(options, name) for name in _FIELDS})
    raise TypeError(
        f"options must be a StateDictOptions (sdtree's or torch's), got {type(options).__name__}."
    )
