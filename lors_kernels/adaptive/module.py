"""AdaMixer's adaptive mixing as modules: plain (`AdaptiveMixing`) and LORS^A (`LorsAdaptiveMixing`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..registry import as_rows
from ..static import make_lors_stack
from .op import adaptive_mixing, generate_mixing_weights

# What init= accepts: the mixing module's own init, or the one AdaMixer's decoder stage leaves (its
# init_weights gives every matrix xavier_uniform_ before the mixing zeroes its generator: out_proj too).
INITS = ("default", "xavier")


def _check_init(init: str, owner: str) -> str:
    if init not in INITS:
        raise ValueError(f"{owner}: init must be one of {INITS}, got {init!r}")
    return init


def _init_factor(t: Tensor) -> None:
    """The official LORS^A init of an E or F factor [G*K, a, b]: kaiming_uniform_ (a = 0) on the 3-D
    tensor, whose fan-in torch takes as a*b: U(-sqrt(6 / (a*b)), sqrt(6 / (a*b)))."""
    if t.numel():  # K = 0: a stage without private part
        nn.init.kaiming_uniform_(t)


def private_sum(left: Tensor, cores: Tensor, right: Tensor) -> Tensor:
    """sum_k E_k @ Q_k @ F_k: E [K, rows, r], Q [..., K, r, r], F [K, r, cols] -> [..., rows, cols].
    Pairwise contractions: no [..., K, rows, cols] intermediate."""
    return torch.einsum("...kas,ksb->...ab", torch.einsum("kar,...krs->...kas", left, cores), right)


def _per_stage(value: int | Sequence[int], n_stages: int, what: str, owner: str) -> list[int]:
    values = [value] * n_stages if isinstance(value, int) else list(value)
    if len(values) != n_stages:
        raise ValueError(f"{owner}: {len(values)} {what} for {n_stages} stages")
    return values


class AdaptiveMixing(nn.Module):
    """Plain AdaMixer: per-query generated M and S, fused mixing, output projection, residual, LayerNorm.

    forward(x [B, N, G, P_in, C], query [B, N, query_dim]) -> [B, N, query_dim], C = in_dim // n_groups.
    init="default" leaves out_proj as nn.Linear's; "xavier" gives its weight xavier_uniform_, as AdaMixer's
    decoder stage does. The generator's weight starts at zero either way (M and S query-independent).
    """

    def __init__(
        self,
        in_dim: int = 256,
        in_points: int = 32,
        out_points: int = 128,
        n_groups: int = 4,
        query_dim: int = 256,
        init: str = "default",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.init = _check_init(init, "AdaptiveMixing")
        if in_dim % n_groups:
            raise ValueError(f"AdaptiveMixing: in_dim {in_dim} is not divisible by n_groups {n_groups}")
        factory = {"device": device, "dtype": dtype}
        self.in_dim, self.in_points, self.out_points, self.n_groups = in_dim, in_points, out_points, n_groups
        self.channels = in_dim // n_groups
        self.generator = nn.Linear(query_dim, n_groups * (self.channels**2 + in_points * out_points), **factory)
        self.out_proj = nn.Linear(n_groups * out_points * self.channels, query_dim, **factory)
        self.norm = nn.LayerNorm(query_dim, **factory)
        nn.init.zeros_(self.generator.weight)  # AdaMixer's init: M and S start query-independent
        if init == "xavier":
            nn.init.xavier_uniform_(self.out_proj.weight)

    def generate(self, query: Tensor) -> tuple[Tensor, Tensor]:
        return generate_mixing_weights(
            query,
            self.generator.weight,
            self.generator.bias,
            groups=self.n_groups,
            in_channels=self.channels,
            out_channels=self.channels,
            in_points=self.in_points,
            out_points=self.out_points,
        )

    def forward(self, x: Tensor, query: Tensor) -> Tensor:
        m, s = self.generate(query)
        out = adaptive_mixing(x, m, s).flatten(2)
        return self.norm(query + self.out_proj(out))


class LorsAdaptiveMixing(nn.Module):
    """AdaMixer's mixing across `n_stages` decoder stages with LORS^A (docs/design.md §1.2), as the official
    FactorizedAdaptiveMixing computes it.

    Shared by every stage: the generator of M and S. Private to stage l: K_l = kernel_groups[l]
    rank-r_l cores per group generated from the query (zero-initialized), their E/F factors for the
    channel and the spatial matrix, a LayerNorm, and a static-LORS output projection (rank out_rank_l,
    one shared base weight). ``rank`` and ``out_rank`` are one int for every stage or one per stage:
    the official config's kernel_sizes and mix_out_proj_ranks. Init as the official: generator weight
    and cores zero, E/F kaiming_uniform_ on the 3-D tensors, the output projection's private down
    kaiming_uniform_ (up and biases zero); the projection's shared weight as nn.Linear's (init="default") or
    xavier_uniform_ (init="xavier", as AdaMixer's decoder stage leaves it).
    forward(stage, x [B, N, G, P_in, C], query [B, N, d_q]) -> [B, N, d_q].
    """

    def __init__(
        self,
        n_stages: int = 6,
        query_dim: int = 256,
        in_dim: int = 256,
        in_points: int = 64,
        out_points: int = 128,
        n_groups: int = 2,
        rank: int | Sequence[int] = 16,
        kernel_groups: Sequence[int] = (1, 1, 2, 2, 3, 3),
        out_rank: int | Sequence[int] = 8,
        init: str = "default",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.init = _check_init(init, "LorsAdaptiveMixing")
        kernel_groups = _per_stage(kernel_groups, n_stages, "kernel_groups", "LorsAdaptiveMixing")
        ranks = _per_stage(rank, n_stages, "ranks", "LorsAdaptiveMixing")
        out_ranks = _per_stage(out_rank, n_stages, "out_ranks", "LorsAdaptiveMixing")
        if in_dim % n_groups:
            raise ValueError(f"LorsAdaptiveMixing: in_dim {in_dim} is not divisible by n_groups {n_groups}")
        factory = {"device": device, "dtype": dtype}
        self.n_stages, self.query_dim, self.in_points, self.out_points = n_stages, query_dim, in_points, out_points
        self.n_groups, self.ranks, self.kernel_groups, self.out_ranks = n_groups, ranks, kernel_groups, out_ranks
        self.channels = c = in_dim // n_groups
        self.generator = nn.Linear(query_dim, n_groups * (c * c + in_points * out_points), **factory)
        nn.init.zeros_(self.generator.weight)
        self.cores = nn.ModuleList(
            nn.Linear(query_dim, 2 * n_groups * k * r * r, **factory) for k, r in zip(kernel_groups, ranks)
        )
        gk = [(n_groups * k, r) for k, r in zip(kernel_groups, ranks)]
        self.channel_left = nn.ParameterList(nn.Parameter(torch.empty(j, c, r, **factory)) for j, r in gk)
        self.channel_right = nn.ParameterList(nn.Parameter(torch.empty(j, r, c, **factory)) for j, r in gk)
        self.spatial_left = nn.ParameterList(nn.Parameter(torch.empty(j, out_points, r, **factory)) for j, r in gk)
        self.spatial_right = nn.ParameterList(nn.Parameter(torch.empty(j, r, in_points, **factory)) for j, r in gk)
        self.out_proj = make_lors_stack(
            n_stages, n_groups * out_points * c, query_dim, rank=out_ranks, init=init, **factory
        )
        self.norms = nn.ModuleList(nn.LayerNorm(query_dim, **factory) for _ in range(n_stages))
        self.reset_private_parameters()

    def reset_private_parameters(self) -> None:
        """The official init: cores zero (so every stage starts as the shared mixing), E/F kaiming_uniform_."""
        for core in self.cores:
            nn.init.zeros_(core.weight)
            nn.init.zeros_(core.bias)
        for factors in (self.channel_left, self.channel_right, self.spatial_left, self.spatial_right):
            for factor in factors:
                _init_factor(factor)

    def generate(
        self, stage: int, query: Tensor
    ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor] | None, tuple[Tensor, Tensor, Tensor] | None]:
        """M, S and this stage's private parts ((E^M, Q^M, F^M), (E^S, Q^S, F^S)), or Nones when K_l = 0."""
        if not 0 <= stage < self.n_stages:  # a negative index would pick a stage from the end
            raise IndexError(f"LorsAdaptiveMixing: stage {stage} is out of range for {self.n_stages} stages")
        c = self.channels
        k = self.kernel_groups[stage]
        common = dict(
            groups=self.n_groups, in_channels=c, out_channels=c, in_points=self.in_points, out_points=self.out_points
        )
        if k == 0:
            m, s = generate_mixing_weights(query, self.generator.weight, self.generator.bias, **common)
            return m, s, None, None
        core = self.cores[stage]
        m, s, qm, qs = generate_mixing_weights(
            query, self.generator.weight, self.generator.bias, core.weight, core.bias, rank=self.ranks[stage], **common
        )
        return (
            m,
            s,
            (self.channel_left[stage], qm, self.channel_right[stage]),
            (self.spatial_left[stage], qs, self.spatial_right[stage]),
        )

    def lors_stacks(self) -> Sequence[tuple[str, Sequence[Tensor], Sequence[Sequence[Tensor]]]]:
        """(label, shared parameters, each stage's private parameters) for count_parameters; the output
        projection is a LorsLinear stack of its own."""
        private = [
            [
                *self.cores[stage].parameters(),
                self.channel_left[stage],
                self.channel_right[stage],
                self.spatial_left[stage],
                self.spatial_right[stage],
            ]
            for stage in range(self.n_stages)
        ]
        return [("mixing", list(self.generator.parameters()), private)]

    def forward(self, stage: int, x: Tensor, query: Tensor) -> Tensor:
        m, s, channel_private, spatial_private = self.generate(stage, query)
        out = adaptive_mixing(x, m, s, channel_private=channel_private, spatial_private=spatial_private)
        return self.norms[stage](query + self.out_proj[stage](out.flatten(2)))


class LorsWeightGenerator(nn.Module):
    """Any per-query generated matrix across ``n_stages`` stages with LORS^A (the paper's §3.2):

        W_l(q) = reshape(q Wgen^T + bgen, [rows, cols]) + sum_{k < K_l} E_{l,k} Q_{l,k}(q) F_{l,k}
        Q_l(q) = reshape(q Wcore_l^T + bcore_l, [K_l, r, r])

    The generator is shared by every stage; stage l owns its core generator, E [K_l, rows, r] and
    F [K_l, r, cols]. For generated parameters other than AdaMixer's M and S (which LorsAdaptiveMixing
    generates fused), e.g. dynamic convolution kernels. forward(stage, query [..., d_q]) -> [..., rows, cols].
    Init as the official LORS^A: generator as nn.Linear, cores zero, E/F kaiming_uniform_ on the 3-D tensors.
    """

    def __init__(
        self,
        n_stages: int,
        query_dim: int,
        rows: int,
        cols: int,
        rank: int = 16,
        kernel_groups: Sequence[int] = (1, 1, 2, 2, 3, 3),
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kernel_groups = _per_stage(kernel_groups, n_stages, "kernel_groups", "LorsWeightGenerator")
        factory = {"device": device, "dtype": dtype}
        self.n_stages, self.rows, self.cols, self.rank, self.kernel_groups = n_stages, rows, cols, rank, kernel_groups
        self.generator = nn.Linear(query_dim, rows * cols, bias=bias, **factory)
        self.cores = nn.ModuleList(nn.Linear(query_dim, k * rank * rank, bias=bias, **factory) for k in kernel_groups)
        self.left = nn.ParameterList(nn.Parameter(torch.empty(k, rows, rank, **factory)) for k in kernel_groups)
        self.right = nn.ParameterList(nn.Parameter(torch.empty(k, rank, cols, **factory)) for k in kernel_groups)
        self.reset_private_parameters()

    def reset_private_parameters(self) -> None:
        for stage in range(self.n_stages):
            nn.init.zeros_(self.cores[stage].weight)
            if self.cores[stage].bias is not None:
                nn.init.zeros_(self.cores[stage].bias)
            _init_factor(self.left[stage])
            _init_factor(self.right[stage])

    def lors_stacks(self) -> Sequence[tuple[str, Sequence[Tensor], Sequence[Sequence[Tensor]]]]:
        """(label, shared parameters, each stage's private parameters) for count_parameters."""
        private = [
            [*self.cores[stage].parameters(), self.left[stage], self.right[stage]] for stage in range(self.n_stages)
        ]
        return [("generator", list(self.generator.parameters()), private)]

    def forward(self, stage: int, query: Tensor) -> Tensor:
        lead = query.shape[:-1]
        q = as_rows(query)
        weight = self.generator(q).view(-1, self.rows, self.cols)
        k = self.kernel_groups[stage]
        if k:
            cores = self.cores[stage](q).view(-1, k, self.rank, self.rank)
            weight = weight + private_sum(self.left[stage], cores, self.right[stage])
        return weight.view(*lead, self.rows, self.cols)

    def extra_repr(self) -> str:
        return (
            f"n_stages={self.n_stages}, rows={self.rows}, cols={self.cols}, rank={self.rank}, "
            f"kernel_groups={self.kernel_groups}"
        )
