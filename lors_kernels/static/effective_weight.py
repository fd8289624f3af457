"""What ``LorsLinear.weight`` returns: the effective weight, whose in-place writes reach the layer.

The layer is reached through what every LorsLinear has: ``effective_weight()``, ``shared`` (its
SharedWeight) and ``shared.weight``.
"""

from __future__ import annotations

import copy
import weakref
from typing import TYPE_CHECKING, Any, NoReturn

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map

if TYPE_CHECKING:
    from .module import LorsLinear

# Functions by name (an aten overload by its schema's: copy_.default is aten::copy_). In place (a
# trailing "_") a function writes its first argument, or each tensor of it (the _foreach_ ops), but for
# these, which write no value: flags, metadata of the tensor object itself, where memory lives.
_NOT_WRITES = {
    "requires_grad_",
    "share_memory_",
    "detach_",
    "t_",
    "transpose_",
    "swapdims_",
    "swapaxes_",
    "squeeze_",
    "unsqueeze_",
    "as_strided_",
}
# Dunders that write (+=, -=, *=, /=, //=, %=, **= arrive as add_, sub_, mul_, div_, floor_divide_, remainder_, pow_).
_WRITING_DUNDERS = {"__setitem__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__"}
_REPOINTS = {"set_", "resize_", "resize_as_"}  # point a tensor at other memory, where no write can be followed
_TO_NUMPY = {"numpy", "__array__"}  # hand the memory to numpy, where no write can be seen
_SET_DATA = Tensor.data.__set__  # weight.data = new (a method-wrapper equals its re-reads)


def _name(func) -> str:
    schema = getattr(func, "_schema", None)
    return schema.name.rpartition("::")[2] if schema is not None else getattr(func, "__name__", "")


def _writes(name: str) -> bool:
    return name in _WRITING_DUNDERS or (name.endswith("_") and not name.startswith("__") and name not in _NOT_WRITES)


def _functorch_wrapped(t: Tensor) -> bool:
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


def _repoint_error(name: str) -> RuntimeError:
    return RuntimeError(
        f"LorsLinear.weight: {name} would point it at other memory, where the layer cannot see "
        "writes. Write the values instead: weight.data.copy_(t), or weight.data = t"
    )


def _geometry(t: Tensor) -> tuple:
    return t.shape, t.stride(), t.storage_offset()


def _in_root(address: int, root: Tensor) -> bool:
    start = root.data_ptr()  # root is a fresh contiguous tensor: its memory is [start, start + nbytes)
    return start != 0 and start <= address < start + root.nbytes


def _aliases(t, root: Tensor) -> bool:
    """Whether ``t`` is ``root``'s memory (root itself, ``.data``, a view). Only plain tensors are asked:
    torch.func's wrappers hold no storage of their own."""
    return type(t) is Tensor and not _functorch_wrapped(t) and _in_root(t.data_ptr(), root) and t.device == root.device


@torch.no_grad()
def _add_change(layer, after: Tensor, before: Tensor) -> None:
    """Change the layer's dense weight by what a write changed, ``after - before``, through its (unshared)
    shared weight. The difference is taken in float32 at least, and is exactly zero where the write
    changed nothing: no other element moves, even in 16-bit."""
    compute = torch.promote_types(after.dtype, torch.float32)
    change = after.to(compute) - before.to(compute)
    layer.shared.weight.add_(change.masked_fill_(after == before, 0))  # inf == inf: no nan from inf - inf


@torch.no_grad()
def _assign(layer, new: Tensor) -> None:
    """Make the layer apply ``new`` as its dense weight (``weight.data = new``)."""
    layer.shared._check_sole_user("writing LorsLinear.weight")
    w = layer.shared.weight
    if new.shape != w.shape:
        raise ValueError(f"LorsLinear.weight is {list(w.shape)}, got a {list(new.shape)} tensor")
    if (new.dtype, new.device) != (w.dtype, w.device):  # nn.Linear's weight would take them: ours cannot
        raise ValueError(
            f"LorsLinear.weight is {w.dtype} on {w.device}, got a {new.dtype} tensor on "
            f"{new.device}: convert the tensor, or the whole layer with layer.to(...)"
        )
    _add_change(layer, new, layer.effective_weight())


def written_back(value: object, layer: LorsLinear) -> bool:
    """Whether ``value`` is a weight of ``layer`` that an in-place operator wrote through, which Python
    then assigns back (``layer.weight += d``): the write reached the layer already."""
    return isinstance(value, EffectiveWeight) and value._lors_written and value._lors_layer() is layer


class EffectiveWeight(Tensor):
    """The effective weight, freshly computed, whose in-place writes (through it, its ``.data`` or any
    view of it) are passed on to the layer. A plain computed tensor would take such writes and drop
    them: PEFT's merge and weight-tying tools would do nothing.

    Writes that bypass torch's operators cannot be seen: ``numpy()`` arrays of it are read-only, and
    ``set_`` raises; memory reached through ``untyped_storage()``, DLPack or pointers is not followed,
    nor is ``torch.Tensor.set_(weight, t)`` called on the base class. Functions that neither write it nor
    return a view of it run as on a plain tensor."""

    @classmethod
    def of(cls, layer: LorsLinear) -> Tensor:
        """``layer.effective_weight()``, as an EffectiveWeight where its writes can be followed (see
        LorsLinear.weight for where they cannot)."""
        w = layer.effective_weight()
        if type(w) is not Tensor or torch.compiler.is_compiling() or _functorch_wrapped(w):
            return w
        return cls._wrap(w, weakref.ref(layer), w)

    @classmethod
    def _wrap(cls, t: Tensor, layer: weakref.ref, root: Tensor) -> EffectiveWeight:
        out = t.as_subclass(cls)
        # The layer by weak reference: a weight kept after its layer was dropped must not count as a user.
        out._lors_layer, out._lors_root, out._lors_written = layer, root, False
        return out

    def _layer(self):
        layer = self._lors_layer()
        if layer is None:
            raise RuntimeError("LorsLinear.weight: the layer it was read from no longer exists; nothing to write to")
        return layer

    def _plain(self) -> Tensor:
        with torch._C.DisableTorchFunctionSubclass():
            return self.as_subclass(Tensor)

    def __reduce_ex__(self, protocol):  # pickled (torch.save) as the plain tensor, without its layer
        return self._plain().__reduce_ex__(protocol)

    def __deepcopy__(self, memo):
        return copy.deepcopy(self._plain(), memo)

    def set_(self, *args: Any, **kwargs: Any) -> NoReturn:  # set_ never reaches __torch_function__
        raise _repoint_error("set_")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _name(func)
        with torch._C.DisableTorchFunctionSubclass():
            if func == _SET_DATA:
                return cls._set_data(*args)
            if name in _REPOINTS:
                raise _repoint_error(getattr(func, "__name__", str(func)))
            if _writes(name) or "out" in kwargs:
                out = cls._write(func, name, args, kwargs)
            else:
                out = func(*args, **kwargs)
            if name in _TO_NUMPY:
                if _in_root(out.__array_interface__["data"][0], args[0]._lors_root):  # writes to it would be lost
                    out.flags.writeable = False
                return out
        # Results sharing a weight's memory (.data, views) stay EffectiveWeight: writes to them count.
        if type(out) is Tensor:
            return cls._keep_view(out, args, kwargs)
        if isinstance(out, (tuple, list)) and not isinstance(out, torch.Size):  # unbind, split, ...
            return tree_map(lambda r: cls._keep_view(r, args, kwargs) if type(r) is Tensor else r, out)
        return out  # attributes (dtype, shape, ...), numbers, the weight itself

    @classmethod
    def _keep_view(cls, result: Tensor, args, kwargs) -> Tensor:
        for arg in (*args, *kwargs.values()):
            for t in arg if isinstance(arg, (tuple, list)) else (arg,):
                if isinstance(t, cls) and _aliases(result, t._lors_root):
                    return cls._wrap(result, t._lors_layer, t._lors_root)
        return result

    @staticmethod
    def _set_data(target: EffectiveWeight, value) -> None:
        """``target.data = value``: the layer applies ``value`` from now on."""
        root = target._lors_root
        if _geometry(target) != _geometry(root):
            raise RuntimeError("LorsLinear.weight: assign .data of the whole weight, not of a view of it")
        # `weight.data += d` assigns back the very data it wrote (the write reached the layer already)
        if not (
            isinstance(value, EffectiveWeight) and value._lors_root is root and _geometry(value) == _geometry(root)
        ):
            _assign(target._layer(), value)

    @classmethod
    def _write(cls, func, name, args, kwargs):
        """Run ``func``, which writes (in place or through ``out=``), and pass each EffectiveWeight's change
        on to its layer. Runs with torch functions disabled."""
        first = (args[:1] or list(kwargs.values())[:1]) if _writes(name) else ()  # nn.init passes it by keyword
        targets = tree_flatten((first, kwargs.get("out")))[0]
        written = list({id(t._lors_root): t for t in targets if isinstance(t, cls)}.values())  # each root once
        layers = [t._layer() for t in written]
        for layer in layers:  # raise before anything is written
            layer.shared._check_sole_user("writing LorsLinear.weight")
        before = [t._lors_root.detach().clone() for t in written]
        out = func(*args, **kwargs)
        for t, layer, old in zip(written, layers, before):
            _add_change(layer, t._lors_root, old)
        if any(out is t for t in written):  # `layer.weight += d` then assigns it back: see written_back
            out._lors_written = True
        return out
