"""Pure-PyTorch adaptive mixing (AdaMixer, and LORS^A's private low-rank parts): the test oracle and
the CPU fallback, written as the official code does it: materialized M and S, 4-D matmuls, separate
LayerNorm and ReLU.

    M_eff = M + sum_k E^M_k @ Q^M_k @ F^M_k        E^M [C_in, r], Q [r, r], F^M [r, C_out]
    S_eff = S + sum_k E^S_k @ Q^S_k @ F^S_k        E^S [P_out, r],        F^S [r, P_in]
    h     = relu(layer_norm(x @ M_eff, [P_in, C_out]))
    out   = relu(layer_norm(S_eff @ h, [P_out, C_out]))

A private part is (E [G*K, *, r], Q [BN, G*K, r, r], F [G*K, r, *]), index g*K + k.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..registry import as_rows


def _split_groups(private, bn: int, groups: int):
    """(E, Q, F) with the index j = g*K + k split: E [G, K, rows, r], Q [BN, G, K, r, r], F [G, K, r, cols]."""
    e, q, f = private
    k = e.shape[0] // max(groups, 1)  # G = 0: no rows (the check), K = 0
    return (
        e.reshape(groups, k, *e.shape[1:]),
        q.reshape(bn, groups, k, *q.shape[2:]),
        f.reshape(groups, k, *f.shape[1:]),
    )


def private_delta(private: Sequence[Tensor], bn: int, groups: int) -> Tensor:
    """sum_k E_k @ Q_k @ F_k for every query and group: [BN, G, rows, cols]."""
    e, q, f = _split_groups(private, bn, groups)
    return torch.einsum("ngkas,gksb->ngab", torch.einsum("gkar,ngkrs->ngkas", e, q), f)


def adaptive_mixing(
    x: Tensor,
    m: Tensor,
    s: Tensor,
    channel_private: Sequence[Tensor] | None = None,
    spatial_private: Sequence[Tensor] | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """x [BN, G, P_in, C_in], m [BN, G, C_in, C_out], s [BN, G, P_out, P_in] -> [BN, G, P_out, C_out]."""
    bn, groups = x.shape[:2]
    if channel_private is not None:
        m = m + private_delta(channel_private, bn, groups)
    if spatial_private is not None:
        s = s + private_delta(spatial_private, bn, groups)
    h = torch.matmul(x, m)
    h = F.relu(F.layer_norm(h, h.shape[-2:], eps=eps))
    out = torch.matmul(s, h)
    return F.relu(F.layer_norm(out, out.shape[-2:], eps=eps))


def _layer_norm_relu(pre, eps):
    """(xhat, rstd, relu(xhat)) of a joint LayerNorm over the last two dims."""
    mean = pre.mean((-2, -1), keepdim=True)
    rstd = torch.rsqrt(pre.var((-2, -1), unbiased=False, keepdim=True) + eps)
    xhat = (pre - mean) * rstd
    return xhat, rstd, xhat.clamp_min(0)


def _layer_norm_relu_backward(dout, xhat, rstd):
    dy = dout * (xhat > 0)
    return rstd * (dy - dy.mean((-2, -1), keepdim=True) - xhat * (dy * xhat).mean((-2, -1), keepdim=True))


def _private_backward(private, d, groups):
    """Gradients of (E, Q, F) from d [BN, G, rows, cols], the gradient of sum_k E_k Q_k F_k.
    Pairwise contractions, so that nothing of size BN*G*K*rows*cols is ever built."""
    if private is None:
        return None
    e, q, f = _split_groups(private, d.shape[0], groups)
    de = torch.einsum("ngab,ngkrb->gkar", d, torch.einsum("ngkrs,gksb->ngkrb", q, f))
    dq = torch.einsum("ngkrb,gksb->ngkrs", torch.einsum("gkar,ngab->ngkrb", e, d), f)
    df = torch.einsum("ngkas,ngab->gksb", torch.einsum("gkar,ngkrs->ngkas", e, q), d)
    return de.flatten(0, 1), dq.flatten(1, 2), df.flatten(0, 1)


def adaptive_mixing_backward(
    dout: Tensor,
    x: Tensor,
    m: Tensor,
    s: Tensor,
    channel_private: Sequence[Tensor] | None = None,
    spatial_private: Sequence[Tensor] | None = None,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor, Tensor] | None, tuple[Tensor, Tensor, Tensor] | None]:
    """Every gradient of :func:`adaptive_mixing` from the formulas (recomputing the forward):
    (dx, dM, dS, (dE^M, dQ^M, dF^M) or None, (dE^S, dQ^S, dF^S) or None)."""
    bn, groups = x.shape[:2]
    m_eff = m + private_delta(channel_private, bn, groups) if channel_private is not None else m
    s_eff = s + private_delta(spatial_private, bn, groups) if spatial_private is not None else s
    xhat1, rstd1, h = _layer_norm_relu(torch.matmul(x, m_eff), eps)
    xhat2, rstd2, _ = _layer_norm_relu(torch.matmul(s_eff, h), eps)
    dpre2 = _layer_norm_relu_backward(dout, xhat2, rstd2)
    ds = torch.matmul(dpre2, h.transpose(-1, -2))
    dpre1 = _layer_norm_relu_backward(torch.matmul(s_eff.transpose(-1, -2), dpre2), xhat1, rstd1)
    dm = torch.matmul(x.transpose(-1, -2), dpre1)
    dx = torch.matmul(dpre1, m_eff.transpose(-1, -2))
    return (dx, dm, ds, _private_backward(channel_private, dm, groups), _private_backward(spatial_private, ds, groups))


def split_generated(
    mixing: Tensor,
    cores: Tensor | None,
    *,
    groups: int,
    in_channels: int,
    out_channels: int,
    in_points: int,
    out_points: int,
    rank: int = 0,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor, Tensor]:
    """The generator's outputs in the official layout (group outer, then M before S):
    mixing [BN, G*(C_in*C_out + P_in*P_out)] -> M [BN, G, C_in, C_out], S [BN, G, P_out, P_in]; cores
    [BN, 2*G*K*r*r] (or None) -> Q^M, Q^S [BN, G*K, r, r]."""
    bn, per_group = mixing.shape[0], in_channels * out_channels + in_points * out_points
    # Sizes spelled out: with BN = 0 a -1 could be anything, and reshape refuses it.
    m, s = mixing.reshape(bn, groups, per_group).split([in_channels * out_channels, in_points * out_points], dim=-1)
    m = m.reshape(bn, groups, in_channels, out_channels)
    s = s.reshape(bn, groups, out_points, in_points)
    if cores is None:
        return m, s
    cores = cores.reshape(bn, 2, cores.shape[1] // (2 * rank * rank), rank, rank)
    return m, s, cores[:, 0], cores[:, 1]


def generate_mixing_weights(
    query: Tensor,
    gen_weight: Tensor,
    gen_bias: Tensor | None,
    core_weight: Tensor | None = None,
    core_bias: Tensor | None = None,
    **shape: int,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor, Tensor]:
    """AdaMixer's parameter generator: query [..., d_q] -> M, S (and, with core_weight [2*G*K*r*r, d_q],
    the private cores Q^M, Q^S); `shape` as :func:`split_generated` takes it."""
    q = as_rows(query)
    cores = None if core_weight is None else F.linear(q, core_weight, core_bias)
    return split_generated(F.linear(q, gen_weight, gen_bias), cores, **shape)
