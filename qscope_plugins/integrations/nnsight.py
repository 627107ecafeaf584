"""nnsight: ship :mod:`qscope_plugins.remote` with remote requests, and check requests before they go.

An NDIF server imports only what it has installed, so ``qscope_plugins.remote`` (torch-only) is
registered with ``nnsight.register`` and its source travels with each request. Every remote path
(``remote=True``, ``remote="local"``, a custom ``RemoteBackend``) serializes through
``RequestModel.serialize``; :func:`register` wraps it so that, before anything is sent, the
module is registered and :func:`check_request` refuses a block that would carry a full SAE
(about 2 GiB per W128K layer, on every request), an object NDIF cannot import, or a steering
or encoder-row spec that does not fit the model.

The check walks what nnsight really serializes: each name the block reads and the tracer (which
carries the trace's inputs) are pickled, in a dry run, by nnsight's own pickler into a sink that
only counts bytes. Every object that pickler reaches (closure cells and globals of functions shipped
by source, the instance of a bound method, a ``functools.partial``'s arguments, attributes, container
items) passes through one hook, so an SAE or a module's weights are refused wherever they sit, and
the request is refused once its serialized size passes :data:`MAX_REQUEST_BYTES`, before any large
buffer is built. Objects nnsight sends by reference (the model's own modules) are not walked.
"""

from __future__ import annotations

import functools
import types
from dataclasses import fields, is_dataclass
from typing import Any

import cloudpickle
import nnsight
import numpy as np
import torch
from nnsight.intervention.serialization import DEFAULT_PROTOCOL, CustomCloudPickler, reduce_block
from nnsight.schema.request import RequestModel

from .. import remote
from ._patch import Changes

#: Captured tensors above this total refuse to travel: the smallest Qwen-Scope encoder is 256 MiB.
MAX_CAPTURED_BYTES = 128 * 2**20
#: The serialized request itself (source, captured values, trace inputs) may not exceed this.
MAX_REQUEST_BYTES = 128 * 2**20

_UNSHIPPABLE = ("sae_lens", "transformer_lens", "qscope_plugins")
_GUARD_FLAG = "_qscope_request_check"
_CHANGES = Changes()

_WHAT_TO_DO = (
    "Build what the trace needs before it starts: qscope_plugins.nnsight_api.steering(model, layer, "
    "sae=sae, features={...}) ships one d_model vector; nnsight_api.encoder_rows(model, layer, sae, "
    "features) ships only those encoder rows; for Top-k codes save remote.residual(model, layer) in "
    "the trace and call sae.encode_sparse on it afterwards"
)


class RemoteRequestError(ValueError):
    """A remote trace would send something it must not; raised before anything is sent."""


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _origin(value: Any) -> str:
    if isinstance(value, types.ModuleType):
        return value.__name__
    if isinstance(value, (types.FunctionType, type)):
        return value.__module__ or ""
    return type(value).__module__ or ""


def _unshippable(value: Any) -> bool:
    origin = _origin(value)
    return origin.split(".")[0] in _UNSHIPPABLE and origin != remote.__name__


def _is_sae(module: torch.nn.Module) -> bool:
    return hasattr(module, "W_enc") and hasattr(module, "W_dec")


def _refuse(where: str, value: Any, held: bool) -> None:
    """Raise :class:`RemoteRequestError` if ``value`` is a module (an SAE above all) or comes from a
    package NDIF cannot import. ``where`` names it; ``held``: reached inside what the block names."""
    if isinstance(value, torch.nn.Module):
        size = _size(sum(t.untyped_storage().nbytes() for t in value.state_dict().values()))
        kind = type(value).__name__
        if _is_sae(value) and held:
            problem = (f"which holds a full SAE ({kind}, {size}) inside it (through a closure, a bound method, a "
                       "partial, an attribute, a container or a global a function reads); it would travel")
        elif _is_sae(value):
            problem = f"a full SAE ({size}), which would travel"
        else:
            weights = f"which holds a {kind} module ({size} of weights) that" if held else (
                f"a {kind} module ({size} of weights that")
            raise RemoteRequestError(
                f"this remote trace captures {where}, {weights} would travel with the request"
                f"{'' if held else ')'}; reach the model's modules through the nnsight model inside the trace, "
                "and pass other weights as the small tensors needed"
            )
        raise RemoteRequestError(
            f"this remote trace captures {where}, {problem} with every request and cannot be imported on NDIF. "
            f"{_WHAT_TO_DO}"
        )
    if _unshippable(value):
        what = (
            f"module {value.__name__}" if isinstance(value, types.ModuleType)
            else f"{getattr(value, '__qualname__', type(value).__qualname__)} from {_origin(value)}"
        )
        subject = f"{where}, which reaches {what} that" if held else f"{where} ({what}), which"
        raise RemoteRequestError(
            f"this remote trace captures {subject} the NDIF server cannot import: inside a remote "
            f"trace use only qscope_plugins.remote and plain tensors. {_WHAT_TO_DO}"
        )


class _Checker:
    """Walks the values a block captures; collects tensor bytes and raises on the first problem."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.bytes = 0
        self.seen: set[int] = set()
        self._layout: remote.Layout | None = None

    def layout(self) -> remote.Layout:
        if self._layout is None:
            self._layout = remote.layout(self.model)
        return self._layout

    def visit(self, name: str, value: Any) -> None:
        if id(value) in self.seen:
            return
        self.seen.add(id(value))
        if isinstance(value, torch.Tensor):
            self.bytes += value.untyped_storage().nbytes()
            return
        _refuse(f"`{name}`", value, held=False)
        if isinstance(value, (remote.Steering, remote.EncoderRows)):
            self.check_spec(name, value)
            self.visit_fields(name, value)
        elif isinstance(value, dict):
            for key, item in value.items():
                self.visit(f"{name}[{key!r}]", item)
        elif isinstance(value, (list, tuple, set, frozenset)):
            for i, item in enumerate(value):
                self.visit(f"{name}[{i}]", item)
        elif is_dataclass(value) and not isinstance(value, type):
            self.visit_fields(name, value)

    def check_spec(self, name: str, spec: remote.Steering | remote.EncoderRows) -> None:
        if getattr(spec, "fn", None) is not None:
            raise RemoteRequestError(
                f"this remote trace captures `{name}`, a Steering with a Python function (`fn`): function "
                "edits such as SAE clamping need the whole SAE next to the model, so they run in local "
                "traces only; steer remotely with a vector (nnsight_api.steering(..., features=...))"
            )
        if self.model is None:
            return
        where = self.layout()
        where.check_layer(spec.layer)
        where.check_vector(spec.weight if isinstance(spec, remote.EncoderRows) else spec.vector, f"`{name}`")

    def visit_fields(self, name: str, value: Any) -> None:
        for field in fields(value):
            self.visit(f"{name}.{field.name}", getattr(value, field.name))


_ATOMS = (str, int, float, bool, type(None), complex)


class _Walk:
    """State of one dry run: bytes serialized so far, tensor bytes seen, the name being pickled."""

    def __init__(self, checker: _Checker) -> None:
        self.checker = checker
        self.name = ""
        self.written = 0
        self.storages: set[tuple[int, int]] = set()

    def where(self) -> str:
        return f"`{self.name}`" if not self.name.startswith("<") else self.name

    def inspect(self, obj: Any) -> None:
        if isinstance(obj, _ATOMS):
            return
        name = self.where()
        if isinstance(obj, types.MethodType):
            self.inspect(obj.__self__)
        _refuse(name, obj, held=True)
        if isinstance(obj, torch.nn.Parameter):
            raise RemoteRequestError(
                f"this remote trace captures {name}, which holds a module parameter of shape {tuple(obj.shape)} "
                "(module or SAE weights); pass the small tensor the trace needs instead "
                f"(e.g. a slice, .detach().clone()). {_WHAT_TO_DO}"
            )
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            self._tensor_bytes((storage.data_ptr(), storage.nbytes()), storage.nbytes())
        elif isinstance(obj, np.ndarray):
            self._tensor_bytes((id(obj), obj.nbytes), obj.nbytes)
        elif isinstance(obj, (remote.Steering, remote.EncoderRows)):
            self.checker.check_spec(self.name, obj)

    def _tensor_bytes(self, key: tuple[int, int], nbytes: int) -> None:
        if key in self.storages:
            return
        self.storages.add(key)
        self.checker.bytes += nbytes
        if self.checker.bytes > MAX_CAPTURED_BYTES:
            raise RemoteRequestError(
                f"this remote trace captures {_size(self.checker.bytes)} of tensors (limit "
                f"{_size(MAX_CAPTURED_BYTES)}; the last one reached through {self.where()}), which would travel "
                f"with every request; a full SAE weight matrix is this large. {_WHAT_TO_DO}"
            )

    def write(self, data: Any) -> int:
        n = memoryview(data).nbytes
        self.written += n
        if self.written > MAX_REQUEST_BYTES:
            raise RemoteRequestError(
                f"this remote request would be larger than {_size(MAX_REQUEST_BYTES)} once serialized (passed "
                f"while serializing {self.where()}); send less with each request: keep large inputs and data "
                f"on the server side or split the work. {_WHAT_TO_DO}"
            )
        return n


class _DryRunPickler(CustomCloudPickler):
    """nnsight's pickler, with every object it is about to serialize shown to the walk first."""

    def __init__(self, walk: _Walk) -> None:
        super().__init__(walk, protocol=DEFAULT_PROTOCOL)
        self._walk = walk

    def persistent_id(self, obj: Any) -> Any:
        pid = super().persistent_id(obj)
        if pid is None:
            self._walk.inspect(obj)
        return pid


def _dry_run(checker: _Checker, named: dict[str, Any], tracer: Any) -> int:
    """Serialize like ``RequestModel.serialize`` into a counting sink; raise on the first problem."""
    walk = _Walk(checker)
    for name in sorted(named):
        walk.name = name
        _DryRunPickler(walk).dump(named[name])
    walk.name = "<the tracer and the trace's inputs>"
    _DryRunPickler(walk).dump(tracer)
    return walk.written


def check_request(tracer: Any) -> None:
    """Raise :class:`RemoteRequestError` (or a layout/range error) if ``tracer``'s block must not be sent.

    Looks at exactly what nnsight would ship: the names the block reads, reduced the way
    ``RequestModel.serialize`` reduces them.
    """
    if tracer.node is None or tracer.info is None:
        return
    frame = tracer.info.frame
    _, used_globals, used_locals = reduce_block(tracer.node, frame.f_globals, dict(frame.f_locals))
    named = {**used_globals, **used_locals}
    checker = _Checker(getattr(tracer, "envoy", None))
    for name, value in named.items():
        checker.visit(name, value)
    if checker.bytes > MAX_CAPTURED_BYTES:
        raise RemoteRequestError(
            f"this remote trace captures {_size(checker.bytes)} of tensors (limit {_size(MAX_CAPTURED_BYTES)}), "
            f"which would travel with every request; a full SAE weight matrix is this large. {_WHAT_TO_DO}"
        )
    checker.bytes = 0  # the dry run counts every tensor it reaches, the direct ones again
    _dry_run(checker, named, tracer)


def _register_remote_module() -> bool:
    """``nnsight.register(remote)`` unless it is registered; True if this call registered it."""
    if remote.__name__ in cloudpickle.list_registry_pickle_by_value():
        return False
    nnsight.register(remote)
    return True


def _checked(serialize: Any) -> Any:
    @functools.wraps(serialize)
    def checked_serialize(cls: type, tracer: Any, compress: bool = False) -> bytes:
        _register_remote_module()
        check_request(tracer)
        data = serialize(cls, tracer, compress)
        if len(data) > MAX_REQUEST_BYTES:
            raise RemoteRequestError(
                f"this remote request is {_size(len(data))} once serialized (limit {_size(MAX_REQUEST_BYTES)}); "
                f"send less with each request. {_WHAT_TO_DO}"
            )
        return data

    setattr(checked_serialize, _GUARD_FLAG, True)
    return classmethod(checked_serialize)


def register() -> list[str]:
    """Register ``qscope_plugins.remote`` for remote traces and install the request check; idempotent.

    ``nnsight.register`` is nnsight's own way to ship a module by value. nnsight has no hook before
    a request is sent, so ``RequestModel.serialize`` (every remote path goes through it) is wrapped.
    """
    done = []
    if _register_remote_module():
        _CHANGES.record(f"nnsight.register({remote.__name__})",
                        functools.partial(cloudpickle.unregister_pickle_by_value, remote))
        done.append(f"nnsight.register({remote.__name__})")
    serialize = RequestModel.serialize.__func__
    if not getattr(serialize, _GUARD_FLAG, False):
        _CHANGES.patch(RequestModel, "serialize", _checked(serialize))
        done.append("check of remote requests before sending (no full SAEs, layers in range)")
    return done


def patched() -> list[str]:
    """The nnsight names replaced now."""
    return _CHANGES.labels("patched")


def unregister() -> list[str]:
    """Restore ``RequestModel.serialize``; unregister ``qscope_plugins.remote`` if :func:`register` registered it."""
    return _CHANGES.undo()
