"""Transforms and their composition.

A transform is a frozen, callable object mapping a state dict to a new state
dict. It never mutates its input (neither containers nor tensor data), returns
new containers, shares the leaves it does not change, and is deterministic.
Transforms compose with ``>>`` (left to right) or :func:`pipeline`, print as
the calls that built them, and expose ``inverse()`` where the mapping is
exactly invertible.
"""

from __future__ import annotations

from typing import Any

import attrs

from sdtree._gc import paused_gc
from sdtree.errors import NotInvertibleError
from sdtree.transforms.plans import settle

__all__ = ["Transform", "pipeline", "identity", "pipeline_steps"]


class Transform:
    """Base class of every transform.

    Subclasses are ``attrs`` frozen classes whose fields are their
    configuration. ``repr`` shows the public factory call: the class names it
    in ``_factory``; fields without defaults are positional, unless keyword-only.
    Every call runs with the cyclic garbage collector paused
    (:func:`~sdtree._gc.paused_gc`): a subclass's ``__call__`` is wrapped
    when the class is made.
    """

    _factory: str = ""
    # whether the transform takes the pending outputs of a tensor rule before
    # it in a pipeline, and a model state dict as plans.Columns
    # (sdtree.transforms.plans): it never reads values
    _takes_pending: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        call = cls.__dict__.get("__call__")
        if call is not None:  # attrs remakes slotted classes from this dict: paused_gc wraps once
            setattr(cls, "__call__", paused_gc(call))

    def __call__(self, state_dict: Any, /) -> Any:
        raise NotImplementedError

    def _call(self, state_dict: Any, pending: bool) -> Any:
        """``self(state_dict)``, except inside a pipeline: a step that takes
        pending outputs is called so, with ``pending`` true, and may then
        plan meta outputs as pending ones and return plans.Columns."""
        return self(state_dict)

    def inverse(self) -> Transform:
        """Return the transform that undoes this one exactly.

        Raises:
            NotInvertibleError: the mapping loses information.
        """
        raise NotInvertibleError(
            f"{self!r}.inverse(): this transform has no exact inverse (it drops or "
            "merges information). Build the reverse pipeline by hand."
        )

    def __rshift__(self, other: Transform) -> Transform:
        if not isinstance(other, Transform):
            return NotImplemented
        return pipeline(self, other)

    def __repr__(self) -> str:
        parts = []
        for field in attrs.fields(type(self)):  # type: ignore[arg-type]  # subclasses are attrs classes
            if not field.repr:
                continue
            value = getattr(self, field.name)
            if field.default is attrs.NOTHING and not field.kw_only:
                parts.append(repr(value))
            elif field.default is attrs.NOTHING:
                parts.append(f"{field.name}={value!r}")
            elif value != field.default:
                parts.append(f"{field.name}={value!r}")
        return f"{self._factory or type(self).__name__}({', '.join(parts)})"


@attrs.frozen(repr=False)
class _Pipeline(Transform):
    transforms: tuple[Transform, ...]

    def __call__(self, state_dict: Any, /) -> Any:
        steps = self.transforms
        held = False  # whether state_dict may hold pending outputs, or be plans.Columns
        for transform in steps:
            if transform._takes_pending:
                state_dict, held = transform._call(state_dict, True), True
            else:
                if held:
                    state_dict, held = settle(state_dict), False
                state_dict = transform(state_dict)
        return settle(state_dict) if held else state_dict

    def inverse(self) -> Transform:
        return pipeline(*(t.inverse() for t in reversed(self.transforms)))

    def __repr__(self) -> str:
        if not self.transforms:
            return "pipeline()"
        return " >> ".join(repr(t) for t in self.transforms)


def pipeline(*transforms: Transform) -> Transform:
    """Compose ``transforms`` left to right: ``pipeline(a, b)(x) == b(a(x))``.

    Nested pipelines are flattened, so ``a >> b >> c`` holds three steps.

    >>> from sdtree.transforms import strip_prefix, add_prefix
    >>> t = pipeline(strip_prefix("module."), add_prefix("model."))
    >>> t({"module.w": 1})
    {'model.w': 1}
    >>> t
    strip_prefix('module.') >> add_prefix('model.')
    """
    steps: list[Transform] = []
    for transform in transforms:
        if not isinstance(transform, Transform):
            raise TypeError(
                f"pipeline: expected Transform objects, got {type(transform).__name__} "
                f"({transform!r}). Build steps with the factories in sdtree.transforms."
            )
        if isinstance(transform, _Pipeline):
            steps.extend(transform.transforms)
        else:
            steps.append(transform)
    if len(steps) == 1:
        return steps[0]
    return _Pipeline(tuple(steps))


def pipeline_steps(transform: Transform) -> tuple[Transform, ...]:
    """The steps of a pipeline, in order; a transform that is no pipeline is its one step.

    >>> from sdtree.transforms import strip_prefix, add_prefix
    >>> pipeline_steps(strip_prefix("module.") >> add_prefix("model."))
    (strip_prefix('module.'), add_prefix('model.'))
    """
    return transform.transforms if isinstance(transform, _Pipeline) else (transform,)


def identity() -> Transform:
    """Return the transform that returns its input unchanged (an empty pipeline)."""
    return _Pipeline(())
