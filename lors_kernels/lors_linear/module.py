"""Static LORS modules: a shared weight, the layers that use it, and stacks of them."""

from __future__ import annotations

import copy
import gc
import math
import warnings
import weakref
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from .op import lors_linear

INITS = ("default", "xavier")

# Per SharedWeight, outside the module so that pickling and deepcopy never see them:
_SAVED = weakref.WeakKeyDictionary()    # -> {id(state dict): (key, weakref to the tensor saved there)}
_LOADING = weakref.WeakKeyDictionary()  # -> [missing_keys of the load in progress, loaded?, keys missing so far]
_USERS = weakref.WeakKeyDictionary()    # -> WeakSet of the LorsLinear layers using it
_SAVED_KEPT = 8  # state dicts remembered per SharedWeight, the latest: more than are ever filled at once

# FSDP1 (FullyShardedDataParallel) saves a wrapped module's state under this prefix (torch's
# FSDP_WRAPPED_MODULE) and then asserts that every name of every parameter is there.
_FSDP1_PREFIX = "_fsdp_wrapped_module."


def _users(shared: "SharedWeight") -> "weakref.WeakSet":
    return _USERS.setdefault(shared, weakref.WeakSet())


class SharedWeight(nn.Module):
    """The weight ``[out, in]`` shared by every layer of a LORS stack.

    init="default" is nn.Linear's (Kaiming-uniform, a = sqrt(5)); "xavier" is xavier_uniform_, what the
    official LORS ViT gives its FFN's shared weights.

    In a state dict the weight appears once, under the first name the traversal reaches; the other
    layers' names are left out, and loading fills the one tensor from whichever name holds it. So a
    checkpoint has no aliased tensors (safetensors and ``save_pretrained`` refuse them). A consequence:
    the entries of one layer taken out of a stack's state dict (keys starting with ``blocks.3.``) lack
    the shared weight unless that layer comes first; ``blocks[3].state_dict()`` has it. Under FSDP1
    (FullyShardedDataParallel), which requires every name, the weight is saved under each layer's name
    as a tied weight is; such a checkpoint loads anywhere.
    """

    init = "default"  # for modules pickled before init existed

    def __init__(self, in_features: int, out_features: int, init: str = "default", device=None, dtype=None):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"SharedWeight: init must be one of {INITS}, got {init!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.init = init
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.reset_parameters()

    @property
    def n_layers(self) -> int:
        """The LorsLinear layers using this weight now (copies and unpickled ones included, dropped ones
        not): writes through one layer need it to be the only one."""
        return len(_USERS.get(self, ()))

    def reset_parameters(self) -> None:
        if self.init == "xavier":
            nn.init.xavier_uniform_(self.weight)
        else:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if _FSDP1_PREFIX in prefix:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        # Per state dict: one taken while another is being filled (by a hook) keeps its own record.
        saved = _SAVED.setdefault(self, {})
        key, ref = saved.get(id(destination), (None, None))
        if ref is not None and ref() is not None and destination.get(key) is ref():
            return  # this state_dict already holds it under an earlier layer's name
        super()._save_to_state_dict(destination, prefix, keep_vars)
        saved.pop(id(destination), None)
        saved[id(destination)] = (prefix + "weight", weakref.ref(destination[prefix + "weight"]))
        # Only state dicts being filled matter, a few at most. The rest go (with keep_vars the tensor
        # saved is the parameter itself and stays alive, so a dead reference cannot tell them apart).
        while len(saved) > _SAVED_KEPT:
            del saved[next(iter(saved))]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # One load_state_dict call passes one missing_keys list to every module: it identifies the call.
        load = _LOADING.get(self)
        if load is None or load[0] is not missing_keys:
            load = _LOADING[self] = [missing_keys, False, []]
        key = prefix + "weight"
        if key in state_dict:  # names visited before this one are not missing: the tensor is one
            load[1] = True
            for name in load[2]:
                missing_keys.remove(name)
            load[2].clear()
        elif key in missing_keys:
            if load[1]:
                missing_keys.remove(key)
            else:
                load[2].append(key)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class LorsLinear(nn.Module):
    """``y = x W_shared^T + scaling * (dropout(x) down^T) up^T + bias``: a drop-in for ``nn.Linear``.

    ``groups`` private pairs of rank ``rank`` are stored as one concatenated pair of rank
    ``rank * groups`` (sum_g up_g down_g = [up_1 ... up_G] [down_1; ...; down_G]).
    Pass ``shared`` to tie the base weight to other layers; by default the layer owns one, initialized
    as ``init`` says (see SharedWeight). ``dropout`` drops inputs of the low-rank path only, in training
    (PEFT's lora_dropout); the fused op runs whenever it is inactive.
    """

    # Defaults for modules pickled before these attributes existed.
    merged = False
    dropout = 0.0

    def __init__(self, in_features: int, out_features: int, rank: int = 8, groups: int = 1, bias: bool = True,
                 shared: Optional[SharedWeight] = None, scaling: float = 1.0, dropout: float = 0.0,
                 init: str = "default", device=None, dtype=None):
        super().__init__()
        if rank < 0 or groups < 0:
            raise ValueError(f"LorsLinear: rank and groups must be >= 0, got rank={rank}, groups={groups}")
        if not 0 <= dropout < 1:
            raise ValueError(f"LorsLinear: dropout must be in [0, 1), got {dropout}")
        if shared is None:
            shared = SharedWeight(in_features, out_features, init=init, device=device, dtype=dtype)
        elif (shared.in_features, shared.out_features) != (in_features, out_features):
            raise ValueError(f"LorsLinear({in_features}, {out_features}): shared weight is "
                             f"[{shared.out_features}, {shared.in_features}]")
        factory = {"device": shared.weight.device if device is None else device,
                   "dtype": shared.weight.dtype if dtype is None else dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.groups = groups
        self.scaling = float(scaling)
        self.dropout = float(dropout)
        self.merged = False
        self.shared = shared
        self.down = nn.Parameter(torch.empty(rank * groups, in_features, **factory))
        self.up = nn.Parameter(torch.empty(out_features, rank * groups, **factory))
        self.register_parameter("bias", nn.Parameter(torch.empty(out_features, **factory)) if bias else None)
        self.reset_private_parameters()

    def __setattr__(self, name, value):
        if name == "weight":
            if isinstance(value, EffectiveWeight) and value._lors_written and value._lors_layer() is self:
                return  # `layer.weight += d`: Python assigns back the tensor whose write reached the layer
            raise AttributeError(
                "LorsLinear.weight is computed (shared.weight + scaling * up @ down), so it cannot be replaced or "
                "tied to another tensor. Write its values in place (layer.weight.data.copy_(w) updates the layer "
                "when its shared weight is its own), or set shared.weight, down and up.")
        if name == "shared":  # keep each SharedWeight's set of users
            old = self._modules.get("shared")
            if old is not value:
                if isinstance(old, SharedWeight):
                    _users(old).discard(self)
                if isinstance(value, SharedWeight):
                    _users(value).add(self)
        super().__setattr__(name, value)

    def __delattr__(self, name):
        if name == "shared" and isinstance(self._modules.get("shared"), SharedWeight):
            _users(self._modules["shared"]).discard(self)
        super().__delattr__(name)

    def __setstate__(self, state):
        super().__setstate__(state)
        shared = self._modules.get("shared")
        if isinstance(shared, SharedWeight):  # unpickled, copied or deep-copied: one more layer uses it
            _users(shared).add(self)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        _refuse_merged(self, prefix, keep_vars)  # here, not a hook: modules pickled without hooks check too
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.merged:  # a checkpoint holds an unmerged layer (state_dict refuses merged ones)
            self.unmerge()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def reset_private_parameters(self) -> None:
        """The official init: down kaiming_uniform_ (a = 0, bound sqrt(6 / in)), up and bias zero (the
        shared weight is left alone)."""
        if self.down.numel():  # rank 0 is a plain shared layer
            nn.init.kaiming_uniform_(self.down)
        nn.init.zeros_(self.up)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return F.linear(x, self.shared.weight, self.bias)
        if self.dropout and self.training:  # the two paths see different inputs: no single fused GEMM
            low = F.linear(F.linear(F.dropout(x, self.dropout, True), self.down), self.up)
            return torch.add(F.linear(x, self.shared.weight, self.bias), low, alpha=self.scaling)
        return lors_linear(x, self.shared.weight, self.down, self.up, self.bias, scaling=self.scaling)

    def get_delta_weight(self) -> Tensor:
        """``scaling * up @ down``: what the private pair adds to the shared weight (PEFT's name)."""
        return torch.mm(self.up, self.down) * self.scaling

    def effective_weight(self) -> Tensor:
        """The dense weight this layer applies: ``W_shared + scaling * up @ down`` (differentiable)."""
        if self.merged:  # the pair is in the shared weight already
            return self.shared.weight.clone()
        return torch.addmm(self.shared.weight, self.up, self.down, alpha=self.scaling)

    @property
    def weight(self) -> Tensor:
        """The effective dense weight, so code written for nn.Linear keeps working. Writing its values in
        place (``weight.data += d``, ``weight.data = w``, ``nn.init.*_(weight)``, as PEFT's merge and
        weight-tying tools do) sets the shared weight so that the layer applies the new values; that
        needs the shared weight to be this layer's alone, and raises otherwise. A write changes the
        elements it writes by what it changed in the tensor, and no other element (also through a
        ``.weight`` read before the layer changed). ``set_`` and writes to ``numpy()`` arrays raise.

        A plain tensor, only read, where the writes cannot be followed: in a compiled graph, under FSDP2
        (a DTensor) and inside torch.func transforms."""
        w = self.effective_weight()
        if type(w) is not Tensor or torch.compiler.is_compiling() or _functorch_wrapped(w):
            return w
        return EffectiveWeight.wrap(w, weakref.ref(self), w)

    def _check_sole_user(self, what: str) -> None:
        users = self.shared.n_layers
        if users > 1:  # a dropped layer caught in a reference cycle counts until the collector frees it
            gc.collect()
            users = self.shared.n_layers
        if users > 1:
            raise RuntimeError(
                f"LorsLinear: {what} would change the shared weight of {users} layers, not only this "
                "one. A rank-limited private pair cannot hold an arbitrary change: convert this layer with "
                "to_linear() first, or change shared.weight (every layer) or down/up (this layer) explicitly.")

    def _write_effective_weight(self, new: Tensor) -> None:
        """Make this layer apply ``new`` as its dense weight (``weight.data = new``)."""
        self._check_sole_user("writing LorsLinear.weight")
        w = self.shared.weight
        if new.shape != w.shape:
            raise ValueError(f"LorsLinear.weight is [{self.out_features}, {self.in_features}], got a "
                             f"{list(new.shape)} tensor")
        if (new.dtype, new.device) != (w.dtype, w.device):  # nn.Linear's weight would take them: ours cannot
            raise ValueError(f"LorsLinear.weight is {w.dtype} on {w.device}, got a {new.dtype} tensor on "
                             f"{new.device}: convert the tensor, or the whole layer with layer.to(...)")
        with torch.no_grad():
            self._apply_write(new, self.effective_weight())

    def _apply_write(self, after: Tensor, before: Tensor) -> None:
        """Change this layer's dense weight by what a write changed, ``after - before``, through its
        (unshared) shared weight. The difference is taken in float32 at least, and is exactly zero where
        the write changed nothing: no other element moves, even in 16-bit."""
        with torch.no_grad():
            compute = torch.promote_types(after.dtype, torch.float32)
            change = after.to(compute) - before.to(compute)
            self.shared.weight.add_(change.masked_fill_(after == before, 0))  # inf == inf: no nan from inf - inf

    def merge(self) -> None:
        """Add ``scaling * up @ down`` into the shared weight and run as a dense layer (PEFT's merge).
        Needs the shared weight to be this layer's alone. ``unmerge()`` takes it out again."""
        if self.merged:
            warnings.warn("LorsLinear: already merged, nothing to do")
            return
        self._check_sole_user("merge()")
        with torch.no_grad():
            self.shared.weight.add_(self.get_delta_weight())
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("LorsLinear: already unmerged, nothing to do")
            return
        with torch.no_grad():
            self.shared.weight.sub_(self.get_delta_weight())
        self.merged = False

    def to_linear(self) -> nn.Linear:
        """A dense ``nn.Linear`` computing what this layer computes (dropout aside)."""
        w = self.shared.weight
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device,
                           dtype=w.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.effective_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    @classmethod
    def from_linear(cls, linear: nn.Linear, shared: Optional[SharedWeight] = None, rank: int = 8, groups: int = 1,
                    scaling: float = 1.0) -> "LorsLinear":
        """A LorsLinear computing what ``linear`` computes.

        Without ``shared`` the layer takes a copy of the linear's weight as its own shared weight and
        the private pair starts at the paper's init (up = 0), so the function is kept exactly. With a
        ``shared`` weight, the private pair is the best rank ``rank * groups`` approximation of
        ``linear.weight - shared.weight`` (truncated SVD): exact when the residual's rank fits.
        """
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, rank=rank, groups=groups, bias=linear.bias is not None,
                    shared=shared, scaling=scaling, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            if shared is None:
                layer.shared.weight.copy_(w)
            elif rank * groups > 0:
                residual = (w - shared.weight).double()
                u, s, vh = torch.linalg.svd(residual, full_matrices=False)
                keep = min(rank * groups, s.numel())
                root = s[:keep].sqrt()
                layer.up.zero_()
                layer.down.zero_()
                layer.up[:, :keep].copy_(u[:, :keep] * root / scaling)
                layer.down[:keep].copy_(root[:, None] * vh[:keep])
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    @classmethod
    def from_lora(cls, weight: Tensor, down: Tensor, up: Tensor, bias: Optional[Tensor] = None,
                  scaling: float = 1.0, dropout: float = 0.0) -> "LorsLinear":
        """The layer ``y = x weight^T + bias + scaling * (dropout(x) down^T) up^T``: a LoRA-adapted linear
        (down = lora_A [r, in], up = lora_B [out, r]) with its own shared weight. Copies, in weight's dtype."""
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0] or (up.shape[0], down.shape[1]) != tuple(
                weight.shape):
            raise ValueError(f"LorsLinear.from_lora: weight {list(weight.shape)} needs down [r, {weight.shape[1]}] and "
                             f"up [{weight.shape[0]}, r], got {list(down.shape)} and {list(up.shape)}")
        layer = cls(weight.shape[1], weight.shape[0], rank=down.shape[0], bias=bias is not None, scaling=scaling,
                    dropout=dropout, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            for mine, given in ((layer.shared.weight, weight), (layer.down, down), (layer.up, up), (layer.bias, bias)):
                if given is not None:
                    mine.copy_(given)
        return layer

    @classmethod
    def from_peft(cls, lora_layer: nn.Module, adapter_name: Optional[str] = None) -> "LorsLinear":
        """The LorsLinear computing what a PEFT LoRA layer (``peft.tuners.lora.Linear``) computes with one
        adapter: shared = the base weight, down = lora_A, up = lora_B, scaling = PEFT's (alpha / r, or
        alpha / sqrt(r) with rsLoRA), dropout = lora_dropout, bias = the base bias (+ scaling * lora_B.bias
        with lora_bias). Tensors take the base weight's dtype; requires_grad and train/eval are kept."""
        adapters = list(lora_layer.lora_A.keys())
        if adapter_name is None:
            active = [a for a in lora_layer.active_adapters if a in adapters]
            if len(active) != 1:
                raise ValueError(f"LorsLinear.from_peft: name the adapter to take, one of {adapters} "
                                 f"(active: {active})")
            adapter_name = active[0]
        if adapter_name not in adapters:
            raise ValueError(f"LorsLinear.from_peft: no adapter {adapter_name!r}, the layer has {adapters}")
        if lora_layer.merged:
            raise ValueError("LorsLinear.from_peft: the layer is merged (its base weight holds the adapter): "
                             "unmerge() it first")
        if adapter_name in getattr(lora_layer, "lora_variant", {}) or getattr(lora_layer, "use_dora", {}).get(
                adapter_name):
            raise ValueError(f"LorsLinear.from_peft: adapter {adapter_name!r} is a LoRA variant (DoRA, ...); "
                             "LorsLinear holds plain LoRA only")
        base = lora_layer.get_base_layer()
        weight = base.weight.t() if getattr(lora_layer, "fan_in_fan_out", False) else base.weight
        down, up = lora_layer.lora_A[adapter_name].weight, lora_layer.lora_B[adapter_name]
        scaling = lora_layer.scaling[adapter_name]
        biases = [b for b in (base.bias, None if up.bias is None else up.bias * scaling) if b is not None]
        with torch.no_grad():
            bias = sum(b.to(weight.dtype) for b in biases) if biases else None
        layer = cls.from_lora(weight, down, up.weight, bias, scaling=scaling,
                              dropout=getattr(lora_layer.lora_dropout[adapter_name], "p", 0.0))
        for mine, theirs in ((layer.shared.weight, [weight]), (layer.down, [down]), (layer.up, [up.weight]),
                             (layer.bias, [base.bias, up.bias])):
            if mine is not None:
                mine.requires_grad_(any(t is not None and t.requires_grad for t in theirs))
        return layer.train(lora_layer.training)

    def extra_repr(self) -> str:
        merged = ", merged" if self.merged else ""
        dropout = f", dropout={self.dropout}" if self.dropout else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"groups={self.groups}, bias={self.bias is not None}, scaling={self.scaling}{dropout}{merged}")


def _refuse_merged(layer: LorsLinear, prefix: str, keep_vars: bool) -> None:
    # Also a state-dict pre-hook of layers pickled by the version that registered it: keep the name.
    if layer.merged:
        raise RuntimeError(f"LorsLinear {prefix[:-1] or '(root)'} is merged: its shared weight holds the private "
                           "pair already, so a reloaded layer would add it twice. unmerge() before saving, or save "
                           "to_linear()")


def _functorch_wrapped(t: Tensor) -> bool:
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


# What a function does to the EffectiveWeight tensors it is given, by name (an aten overload by its
# schema's: copy_.default is aten::copy_):
_READS = 0         # nothing: at most its results alias them
_WRITES = 1        # writes its first argument, or each tensor of it (the _foreach_ ops)
_REPOINTS = 2      # points a tensor at other memory, where no write can be followed
_TO_NUMPY = 3      # hands the memory to numpy, where no write can be seen
_SETS_DATA = 4     # weight.data = new
# (+=, -=, *=, /=, //=, %=, **= arrive as add_, sub_, mul_, div_, floor_divide_, remainder_, pow_.)
_WRITING_DUNDERS = {"__setitem__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__"}
_REPOINT_NAMES = {"set_", "resize_", "resize_as_"}
# In place by name, writing no value: flags, metadata of the tensor object itself, where memory lives.
_NOT_WRITES = {"requires_grad_", "share_memory_", "detach_", "t_", "transpose_", "swapdims_", "swapaxes_",
               "squeeze_", "unsqueeze_", "as_strided_"}
_KINDS = {Tensor.data.__set__: _SETS_DATA}  # filled as functions are met (a method-wrapper equals its re-reads)


def _classify(func) -> int:
    schema = getattr(func, "_schema", None)
    name = schema.name.rpartition("::")[2] if schema is not None else getattr(func, "__name__", "")
    if name in _REPOINT_NAMES:
        return _REPOINTS
    if name in ("numpy", "__array__"):
        return _TO_NUMPY
    if name in _WRITING_DUNDERS or (name.endswith("_") and not name.startswith("__") and name not in _NOT_WRITES):
        return _WRITES
    return _READS


def _kind(func) -> int:
    try:
        return _KINDS[func]
    except KeyError:
        kind = _KINDS[func] = _classify(func)
        return kind
    except TypeError:  # unhashable
        return _classify(func)


def _repoint_error(name: str) -> RuntimeError:
    return RuntimeError(f"LorsLinear.weight: {name} would point it at other memory, where the layer cannot see "
                        "writes. Write the values instead: weight.data.copy_(t), or weight.data = t")


def _in_root(address: int, root: Tensor) -> bool:
    start = root.data_ptr()  # root is a fresh contiguous tensor: its memory is [start, start + nbytes)
    return start != 0 and start <= address < start + root.nbytes


def _aliases(t, root: Tensor) -> bool:
    """Whether ``t`` is ``root``'s memory (root itself, ``.data``, a view). Only plain tensors are asked:
    torch.func's wrappers hold no storage of their own."""
    return type(t) is Tensor and not _functorch_wrapped(t) and _in_root(t.data_ptr(), root) and t.device == root.device


class EffectiveWeight(Tensor):
    """What ``LorsLinear.weight`` returns: the effective weight, freshly computed, whose in-place writes
    (through it, its ``.data`` or any view of it) are passed on to the layer. A plain computed tensor
    would take such writes and drop them: PEFT's merge and weight-tying tools would do nothing.

    Writes that bypass torch's operators cannot be seen: ``numpy()`` arrays of it are read-only, and
    ``set_`` raises; memory reached through ``untyped_storage()``, DLPack or pointers is not followed,
    nor is ``torch.Tensor.set_(weight, t)`` called on the base class. Functions that neither write it nor
    return a view of it run as on a plain tensor."""

    @classmethod
    def wrap(cls, t: Tensor, layer: "weakref.ref[LorsLinear]", root: Tensor) -> "EffectiveWeight":
        out = t.as_subclass(cls)
        # The layer by weak reference: a weight kept after its layer was dropped must not count as a user.
        out._lors_layer, out._lors_root, out._lors_written = layer, root, False
        return out

    def _layer(self) -> LorsLinear:
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

    def set_(self, *args, **kwargs):  # set_ never reaches __torch_function__
        raise _repoint_error("set_")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = _kind(func)
        with torch._C.DisableTorchFunctionSubclass():
            if kind == _READS and "out" not in kwargs:  # most calls: no bookkeeping before
                out = func(*args, **kwargs)
            elif kind == _SETS_DATA:
                target, value = args
                root = target._lors_root
                geometry = (target.shape, target.stride(), target.storage_offset())
                if geometry != (root.shape, root.stride(), root.storage_offset()):
                    raise RuntimeError("LorsLinear.weight: assign .data of the whole weight, not of a view of it")
                # `weight.data += d` assigns back the very data it wrote (the write reached the layer already)
                if not (isinstance(value, cls) and value._lors_root is root
                        and (value.shape, value.stride(), value.storage_offset()) == geometry):
                    target._layer()._write_effective_weight(value)
                return None
            elif kind == _REPOINTS:
                raise _repoint_error(getattr(func, "__name__", str(func)))
            elif kind == _TO_NUMPY:
                out = func(*args, **kwargs)
                if _in_root(out.__array_interface__["data"][0], args[0]._lors_root):  # writes to it would be lost
                    out.flags.writeable = False
                return out
            else:
                out = cls._write(func, kind, args, kwargs)
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
                    return cls.wrap(result, t._lors_layer, t._lors_root)
        return result

    @classmethod
    def _write(cls, func, kind, args, kwargs):
        """Run ``func``, which writes (in place or through ``out=``), and pass each EffectiveWeight's change
        on to its layer. Runs with torch functions disabled."""
        targets = []
        if kind == _WRITES:
            first = args[0] if args else next(iter(kwargs.values()), None)  # nn.init passes it by keyword
            targets = list(first) if isinstance(first, (tuple, list)) else [first]
        targets += tree_flatten(kwargs.get("out"))[0]
        written = list({id(t._lors_root): t for t in targets if isinstance(t, cls)}.values())  # each root once
        layers = [t._layer() for t in written]
        for layer in layers:  # raise before anything is written
            layer._check_sole_user("writing LorsLinear.weight")
        with torch.no_grad():
            before = [t._lors_root.detach().clone() for t in written]
        out = func(*args, **kwargs)
        for t, layer, old in zip(written, layers, before):
            layer._apply_write(t._lors_root.detach(), old)
        if any(out is t for t in written):  # `layer.weight += d` then assigns it back: see __setattr__
            out._lors_written = True
        return out
def make_lors_stack(n_layers: int, in_features: int, out_features: int, rank: Union[int, Sequence[int]] = 8,
                    groups: Union[int, Sequence[int]] = 1, bias: bool = True, scaling: float = 1.0,
                    init: str = "default", device=None, dtype=None) -> nn.ModuleList:
    """``n_layers`` LorsLinear layers sharing one SharedWeight (initialized as ``init`` says); ``rank``
    and ``groups`` per layer (an int for all, or a list)."""
    ranks, group_counts = ([v] * n_layers if isinstance(v, int) else list(v) for v in (rank, groups))
    for what, values in (("rank", ranks), ("group count", group_counts)):
        if len(values) != n_layers:
            raise ValueError(f"make_lors_stack: {len(values)} {what}s given for {n_layers} layers")
    shared = SharedWeight(in_features, out_features, init=init, device=device, dtype=dtype)
    return nn.ModuleList(
        LorsLinear(in_features, out_features, rank=r, groups=g, bias=bias, shared=shared, scaling=scaling)
        for r, g in zip(ranks, group_counts)
    )


def shared_stacks(module: nn.Module) -> List[Tuple[SharedWeight, List[Tuple[str, LorsLinear]]]]:
    """The LORS^T stacks inside ``module``: its LorsLinear layers, named, grouped by the SharedWeight
    they use, in module order (conversion, parameter accounting and sharding all start here)."""
    stacks = {}
    for name, layer in module.named_modules():
        if isinstance(layer, LorsLinear):
            stacks.setdefault(id(layer.shared), (layer.shared, []))[1].append((name, layer))
    return list(stacks.values())
