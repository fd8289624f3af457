"""Static LORS modules: a shared weight, the layers that use it, and stacks of them."""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .op import lors_linear


class SharedWeight(nn.Module):
    """The weight ``[out, in]`` shared by every layer of a LORS stack (nn.Linear's init)."""

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class LorsLinear(nn.Module):
    """``y = x W_shared^T + scaling * (x down^T) up^T + bias``: a drop-in for ``nn.Linear``.

    ``groups`` private pairs of rank ``rank`` are stored as one concatenated pair of rank
    ``rank * groups`` (sum_g up_g down_g = [up_1 ... up_G] [down_1; ...; down_G]).
    Pass ``shared`` to tie the base weight to other layers; by default the layer owns one.
    """

    def __init__(self, in_features: int, out_features: int, rank: int = 8, groups: int = 1, bias: bool = True,
                 shared: Optional[SharedWeight] = None, scaling: float = 1.0, device=None, dtype=None):
        super().__init__()
        if rank < 0 or groups < 0:
            raise ValueError(f"LorsLinear: rank and groups must be >= 0, got rank={rank}, groups={groups}")
        if shared is None:
            shared = SharedWeight(in_features, out_features, device=device, dtype=dtype)
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
        self.shared = shared
        self.down = nn.Parameter(torch.empty(rank * groups, in_features, **factory))
        self.up = nn.Parameter(torch.empty(out_features, rank * groups, **factory))
        self.register_parameter("bias", nn.Parameter(torch.empty(out_features, **factory)) if bias else None)
        self.reset_private_parameters()

    def reset_private_parameters(self) -> None:
        """The paper's init: down Kaiming-uniform, up and bias zero (the shared weight is left alone)."""
        if self.down.numel():  # rank 0 is a plain shared layer
            nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
        nn.init.zeros_(self.up)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return lors_linear(x, self.shared.weight, self.down, self.up, self.bias, scaling=self.scaling)

    def effective_weight(self) -> Tensor:
        """The dense weight this layer applies: ``W_shared + scaling * up @ down`` (differentiable)."""
        return torch.addmm(self.shared.weight, self.up, self.down, alpha=self.scaling)

    @property
    def weight(self) -> Tensor:
        """Read-only view of the effective dense weight, so code written for nn.Linear keeps working."""
        return self.effective_weight()

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

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"groups={self.groups}, bias={self.bias is not None}, scaling={self.scaling}")


def make_lors_stack(n_layers: int, in_features: int, out_features: int, rank: int = 8,
                    groups: Union[int, Sequence[int]] = 1, bias: bool = True, scaling: float = 1.0,
                    device=None, dtype=None) -> nn.ModuleList:
    """``n_layers`` LorsLinear layers sharing one SharedWeight; ``groups`` per layer (int or list)."""
    if isinstance(groups, int):
        groups = [groups] * n_layers
    groups = list(groups)
    if len(groups) != n_layers:
        raise ValueError(f"make_lors_stack: {len(groups)} group counts given for {n_layers} layers")
    shared = SharedWeight(in_features, out_features, device=device, dtype=dtype)
    return nn.ModuleList(
        LorsLinear(in_features, out_features, rank=rank, groups=g, bias=bias, shared=shared, scaling=scaling)
        for g in groups
    )


def shared_stacks(module: nn.Module) -> List[Tuple[SharedWeight, List[Tuple[str, LorsLinear]]]]:
    """The LORS^T stacks inside ``module``: its LorsLinear layers, named, grouped by the SharedWeight
    they use, in module order (conversion, parameter accounting and sharding all start here)."""
    stacks = {}
    for name, layer in module.named_modules():
        if isinstance(layer, LorsLinear):
            stacks.setdefault(id(layer.shared), (layer.shared, []))[1].append((name, layer))
    return list(stacks.values())
