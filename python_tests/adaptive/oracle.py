"""The float64 loop oracle of adaptive mixing, and the inputs the tests give it and the implementations."""

import torch


def loops64(x, m, s, channel_private=None, spatial_private=None, eps=1e-5):
    """Independent oracle: per (query, group) loops in float64, explicit sums and LayerNorm."""
    bn, groups = x.shape[:2]
    out = torch.zeros(bn, groups, s.shape[2], m.shape[3], dtype=torch.float64, device=x.device)  # x: any device
    for n in range(bn):
        for g in range(groups):
            mg, sg = m[n, g].double(), s[n, g].double()
            for private, is_channel in ((channel_private, True), (spatial_private, False)):
                if private is None:
                    continue
                e, q, f = (t.double() for t in private)
                k = e.shape[0] // groups
                for kk in range(k):
                    j = g * k + kk
                    delta = e[j] @ q[n, j] @ f[j]
                    if is_channel:
                        mg = mg + delta
                    else:
                        sg = sg + delta
            h = x[n, g].double() @ mg
            h = ((h - h.mean()) / torch.sqrt(h.var(unbiased=False) + eps)).clamp_min(0)
            o = sg @ h
            out[n, g] = ((o - o.mean()) / torch.sqrt(o.var(unbiased=False) + eps)).clamp_min(0)
    return out


def make_inputs(bn, groups, p_in, c_in, c_out, p_out, r, km, ks, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, fan=1):
        return (torch.randn(*shape, generator=gen) / fan**0.5).to(device=device, dtype=dtype)

    x, m, s = (
        rand(bn, groups, p_in, c_in),
        rand(bn, groups, c_in, c_out, fan=c_in),
        rand(bn, groups, p_out, p_in, fan=p_in),
    )
    cp = (
        (rand(groups * km, c_in, r, fan=c_in), rand(bn, groups * km, r, r, fan=r), rand(groups * km, r, c_out, fan=r))
        if km
        else None
    )
    sp = (
        (rand(groups * ks, p_out, r, fan=r), rand(bn, groups * ks, r, r, fan=r), rand(groups * ks, r, p_in, fan=p_in))
        if ks
        else None
    )
    return x, m, s, cp, sp


def leaves_of(x, m, s, cp, sp):
    return [x, m, s] + list(cp or ()) + list(sp or ())


# Odd, non-power-of-two shapes; K in {0, 1, 3} per private part.
SHAPES = {
    "plain": (3, 2, 7, 12, 10, 9, 4, 0, 0),
    "K1": (2, 2, 7, 12, 10, 9, 4, 1, 1),
    "K3_channel": (2, 1, 20, 24, 18, 33, 5, 3, 0),
    "K3_spatial": (2, 2, 9, 6, 11, 13, 3, 0, 3),
    "pow2": (2, 2, 16, 16, 16, 32, 16, 1, 2),
}
