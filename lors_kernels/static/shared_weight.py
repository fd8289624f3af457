"""The weight shared by the layers of a LORS stack: saved once in a state dict, its users counted."""

from __future__ import annotations

import gc
import math
import weakref

import torch
from torch import nn

INITS = ("default", "xavier", "trunc_normal")

# Per SharedWeight, outside the module so that pickling and deepcopy never see them:
_SAVED = weakref.WeakKeyDictionary()  # -> {id(state dict): (key, weakref to the tensor saved there)}
_LOADING = weakref.WeakKeyDictionary()  # -> [missing_keys of the load in progress, loaded?, keys missing so far]
_USERS = weakref.WeakKeyDictionary()  # -> WeakSet of the LorsLinear layers using it
_SAVED_KEPT = 8  # state dicts remembered per SharedWeight, the latest: more than are ever filled at once

# FSDP1 (FullyShardedDataParallel) saves a wrapped module's state under this prefix (torch's
# FSDP_WRAPPED_MODULE) and then asserts that every name of every parameter is there.
_FSDP1_PREFIX = "_fsdp_wrapped_module."


def users(shared: SharedWeight) -> weakref.WeakSet:
    """The layers using ``shared``: each LorsLinear adds itself when it takes it and leaves when it lets go."""
    return _USERS.setdefault(shared, weakref.WeakSet())


class SharedWeight(nn.Module):
    """The weight ``[out, in]`` shared by every layer of a LORS stack.

    init="default" is nn.Linear's (Kaiming-uniform, a = sqrt(5)); "xavier" is xavier_uniform_, what the
    official LORS ViT gives its FFN's shared weights; "trunc_normal" is trunc_normal_(std=0.02) cut at
    +-2, what its attention's shared weights train from (the classifier's init runs over every Linear
    first, and the attention's own init leaves the shared weights as they are).

    In a state dict the weight appears once, under the first name the traversal reaches; the other
    layers' names are left out, and loading fills the one tensor from whichever name holds it. So a
    checkpoint has no aliased tensors (safetensors and ``save_pretrained`` refuse them). A consequence:
    the entries of one layer taken out of a stack's state dict (keys starting with ``blocks.3.``) lack
    the shared weight unless that layer comes first; ``blocks[3].state_dict()`` has it. Under FSDP1
    (FullyShardedDataParallel), which requires every name, the weight is saved under each layer's name
    as a tied weight is; such a checkpoint loads anywhere.
    """

    init = "default"  # for modules pickled before init existed

    def __init__(
        self,
        in_features: int,
        out_features: int,
        init: str = "default",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
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

    def _check_sole_user(self, what: str) -> None:
        """Raise unless one layer uses this weight: ``what`` (a change of one layer's dense weight)
        would change every layer's."""
        users = self.n_layers
        if users > 1:  # a dropped layer caught in a reference cycle counts until the collector frees it
            gc.collect()
            users = self.n_layers
        if users > 1:
            raise RuntimeError(
                f"LorsLinear: {what} would change the shared weight of {users} layers, not only this "
                "one. A rank-limited private pair cannot hold an arbitrary change: convert this layer with "
                "to_linear() first, or change shared.weight (every layer) or down/up (this layer) explicitly."
            )

    def reset_parameters(self) -> None:
        if self.init == "xavier":
            nn.init.xavier_uniform_(self.weight)
        elif self.init == "trunc_normal":
            nn.init.trunc_normal_(self.weight, std=0.02, a=-2.0, b=2.0)
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

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
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
