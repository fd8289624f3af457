"""The static LORS layer, and stacks of them sharing one weight."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .effective_weight import EffectiveWeight, written_back
from .op import lors_linear
from .reference import dense_linear
from .shared_weight import SharedWeight, users


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

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int = 8,
        groups: int = 1,
        bias: bool = True,
        shared: SharedWeight | None = None,
        scaling: float = 1.0,
        dropout: float = 0.0,
        init: str = "default",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if rank < 0 or groups < 0:
            raise ValueError(f"LorsLinear: rank and groups must be >= 0, got rank={rank}, groups={groups}")
        if not 0 <= dropout < 1:
            raise ValueError(f"LorsLinear: dropout must be in [0, 1), got {dropout}")
        if shared is None:
            shared = SharedWeight(in_features, out_features, init=init, device=device, dtype=dtype)
        elif (shared.in_features, shared.out_features) != (in_features, out_features):
            raise ValueError(
                f"LorsLinear({in_features}, {out_features}): shared weight is "
                f"[{shared.out_features}, {shared.in_features}]"
            )
        factory = {
            "device": shared.weight.device if device is None else device,
            "dtype": shared.weight.dtype if dtype is None else dtype,
        }
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
            if written_back(value, self):
                return  # `layer.weight += d`: Python assigns back the tensor whose write reached the layer
            raise AttributeError(
                "LorsLinear.weight is computed (shared.weight + scaling * up @ down), so it cannot be replaced or "
                "tied to another tensor. Write its values in place (layer.weight.data.copy_(w) updates the layer "
                "when its shared weight is its own), or set shared.weight, down and up."
            )
        if name == "shared":  # keep each SharedWeight's set of users
            old = self._modules.get("shared")
            if old is not value:
                if isinstance(old, SharedWeight):
                    users(old).discard(self)
                if isinstance(value, SharedWeight):
                    users(value).add(self)
        super().__setattr__(name, value)

    def __delattr__(self, name):
        if name == "shared" and isinstance(self._modules.get("shared"), SharedWeight):
            users(self._modules["shared"]).discard(self)
        super().__delattr__(name)

    def __setstate__(self, state):
        super().__setstate__(state)
        shared = self._modules.get("shared")
        if isinstance(shared, SharedWeight):  # unpickled, copied or deep-copied: one more layer uses it
            users(shared).add(self)

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
            return dense_linear(x, self.shared.weight, self.bias)
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
        return EffectiveWeight.of(self)

    def merge(self) -> None:
        """Add ``scaling * up @ down`` into the shared weight and run as a dense layer (PEFT's merge).
        Needs the shared weight to be this layer's alone. ``unmerge()`` takes it out again."""
        if self.merged:
            warnings.warn("LorsLinear: already merged, nothing to do", stacklevel=2)
            return
        self.shared._check_sole_user("merge()")
        with torch.no_grad():
            self.shared.weight.add_(self.get_delta_weight())
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("LorsLinear: already unmerged, nothing to do", stacklevel=2)
            return
        with torch.no_grad():
            self.shared.weight.sub_(self.get_delta_weight())
        self.merged = False

    def merge_lora(self, down: Tensor, up: Tensor, scaling: float = 1.0) -> None:
        """Add a LoRA pair exactly: ``y += scaling * (x down^T) up^T`` (down [r, in], up [out, r]) joins the
        private pair, whose rank grows from R to R + r (``rank`` becomes R + r, ``groups`` 1), and the
        shared weight is untouched, so a layer of a stack can take it while the other layers keep their
        function. The up factor is scaled by ``scaling / self.scaling`` (the one rounding). Parameters
        are new tensors of the new shapes. ``unmerge_lora(r)`` takes the last r off again."""
        r = down.shape[0] if down.dim() == 2 else -1
        if (
            r < 0
            or up.dim() != 2
            or up.shape[1] != r
            or (up.shape[0], down.shape[1]) != (self.out_features, self.in_features)
        ):
            raise ValueError(
                f"LorsLinear.merge_lora: needs down [r, {self.in_features}] and up [{self.out_features}, r], "
                f"got {list(down.shape)} and {list(up.shape)}"
            )
        if self.merged:
            raise RuntimeError("LorsLinear.merge_lora: the layer is merged (merge()); unmerge() it first")
        if not self.scaling:
            raise ValueError("LorsLinear.merge_lora: a layer of scaling 0 applies no private pair to add to")
        with torch.no_grad():
            factor = float(scaling) / self.scaling
            pair = (torch.cat([self.down, down.to(self.down)]), torch.cat([self.up, up.to(self.up) * factor], dim=1))
        self._set_pair(*pair)
        self._lora_ranks = [*getattr(self, "_lora_ranks", []), (self.rank, self.groups)]
        self.rank, self.groups = pair[0].shape[0], 1

    def unmerge_lora(self, rank: int) -> None:
        """Take off the pair of rank ``rank`` that the last ``merge_lora`` added: the private pair, rank and
        groups as they were before it, bit for bit."""
        merged = getattr(self, "_lora_ranks", [])
        if not merged or self.down.shape[0] - rank != merged[-1][0] * merged[-1][1]:
            raise ValueError(
                f"LorsLinear.unmerge_lora: the last merge_lora added no pair of rank {rank} "
                f"(pairs merged: {len(merged)}, rank now {self.down.shape[0]})"
            )
        kept = self.down.shape[0] - rank
        with torch.no_grad():
            self._set_pair(self.down[:kept].clone(), self.up[:, :kept].clone())
        (self.rank, self.groups), self._lora_ranks = merged[-1], merged[:-1]

    def _set_pair(self, down: Tensor, up: Tensor) -> None:
        """New down/up parameters, keeping whether each takes gradients."""
        self.down = nn.Parameter(down, requires_grad=self.down.requires_grad)
        self.up = nn.Parameter(up, requires_grad=self.up.requires_grad)

    def to_linear(self) -> nn.Linear:
        """A dense ``nn.Linear`` computing what this layer computes (dropout aside)."""
        w = self.shared.weight
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=w.device, dtype=w.dtype
        )
        with torch.no_grad():
            linear.weight.copy_(self.effective_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, shared: SharedWeight | None = None, rank: int = 8, groups: int = 1, scaling: float = 1.0
    ) -> LorsLinear:
        """A LorsLinear computing what ``linear`` computes.

        Without ``shared`` the layer takes a copy of the linear's weight as its own shared weight and
        the private pair starts at the paper's init (up = 0), so the function is kept exactly. With a
        ``shared`` weight, the private pair is the best rank ``rank * groups`` approximation of
        ``linear.weight - shared.weight`` (truncated SVD): exact when the residual's rank fits.
        """
        w = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            rank=rank,
            groups=groups,
            bias=linear.bias is not None,
            shared=shared,
            scaling=scaling,
            device=w.device,
            dtype=w.dtype,
        )
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
    def from_lora(
        cls,
        weight: Tensor,
        down: Tensor,
        up: Tensor,
        bias: Tensor | None = None,
        scaling: float = 1.0,
        dropout: float = 0.0,
    ) -> LorsLinear:
        """The layer ``y = x weight^T + bias + scaling * (dropout(x) down^T) up^T``: a LoRA-adapted linear
        (down = lora_A [r, in], up = lora_B [out, r]) with its own shared weight. Copies, in weight's dtype."""
        if (
            down.dim() != 2
            or up.dim() != 2
            or up.shape[1] != down.shape[0]
            or (up.shape[0], down.shape[1]) != tuple(weight.shape)
        ):
            raise ValueError(
                f"LorsLinear.from_lora: weight {list(weight.shape)} needs down [r, {weight.shape[1]}] and "
                f"up [{weight.shape[0]}, r], got {list(down.shape)} and {list(up.shape)}"
            )
        layer = cls(
            weight.shape[1],
            weight.shape[0],
            rank=down.shape[0],
            bias=bias is not None,
            scaling=scaling,
            dropout=dropout,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            for mine, given in ((layer.shared.weight, weight), (layer.down, down), (layer.up, up), (layer.bias, bias)):
                if given is not None:
                    mine.copy_(given)
        return layer

    @classmethod
    def from_peft(cls, lora_layer: nn.Module, adapter_name: str | None = None) -> LorsLinear:
        """The LorsLinear computing what a PEFT LoRA layer (``peft.tuners.lora.Linear``) computes with one
        adapter: shared = the base weight, down = lora_A, up = lora_B, scaling = PEFT's (alpha / r, or
        alpha / sqrt(r) with rsLoRA), dropout = lora_dropout, bias = the base bias (+ scaling * lora_B.bias
        with lora_bias). Tensors take the base weight's dtype; requires_grad and train/eval are kept."""
        adapters = list(lora_layer.lora_A.keys())
        if adapter_name is None:
            active = [a for a in lora_layer.active_adapters if a in adapters]
            if len(active) != 1:
                raise ValueError(
                    f"LorsLinear.from_peft: name the adapter to take, one of {adapters} (active: {active})"
                )
            adapter_name = active[0]
        if adapter_name not in adapters:
            raise ValueError(f"LorsLinear.from_peft: no adapter {adapter_name!r}, the layer has {adapters}")
        if lora_layer.merged:
            raise ValueError(
                "LorsLinear.from_peft: the layer is merged (its base weight holds the adapter): unmerge() it first"
            )
        if adapter_name in getattr(lora_layer, "lora_variant", {}) or getattr(lora_layer, "use_dora", {}).get(
            adapter_name
        ):
            raise ValueError(
                f"LorsLinear.from_peft: adapter {adapter_name!r} is a LoRA variant (DoRA, ...); "
                "LorsLinear holds plain LoRA only"
            )
        base = lora_layer.get_base_layer()
        weight = base.weight.t() if getattr(lora_layer, "fan_in_fan_out", False) else base.weight
        down, up = lora_layer.lora_A[adapter_name].weight, lora_layer.lora_B[adapter_name]
        scaling = lora_layer.scaling[adapter_name]
        biases = [b for b in (base.bias, None if up.bias is None else up.bias * scaling) if b is not None]
        with torch.no_grad():
            bias = sum(b.to(weight.dtype) for b in biases) if biases else None
        layer = cls.from_lora(
            weight,
            down,
            up.weight,
            bias,
            scaling=scaling,
            dropout=getattr(lora_layer.lora_dropout[adapter_name], "p", 0.0),
        )
        for mine, theirs in (
            (layer.shared.weight, [weight]),
            (layer.down, [down]),
            (layer.up, [up.weight]),
            (layer.bias, [base.bias, up.bias]),
        ):
            if mine is not None:
                mine.requires_grad_(any(t is not None and t.requires_grad for t in theirs))
        return layer.train(lora_layer.training)

    def extra_repr(self) -> str:
        merged = ", merged" if self.merged else ""
        dropout = f", dropout={self.dropout}" if self.dropout else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"groups={self.groups}, bias={self.bias is not None}, scaling={self.scaling}{dropout}{merged}"
        )


def _refuse_merged(layer: LorsLinear, prefix: str, keep_vars: bool) -> None:
    # Also a state-dict pre-hook of layers pickled by the version that registered it: keep the name.
    if layer.merged:
        raise RuntimeError(
            f"LorsLinear {prefix[:-1] or '(root)'} is merged: its shared weight holds the private "
            "pair already, so a reloaded layer would add it twice. unmerge() before saving, or save "
            "to_linear()"
        )


def make_lors_stack(
    n_layers: int,
    in_features: int,
    out_features: int,
    rank: int | Sequence[int] = 8,
    groups: int | Sequence[int] = 1,
    bias: bool = True,
    scaling: float = 1.0,
    init: str = "default",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.ModuleList:
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


def stack_linear(layers: Sequence[LorsLinear], x: Tensor, index: Tensor) -> Tensor:
    """Each row of ``x`` through its own layer of a stack: row m through ``layers[index[m]]``, or the shared
    weight alone (no bias) where index[m] is -1, in one ``lors_linear(..., index=)`` call that reads the
    shared weight once for all rows. Same result and gradients as running each row through its layer.

    layers: LorsLinear layers sharing one SharedWeight (a ``make_lors_stack`` result, or a converted
    stack); ranks, biases and scalings may differ. index: ints of x's leading shape (or broadcast to
    it). The pairs are stacked on each call (gradients reach every layer's parameters); layers of
    different ranks or scalings pass them to the device from the host, which CUDA-graph capture refuses
    (``lors_linear(..., index=)`` with device tensors captures). A layer with
    dropout in training mode runs its rows itself, as ``layer(x)`` would, since the fused call has no
    dropout."""
    layers = list(layers)
    if not layers or not all(isinstance(layer, LorsLinear) for layer in layers):
        raise TypeError("stack_linear: layers must be a non-empty sequence of LorsLinear layers")
    shared = layers[0].shared
    for i, layer in enumerate(layers):
        if layer.shared is not shared:
            raise ValueError(f"stack_linear: layers[{i}] does not use layers[0]'s SharedWeight; a stack shares one")
        if layer.merged:
            raise ValueError(f"stack_linear: layers[{i}] is merged (its shared weight holds its pair): unmerge() it")
    if any(layer.dropout and layer.training for layer in layers):
        return _each_row_through_its_layer(layers, x, index)
    down, up, ranks = stack_pairs([layer.down for layer in layers], [layer.up for layer in layers])
    bias = None
    if any(layer.bias is not None for layer in layers):
        bias = torch.stack([layer.bias if layer.bias is not None else up.new_zeros(up.shape[1]) for layer in layers])
    scalings = [layer.scaling for layer in layers]
    # One number where the layers agree: no host-to-device copy (which CUDA-graph capture refuses).
    scaling = scalings[0] if len(set(scalings)) == 1 else torch.tensor(scalings, device=x.device)
    return lors_linear(x, shared.weight, down, up, bias, scaling=scaling, index=index, ranks=ranks)


def stack_pairs(downs: Sequence[Tensor], ups: Sequence[Tensor]) -> tuple[Tensor, Tensor, list[int] | None]:
    """Private pairs of several layers as ``lors_linear(..., index=)`` takes them: (down [L, R, in], up
    [L, out, R], ranks), lower ranks zero-padded to the largest R and ranks None when all are R. Stacked,
    so gradients reach each pair."""
    ranks = [d.shape[0] for d in downs]
    width = max(ranks)
    down = torch.stack([F.pad(d, (0, 0, 0, width - r)) for d, r in zip(downs, ranks)])
    up = torch.stack([F.pad(u, (0, width - r)) for u, r in zip(ups, ranks)])
    return down, up, None if min(ranks) == width else ranks


def _each_row_through_its_layer(layers: list[LorsLinear], x: Tensor, index: Tensor) -> Tensor:
    index = index.expand(x.shape[:-1])
    if index.numel() and not -1 <= index.min() <= index.max() < len(layers):
        raise IndexError(f"stack_linear: index entries must be -1 (the shared weight alone) or in [0, {len(layers)})")
    y = x.new_zeros(*x.shape[:-1], layers[0].out_features)
    shared = (index == -1).nonzero(as_tuple=True)
    y = y.index_put(shared, F.linear(x[shared], layers[0].shared.weight))
    for i, layer in enumerate(layers):
        rows = (index == i).nonzero(as_tuple=True)
        y = y.index_put(rows, layer(x[rows]))
    return y


def shared_stacks(module: nn.Module) -> list[tuple[SharedWeight, list[tuple[str, LorsLinear]]]]:
    """The LORS^T stacks inside ``module``: its LorsLinear layers, named, grouped by the SharedWeight
    they use, in module order (conversion, parameter accounting and sharding all start here)."""
    stacks = {}
    for name, layer in module.named_modules():
        if isinstance(layer, LorsLinear):
            stacks.setdefault(id(layer.shared), (layer.shared, []))[1].append((name, layer))
    return list(stacks.values())
