"""Options of the drop-in API: the fields and defaults of torch's ``StateDictOptions``."""

from __future__ import annotations

from typing import Any, Optional

import attrs

__all__ = ["StateDictOptions", "as_options"]


def _check_broadcast(instance: "StateDictOptions", attribute: Any, value: bool) -> None:
    if value and not instance.full_state_dict:
        raise ValueError(
            "StateDictOptions: broadcast_from_rank0=True needs full_state_dict=True "
            "(rank 0 broadcasts a full state dict). Pass full_state_dict=True too."
        )


_bool = attrs.validators.instance_of(bool)


@attrs.frozen(kw_only=True)
class StateDictOptions:
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

    Update with ``attrs.evolve(options, strict=False)``.
    """

    full_state_dict: bool = attrs.field(default=False, validator=_bool)
    cpu_offload: bool = attrs.field(default=False, validator=_bool)
    ignore_frozen_params: bool = attrs.field(default=False, validator=_bool)
    keep_submodule_prefixes: bool = attrs.field(default=True, validator=_bool)
    strict: bool = attrs.field(default=True, validator=_bool)
    broadcast_from_rank0: bool = attrs.field(default=False, validator=[_bool, _check_broadcast])
    flatten_optimizer_state_dict: bool = attrs.field(default=False, validator=_bool)
    dsd_fqn_modifiers: str = attrs.field(default="_fqn_modifiers", validator=attrs.validators.instance_of(str))


def as_options(options: Optional[Any]) -> StateDictOptions:
    """Return ``options`` as sdtree's options; accepts torch's ``StateDictOptions`` too."""
    if options is None:
        return StateDictOptions()
    if isinstance(options, StateDictOptions):
        return options
    from torch.distributed.checkpoint.state_dict import StateDictOptions as TorchOptions

    if isinstance(options, TorchOptions):
        return StateDictOptions(**{f.name: getattr(options, f.name) for f in attrs.fields(StateDictOptions)})
    raise TypeError(
        f"options must be a StateDictOptions (sdtree's or torch's), got {type(options).__name__}."
    )
