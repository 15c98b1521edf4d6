"""PyTorch's test/distributed/checkpoint/test_state_dict.py, test by test, on CPU/gloo.

Each body runs what one of torch's tests checks, against sdtree's functions
(``api="sdtree"``, what the tests run) or torch's own (``api="torch"``: the
same body, to show that torch passes it on CPU). torch's verification helpers
(``VerifyStateDictMixin._verify_msd`` / ``_verify_osd`` /
``_verify_osd_by_load`` from ``common_state_dict``) are used as they are, with
the ``set_state_dict`` and ``_gather_state_dict`` they call pointed at the
api under test.

Adapted from CUDA: device "cpu", gloo, every rank seeded alike (same model,
same batches: averaged gradients equal the unsharded ones), FSDP1 built with
``device_id=cpu``, ``torch.compile`` with the eager backend, small models
where torch's are big, and fewer training steps.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import sys
import types
import unittest
from collections.abc import Iterator, Mapping
from itertools import chain
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard import sharded_tensor
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.testing._internal.common_dist_composable import CompositeParamModel, UnitModule

import sdtree

# common_state_dict imports the deprecated alias torch.distributed._sharded_tensor,
# whose import warns however warnings are filtered: alias it first, as that import would
sys.modules.setdefault("torch.distributed._sharded_tensor", sharded_tensor)
from torch.testing._internal.distributed import common_state_dict  # noqa: E402

CPU = torch.device("cpu")
STEPS = 3  # torch trains 10 steps; 3 already give every optimizer state
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


# -- the api under test -----------------------------------------------------------


# the drop-in functions torch and sdtree name alike
_SAME_NAMES = [n for n in sdtree.__all__ if n.startswith(("get_", "set_"))] + ["StateDictOptions"]


def _api(name: str) -> types.SimpleNamespace:
    """The functions under test, by sdtree's names."""
    if name == "sdtree":
        return types.SimpleNamespace(
            **{n: getattr(sdtree, n) for n in _SAME_NAMES},
            patch_model_state_dict=sdtree.patch_model_state_dict,
            patch_optimizer_state_dict=sdtree.patch_optimizer_state_dict,
            gather_state_dict=sdtree.gather_state_dict,
        )
    if name == "torch":
        from torch.distributed._state_dict_utils import _gather_state_dict
        from torch.distributed.checkpoint import state_dict as dsd

        return types.SimpleNamespace(
            **{n: getattr(dsd, n) for n in _SAME_NAMES},
            patch_model_state_dict=dsd._patch_model_state_dict,
            patch_optimizer_state_dict=dsd._patch_optimizer_state_dict,
            gather_state_dict=_gather_state_dict,
        )
    raise ValueError(name)


def _difference(first: Any, second: Any, path: str = "") -> Optional[str]:
    """The first difference between two trees, as torch's ``TestCase.assertEqual``
    sees one (tensors within their dtype's tolerances, mappings by keys); ``None``."""
    where = path or "<root>"
    if isinstance(first, DTensor) or isinstance(second, DTensor):
        if not (isinstance(first, DTensor) and isinstance(second, DTensor)):
            return f"{where}: {type(first).__name__} vs {type(second).__name__}"
        if first.placements != second.placements or first.shape != second.shape:
            return f"{where}: DTensor {first.placements} {tuple(first.shape)} vs {second.placements} {tuple(second.shape)}"
        return _difference(first.to_local(), second.to_local(), path)
    if isinstance(first, ShardedTensor) or isinstance(second, ShardedTensor):
        if not (isinstance(first, ShardedTensor) and isinstance(second, ShardedTensor)):
            return f"{where}: {type(first).__name__} vs {type(second).__name__}"
        shards = [[(s.metadata.shard_offsets, s.tensor) for s in t.local_shards()] for t in (first, second)]
        return _difference([first.size(), shards[0]], [second.size(), shards[1]], path)
    if isinstance(first, torch.Tensor) or isinstance(second, torch.Tensor):
        if not (isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor)):
            return f"{where}: {type(first).__name__} vs {type(second).__name__}"
        try:
            torch.testing.assert_close(first, second)
        except AssertionError as err:
            return f"{where}: {err}"
        return None
    if isinstance(first, Mapping) and isinstance(second, Mapping):
        if set(first) != set(second):
            return f"{where}: keys {sorted(map(str, first))} vs {sorted(map(str, second))}"
        for key in first:
            found = _difference(first[key], second[key], f"{path}[{key!r}]")
            if found:
                return found
        return None
    if isinstance(first, (list, tuple)) and isinstance(second, (list, tuple)):
        if len(first) != len(second):
            return f"{where}: lengths {len(first)} vs {len(second)}"
        for i, (a, b) in enumerate(zip(first, second)):
            found = _difference(a, b, f"{path}[{i}]")
            if found:
                return found
        return None
    numbers = (int, float)
    if isinstance(first, numbers) and isinstance(second, numbers) and not isinstance(first, bool):
        return None if math.isclose(first, second, rel_tol=1.3e-6, abs_tol=1e-5) else f"{where}: {first!r} vs {second!r}"
    return None if first == second else f"{where}: {first!r} vs {second!r}"


class _Checks(common_state_dict.VerifyStateDictMixin, unittest.TestCase):
    """torch's verification helpers, with an ``assertEqual`` that compares
    trees of tensors as torch's own ``TestCase`` does."""

    def runTest(self) -> None:  # unittest needs a test method to instantiate
        pass

    def assertEqual(self, first: Any, second: Any, msg: Any = None) -> None:
        found = _difference(first, second)
        if found:
            raise self.failureException(found if msg is None else f"{found} : {msg}")

    def assertNotEqual(self, first: Any, second: Any, msg: Any = None) -> None:
        if _difference(first, second) is None:
            raise self.failureException(f"the two are equal{'' if msg is None else ' : ' + str(msg)}")


@contextlib.contextmanager
def _checks(api: types.SimpleNamespace) -> Iterator[_Checks]:
    """torch's helpers, calling back into ``api``'s ``set_state_dict`` and gather."""
    saved = common_state_dict.set_state_dict, common_state_dict._gather_state_dict
    common_state_dict.set_state_dict = api.set_state_dict
    common_state_dict._gather_state_dict = api.gather_state_dict
    try:
        yield _Checks()
    finally:
        common_state_dict.set_state_dict, common_state_dict._gather_state_dict = saved


# -- models -----------------------------------------------------------------------


def _composite() -> CompositeParamModel:
    return CompositeParamModel(device=CPU)


def _mesh(*shape: int) -> Any:
    return init_device_mesh("cpu", shape or (dist.get_world_size(),))


def _fsdp1(module: nn.Module, **kwargs: Any) -> nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel(module, device_id=CPU, **kwargs)


def _wrap_policy(wrapping: tuple[str, ...]) -> Any:
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    classes = {"Linear": nn.Linear, "UnitModule": UnitModule}
    return ModuleWrapPolicy({classes[name] for name in wrapping} if wrapping else {UnitModule})


class TiedEmbeddingModel(nn.Module):
    """torch's test_shared_weight model (a decoder tied to the embedding)."""

    def __init__(self, vocab_size: int, embedding_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.decoder = nn.Linear(embedding_dim, vocab_size)
        self.decoder.weight = self.embedding.weight

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.embedding((input * 10).to(torch.int)))


Init = Callable[[], tuple[nn.Module, torch.optim.Optimizer, torch.optim.Optimizer, nn.Module, Any]]


def _init(setup: str, optimizer: str = "adam", **kw: Any) -> Init:
    """torch's ``init_model_optim`` of each test: (model, optim, copy_optim, dist_model, dist_optim)."""
    cls = OPTIMIZERS[optimizer]
    foreach = {"foreach": kw.pop("foreach")} if "foreach" in kw else {}
    make = functools.partial(cls, lr=1e-3, **foreach)

    def init() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.Optimizer, nn.Module, Any]:
        if setup == "tied":
            orig_model: nn.Module = TiedEmbeddingModel(100, 16)
        else:
            orig_model = _composite()
        if kw.get("frozen"):
            for param in chain(orig_model.u1.parameters(), orig_model.u2.parameters()):
                param.requires_grad = False
        orig_optim, copy_optim = make(orig_model.parameters()), make(orig_model.parameters())
        dist_model = _distribute(setup, orig_model, **kw)
        if kw.get("compile_model"):
            dist_model = torch.compile(dist_model, backend="eager")
        if kw.get("optim_in_backward"):
            from torch.distributed.optim import _apply_optimizer_in_backward

            _apply_optimizer_in_backward(cls, dist_model.parameters(), {"lr": 1e-3})
            dist_optim: Any = [p._in_backward_optimizers[0] for p in dist_model.parameters()]
        else:
            dist_optim = make(dist_model.parameters())
        return orig_model, orig_optim, copy_optim, dist_model, dist_optim

    return init


def _distribute(setup: str, orig_model: nn.Module, **kw: Any) -> nn.Module:
    from torch.distributed._composable import replicate
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    if setup == "single":
        return copy.deepcopy(orig_model)
    if setup == "fsdp1":
        mesh = {"device_mesh": _mesh()} if kw.get("use_dtensor") else {}
        return _fsdp1(
            copy.deepcopy(orig_model),
            auto_wrap_policy=_wrap_policy(kw.get("wrapping", ())),
            use_orig_params=kw["use_orig_params"],
            **mesh,
        )
    if setup == "fsdp2":
        return fully_shard(copy.deepcopy(orig_model), reshard_after_forward=kw["reshard_after_forward"])
    if setup == "ddp":
        return replicate(copy.deepcopy(orig_model)) if kw["use_composable"] else DDP(copy.deepcopy(orig_model))
    if setup == "fsdp_ddp":
        dist_model = copy.deepcopy(orig_model)
        if kw["use_composable"]:
            # torch 2.13 has no composable FSDP1 fully_shard(policy=...) any more:
            # its FSDP2 fully_shard on the same units, `l` left to replicate
            replicate(dist_model.l)
            fully_shard(dist_model.u1)
            fully_shard(dist_model.u2)
            return fully_shard(dist_model, ignored_params=set(dist_model.l.parameters()))
        dist_model.l = DDP(dist_model.l)
        mesh = {"device_mesh": _mesh()} if kw.get("use_dtensor") else {}
        return _fsdp1(
            copy.deepcopy(orig_model),
            auto_wrap_policy=_wrap_policy(()),
            use_orig_params=bool(kw.get("optim_in_backward")),
            ignored_modules=[dist_model.l],
            **mesh,
        )
    if setup == "tied":
        return _fsdp1(copy.deepcopy(orig_model), device_mesh=_mesh())
    raise ValueError(setup)


# -- _test_save_load --------------------------------------------------------------


def _save_load(v: _Checks, api: types.SimpleNamespace, init: Init, test_frozen: bool = False, flatten: bool = False) -> None:
    """torch's ``_test_save_load``: train the model and its distributed copy
    alike; get -> verify (values, optimizer state, a load of it); set into a
    fresh copy -> get -> verify; the patched ``state_dict()`` -> verify."""
    options = api.StateDictOptions(ignore_frozen_params=test_frozen, flatten_optimizer_state_dict=flatten)
    model, optim, copy_optim, dist_model, dist_optim = init()
    dist_optims = dist_optim if isinstance(dist_optim, list) else [dist_optim]
    batches = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        optim.zero_grad()
        for d_optim in dist_optims:
            d_optim.zero_grad()
        batch = torch.rand(8, 100, generator=batches)
        model(batch).sum().backward()
        dist_model(batch).sum().backward()
        optim.step()
        for d_optim in dist_optims:
            d_optim.step()
    optim.zero_grad()

    msd, osd = model.state_dict(), optim.state_dict()
    dist_msd, dist_osd = api.get_state_dict(dist_model, optimizers=dist_optim, options=options)
    v._verify_msd(msd, dist_msd, options)
    v._verify_osd_by_load(model, optim, copy_optim, dist_osd)
    if not flatten:
        v._verify_osd(model, optim, osd, dist_osd)

    _, _, _, dist_model, dist_optim = init()
    dist_optims = dist_optim if isinstance(dist_optim, list) else [dist_optim]
    if test_frozen:
        return  # torch's test does not load a state dict without the frozen parameters
    api.set_model_state_dict(dist_model, model_state_dict=dist_msd, options=options)
    api.set_optimizer_state_dict(dist_model, optimizers=dist_optims, optim_state_dict=dist_osd, options=options)
    dist_msd, dist_osd = api.get_state_dict(dist_model, optimizers=dist_optims, options=options)
    v._verify_msd(msd, dist_msd, options)
    if not flatten:
        v._verify_osd(model, optim, osd, dist_osd)

    api.patch_model_state_dict(dist_model, options=options)
    api.patch_optimizer_state_dict(dist_model, optimizers=dist_optims, options=options)
    dist_msd, dist_osd = dist_model.state_dict(), dist_optims[0].state_dict()
    v._verify_msd(msd, dist_msd, options)
    v._verify_osd_by_load(model, optim, copy_optim, dist_osd)
    if not flatten:
        v._verify_osd(model, optim, osd, dist_osd)


def save_load(rank: int, world_size: int, setup: str, cases: list[dict[str, Any]], api: str = "sdtree") -> list[str]:
    """``_test_save_load`` for each case (keyword arguments of ``_init``, plus
    ``test_frozen`` / ``flatten``); return the cases run."""
    impl = _api(api)
    done = []
    with _checks(impl) as v:
        for case in cases:
            case = dict(case)
            test_frozen, flatten = case.pop("test_frozen", False), case.pop("flatten", False)
            torch.manual_seed(0)
            try:
                _save_load(v, impl, _init(setup, **case), test_frozen=test_frozen, flatten=flatten)
            except Exception as err:
                raise AssertionError(f"{setup} {case} test_frozen={test_frozen} flatten={flatten}: {err}") from err
            done.append(",".join(f"{k}={value}" for k, value in sorted(case.items())))
    return done


# -- the other tests ---------------------------------------------------------------


def _train_once(model: nn.Module, optim: torch.optim.Optimizer, seed: int = 1) -> None:
    batch = torch.rand(8, 100, generator=torch.Generator().manual_seed(seed))
    model(batch).sum().backward()
    optim.step()


def strict(rank: int, world_size: int, api: str = "sdtree") -> str:
    """test_strict: an unexpected key, then a missing one, raise under strict;
    strict=False loads the rest and reports them."""
    impl = _api(api)
    v = _Checks()
    torch.manual_seed(0)
    model = _composite()
    model_state_dict = impl.get_model_state_dict(model)
    key = next(iter(model_state_dict.keys()))
    model_state_dict["abc"] = torch.zeros(10)
    with v.assertRaisesRegex(RuntimeError, "Unexpected key"):
        impl.set_model_state_dict(model, model_state_dict=model_state_dict)
    model_state_dict.pop(key)
    incompatible_keys = impl.set_model_state_dict(
        model, model_state_dict=model_state_dict, options=impl.StateDictOptions(strict=False)
    )
    v.assertEqual(incompatible_keys.missing_keys, [key])
    v.assertEqual(incompatible_keys.unexpected_keys, ["abc"])
    model_state_dict.pop("abc")
    with v.assertRaisesRegex(RuntimeError, "Missing key"):
        impl.set_model_state_dict(model, model_state_dict=model_state_dict)
    return "ok"


def _is_cpu(value: Any) -> bool:
    if isinstance(value, ShardedTensor):
        shards = value.local_shards()
        return not shards or shards[0].tensor.device == CPU
    return bool(value.device == CPU)


def cpu_offload_full_state_dict(rank: int, world_size: int, api: str = "sdtree") -> list[str]:
    """test_cpu_offload_full_state_dict (FSDP1 on a mesh): cpu_offload puts
    every tensor on CPU; full_state_dict leaves no DTensor or ShardedTensor;
    both: rank 0 alone gets the (CPU) result, the others {}.

    torch's FSDP1 full state dict with offload crashes on CPU, so the result of
    both options is compared with the unsharded model (untrained, the same)
    and with the full state dict without offload."""
    from torch.utils._pytree import tree_all, tree_all_only

    impl = _api(api)
    v = _Checks()
    done = []
    for name in ("adam", "adamw"):
        torch.manual_seed(0)
        orig_model = _composite()
        dist_model = _fsdp1(
            copy.deepcopy(orig_model), auto_wrap_policy=_wrap_policy(()), use_orig_params=True, device_mesh=_mesh()
        )
        dist_optim = OPTIMIZERS[name](dist_model.parameters(), lr=1e-3)
        tensors = (torch.Tensor, DTensor, ShardedTensor)
        mst, ost = impl.get_state_dict(dist_model, dist_optim, options=impl.StateDictOptions(cpu_offload=True))
        v.assertTrue(tree_all_only(tensors, _is_cpu, mst))
        v.assertTrue(tree_all_only(tensors, _is_cpu, ost))
        full_mst, full_ost = impl.get_state_dict(
            dist_model, dist_optim, options=impl.StateDictOptions(full_state_dict=True)
        )
        v.assertTrue(tree_all(lambda x: not isinstance(x, (DTensor, ShardedTensor)), full_mst))
        v.assertTrue(tree_all(lambda x: not isinstance(x, (DTensor, ShardedTensor)), full_ost))
        v.assertEqual(full_mst, orig_model.state_dict())
        mst, ost = impl.get_state_dict(
            dist_model, dist_optim, options=impl.StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if rank == 0:
            v.assertTrue(tree_all_only(tensors, _is_cpu, mst))
            v.assertTrue(tree_all_only(tensors, _is_cpu, ost))
            v.assertEqual(mst, full_mst)
            v.assertEqual(ost, full_ost)
        else:
            v.assertEqual(mst, {})
            v.assertEqual(ost, {})
        done.append(name)
    return done


def activation_ckpt_fqns(rank: int, world_size: int, wrapper: str, api: str = "sdtree") -> list[str]:
    """test_activation_ckpt_fqns_ddp / _fsdp1: activation checkpointing's
    prefixes do not reach the keys, under DDP or FSDP1; returns the keys."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    from torch.nn.parallel import DistributedDataParallel as DDP

    impl = _api(api)
    torch.manual_seed(0)
    model: nn.Module = _composite()
    original_keys = impl.get_model_state_dict(model).keys()
    apply_activation_checkpointing(model)
    if wrapper == "ddp":
        model = DDP(model)
    else:
        model = _fsdp1(model, use_orig_params=wrapper == "fsdp1_orig")
    new_keys = impl.get_model_state_dict(model).keys()
    _Checks().assertEqual(original_keys, new_keys)
    return list(new_keys)


def extra_state(rank: int, world_size: int, api: str = "sdtree") -> str:
    """test_extra_state: a module's extra state (here a string) round-trips
    through get/set under DDP and comes out as ``model.state_dict()`` has it."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    impl = _api(api)
    v = _Checks()
    torch.manual_seed(0)
    model = _composite()

    def get_extra_state(self: nn.Module) -> str:
        return "MyState"

    def set_extra_state(self: nn.Module, state: Any) -> None:
        return

    # torch's test patches the class for good; the worker lives on, so restore it
    UnitModule.get_extra_state = get_extra_state  # type: ignore[attr-defined]
    UnitModule.set_extra_state = set_extra_state  # type: ignore[attr-defined]
    try:
        ddp_model = DDP(copy.deepcopy(model))
        impl.set_model_state_dict(ddp_model, impl.get_model_state_dict(ddp_model))
        v.assertEqual(model.state_dict()["u1._extra_state"], "MyState")
        v.assertEqual(model.state_dict(), impl.get_model_state_dict(ddp_model))
    finally:
        del UnitModule.get_extra_state, UnitModule.set_extra_state
    return "ok"


def non_persistent_buffers(rank: int, world_size: int, api: str = "sdtree") -> str:
    """test_non_persistent_buffers: a non-persistent buffer stays out of get
    and is not asked for by set (under DDP)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    impl = _api(api)
    torch.manual_seed(0)
    model = _composite()
    model.register_buffer("dont_save_me", torch.rand(100), persistent=False)
    ddp_model = DDP(copy.deepcopy(model))
    impl.set_model_state_dict(ddp_model, impl.get_model_state_dict(ddp_model))
    _Checks().assertEqual(model.state_dict(), impl.get_model_state_dict(ddp_model))
    return "ok"


def _broadcast_wrapper(name: str) -> Callable[[nn.Module], nn.Module]:
    from torch.distributed.fsdp import ShardingStrategy, fully_shard

    if name == "fsdp2":
        return functools.partial(fully_shard, mesh=_mesh())
    if name == "fsdp1":
        return functools.partial(_fsdp1, device_mesh=_mesh())
    if name == "hsdp":
        world = dist.get_world_size()
        return functools.partial(
            _fsdp1, device_mesh=_mesh(2, world // 2), sharding_strategy=ShardingStrategy.HYBRID_SHARD
        )
    raise ValueError(name)


def broadcast_from_rank0(rank: int, world_size: int, wrappers: list[str], api: str = "sdtree") -> list[str]:
    """test_broadcast_from_rank0(_hsdp): a full state dict passed on rank 0
    only ({} elsewhere) loads a sharded model and optimizer on every rank;
    a missing key on rank 0 makes every rank raise "Missing key"."""
    impl = _api(api)
    v = _Checks()
    full = impl.StateDictOptions(full_state_dict=True)
    broadcast = impl.StateDictOptions(broadcast_from_rank0=True, full_state_dict=True)
    done = []
    for name in wrappers:
        torch.manual_seed(0)
        model = _composite()
        optim = torch.optim.Adam(model.parameters())
        fsdp_model = _broadcast_wrapper(name)(copy.deepcopy(model))
        fsdp_optim = torch.optim.Adam(fsdp_model.parameters())
        _train_once(model, optim)
        states, optim_states = impl.get_state_dict(model, optim)
        _train_once(fsdp_model, fsdp_optim)

        def check(equal: bool) -> None:
            fsdp_states = impl.get_model_state_dict(fsdp_model, options=full)
            fsdp_optim_states = impl.get_optimizer_state_dict(fsdp_model, fsdp_optim, options=full)
            if equal:
                v.assertEqual(states, fsdp_states)
                v.assertEqual(optim_states, fsdp_optim_states)
            else:
                v.assertNotEqual(states, fsdp_states)
                v.assertNotEqual(optim_states, fsdp_optim_states)

        check(equal=True)
        _train_once(fsdp_model, fsdp_optim)
        check(equal=False)
        if dist.get_rank() > 0:
            load_states: dict[str, Any] = {}
            load_states2: dict[str, Any] = {}
            load_optim_states: dict[str, Any] = {}
        else:
            load_states = copy.deepcopy(states)
            load_states2 = copy.deepcopy(states)
            load_optim_states = copy.deepcopy(optim_states)
        impl.set_model_state_dict(fsdp_model, model_state_dict=load_states, options=broadcast)
        impl.set_optimizer_state_dict(fsdp_model, fsdp_optim, optim_state_dict=load_optim_states, options=broadcast)
        check(equal=True)
        load_states = load_states2
        if load_states:
            load_states.pop(next(iter(load_states.keys())))
        with v.assertRaisesRegex(RuntimeError, "Missing key"):
            impl.set_model_state_dict(fsdp_model, model_state_dict=load_states, options=broadcast)
        done.append(name)
    return done


def fsdp_root_not_initialized(rank: int, world_size: int, api: str = "sdtree") -> str:
    """test_fsdp_root_not_initialized: get works on an FSDP1 model that has
    never run forward (FSDP's root is not initialised yet)."""
    impl = _api(api)
    torch.manual_seed(0)
    model = _composite()
    fsdp_model = _fsdp1(copy.deepcopy(model), device_mesh=_mesh())
    fsdp_optim = torch.optim.Adam(fsdp_model.parameters())
    msd = impl.get_model_state_dict(fsdp_model)
    osd = impl.get_optimizer_state_dict(fsdp_model, fsdp_optim)
    full = impl.get_model_state_dict(fsdp_model, options=impl.StateDictOptions(full_state_dict=True))
    v = _Checks()
    v.assertEqual(full, model.state_dict())
    v.assertEqual(set(osd["state"]), {n for n, p in model.named_parameters()})
    v.assertEqual(set(msd), set(model.state_dict()))
    return "ok"


def _two_linears(shard: Callable[[nn.Module], Any]) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4, bias=False) for _ in range(2)])
    for layer in model:
        shard(layer)
    shard(model)
    return model


def optim_state_dict_param_matching(rank: int, world_size: int, api: str = "sdtree") -> list[bool]:
    """test_optim_state_dict_param_matching: "initial_lr", which LambdaLR adds
    to the param groups, is saved, and loaded (broadcast from rank 0) into an
    optimizer that lacks it. Returns whether each rank's optimizer has it."""
    from torch.distributed.fsdp import fully_shard

    impl = _api(api)
    v = _Checks()
    model = _two_linears(fully_shard)
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda=[lambda epoch: 0.95**epoch])
    opt_state_dict = impl.get_optimizer_state_dict(
        model, optim, options=impl.StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if dist.get_rank() == 0:
        v.assertTrue("initial_lr" in opt_state_dict["param_groups"][0])
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    v.assertTrue("initial_lr" not in optim.param_groups[0])
    impl.set_optimizer_state_dict(
        model,
        optim,
        optim_state_dict=opt_state_dict,
        options=impl.StateDictOptions(broadcast_from_rank0=True, full_state_dict=True),
    )
    if dist.get_rank() == 0:
        v.assertTrue("initial_lr" in optim.param_groups[0])
    return ["initial_lr" in group for group in optim.param_groups]


def optim_state_dict_tensor_matching(rank: int, world_size: int, api: str = "sdtree") -> str:
    """test_optim_state_dict_tensor_matching: a full optimizer state dict
    loads into an FSDP2 model's optimizer as DTensors (its parameters' kind)."""
    from torch.distributed.fsdp import fully_shard

    impl = _api(api)
    v = _Checks()
    model = _two_linears(fully_shard)
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn((4, 4), generator=torch.Generator().manual_seed(1))).sum().backward()
    optim.step()
    optim.zero_grad()
    v.assertIsInstance(list(optim.state.values())[0]["exp_avg"], DTensor)
    full = impl.StateDictOptions(full_state_dict=True)
    opt_state_dict = impl.get_optimizer_state_dict(model, optim, options=full)
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    impl.set_optimizer_state_dict(model, optim, optim_state_dict=opt_state_dict, options=full)
    v.assertIsInstance(list(optim.state.values())[0]["exp_avg"], DTensor)
    v.assertEqual(impl.get_optimizer_state_dict(model, optim, options=full), opt_state_dict)
    return "ok"


def flattened_osd(rank: int, world_size: int, api: str = "sdtree") -> str:
    """test_flattened_osd: the flat and the nested optimizer state dicts of
    an FSDP2 model each load into a fresh optimizer to the same state."""
    from torch.distributed.fsdp import fully_shard

    impl = _api(api)
    v = _Checks()
    torch.manual_seed(0)
    fsdp_model = fully_shard(_composite(), mesh=_mesh())
    fsdp_optim = torch.optim.AdamW(fsdp_model.parameters())
    _train_once(fsdp_model, fsdp_optim)
    fsdp_optim.zero_grad()
    osd1 = impl.get_optimizer_state_dict(fsdp_model, fsdp_optim)
    osd2 = impl.get_optimizer_state_dict(
        fsdp_model, fsdp_optim, options=impl.StateDictOptions(flatten_optimizer_state_dict=True)
    )
    v.assertTrue(all(key.startswith(("state.", "param_groups.")) for key in osd2))
    fsdp_optim2 = torch.optim.AdamW(fsdp_model.parameters())
    impl.set_optimizer_state_dict(fsdp_model, optimizers=fsdp_optim2, optim_state_dict=osd2)
    v.assertEqual(fsdp_optim.state_dict(), fsdp_optim2.state_dict())
    impl.set_optimizer_state_dict(fsdp_model, optimizers=fsdp_optim2, optim_state_dict=osd1)
    v.assertEqual(fsdp_optim.state_dict(), fsdp_optim2.state_dict())
    return "ok"


def deprecate_partial(rank: int, world_size: int, api: str = "sdtree") -> str:
    """test_deprecate_partial: ``submodules=`` (with and without their
    prefixes) and a ``{submodule: state dict}`` input still work, with a
    FutureWarning each."""
    impl = _api(api)
    v = _Checks()
    torch.manual_seed(0)
    model = _composite()
    model_state_dict1 = copy.deepcopy(impl.get_model_state_dict(model))
    with v.assertWarnsRegex(FutureWarning, "Getting submodules only model/optim state_dict is deprecated"):
        model_state_dict2 = impl.get_model_state_dict(model, submodules={model.l})
    model_state_dict2 = copy.deepcopy(model_state_dict2)
    with v.assertWarnsRegex(FutureWarning, "Getting submodules only model/optim state_dict is deprecated"):
        model_state_dict3 = impl.get_model_state_dict(
            model, submodules={model.l}, options=impl.StateDictOptions(keep_submodule_prefixes=False)
        )
    model_state_dict3 = copy.deepcopy(model_state_dict3)
    v.assertEqual(len(model_state_dict2), 2)
    v.assertEqual(len(model_state_dict3), 2)
    for key in model_state_dict3.keys():
        full_fqn = f"l.{key}"
        v.assertEqual(model_state_dict1[full_fqn], model_state_dict2[full_fqn])
        v.assertEqual(model_state_dict2[full_fqn], model_state_dict3[key])
    zeros_state_dict = {k: torch.zeros_like(x) for k, x in model_state_dict1.items()}
    model.load_state_dict(zeros_state_dict)
    impl.set_model_state_dict(model, model_state_dict=model_state_dict2, options=impl.StateDictOptions(strict=False))
    v.assertEqual(model.l.weight, model_state_dict1["l.weight"])
    v.assertEqual(model.l.bias, model_state_dict1["l.bias"])
    model.load_state_dict(zeros_state_dict)
    with v.assertWarnsRegex(FutureWarning, "Passing model_state_dict as a "):
        impl.set_model_state_dict(
            model, model_state_dict={model.l: model_state_dict3}, options=impl.StateDictOptions(strict=False)
        )
    v.assertEqual(model.l.weight, model_state_dict1["l.weight"])
    v.assertEqual(model.l.bias, model_state_dict1["l.bias"])
    return "ok"


_FSDP_DEPRECATION = r"FSDP.state_dict_type\(\) and FSDP.set_state_dict_type\(\) are being deprecated"


def deprecate_fsdp_api(rank: int, world_size: int, api: str = "sdtree") -> str:
    """test_deprecate_fsdp_api: FSDP.state_dict_type() warns of its
    deprecation; get_model_state_dict does not pass that warning on, for a
    plain model (torch's check) nor for the FSDP1 model (it uses
    state_dict_type inside)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import StateDictType

    impl = _api(api)
    v = _Checks()
    torch.manual_seed(0)
    model = _composite()
    fsdp_model = _fsdp1(copy.deepcopy(model), device_mesh=_mesh())
    with v.assertWarnsRegex(FutureWarning, _FSDP_DEPRECATION):
        with FSDP.state_dict_type(fsdp_model, StateDictType.FULL_STATE_DICT):
            fsdp_model.state_dict()
    for target in (model, fsdp_model):
        with v.assertRaisesRegex(AssertionError, "FutureWarning not triggered"):
            with v.assertWarnsRegex(FutureWarning, _FSDP_DEPRECATION):
                impl.get_model_state_dict(target)
    return "ok"


def no_dist(rank: int, world_size: int, api: str = "sdtree") -> str:
    """test_no_dist: without a process group, full_state_dict and cpu_offload
    give the plain state dicts on CPU, and both load back (the optimizer one
    also as ``optim.state_dict()`` gives it, keyed by ids)."""
    impl = _api(api)
    v = _Checks()
    torch.manual_seed(0)
    model = _composite()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    v.assertFalse(dist.is_initialized())
    options = impl.StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = impl.get_model_state_dict(model, options=options)
    for value in msd.values():
        v.assertFalse(value.is_cuda)
    v.assertEqual(model.state_dict(), msd)
    impl.set_model_state_dict(model, model.state_dict())
    osd = impl.get_optimizer_state_dict(model, optim, options=options)
    impl.set_optimizer_state_dict(model, optim, osd)
    impl.set_optimizer_state_dict(model, optim, optim.state_dict())
    return "ok"
