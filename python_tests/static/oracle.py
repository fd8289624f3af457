"""The float64 oracle of lors_linear, and the inputs the tests of several implementations share."""

import torch


def dense64(x, weight, down, up, bias, scaling):
    """Independent oracle: materialize W + s * up @ down in float64 and apply it densely."""
    w = weight.double() + scaling * up.double() @ down.double()
    y = x.double() @ w.t()
    return y + bias.double() if bias is not None else y


def make_inputs(m, k, n, r, dtype, device="cpu", bias=True, lead=(), seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    x = rand(*lead, m, k)
    weight = rand(n, k, scale=max(k, 1) ** -0.5)
    down = rand(r, k, scale=max(k, 1) ** -0.5)
    up = rand(n, r, scale=max(r, 1) ** -0.5)
    b = rand(n) if bias else None
    return x, weight, down, up, b


def grads64(x, weight, down, up, bias, scaling, grad_out):
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, down, up)]
    b = bias.detach().double().requires_grad_() if bias is not None else None
    y = dense64(*leaves, b, scaling)
    y.backward(grad_out.double())
    return y.detach(), [t.grad for t in leaves] + ([b.grad] if b is not None else [])


def indexed64(x, weight, down, up, bias, scaling, index, ranks=None):
    """Independent oracle of rows at different layers: each row on its own, through its layer's effective
    weight W + s_i up_i[:, :r] @ down_i[:r] in float64 (the shared weight alone at -1)."""
    rows, layers = x.double().reshape(index.numel(), x.shape[-1]), index.reshape(-1).tolist()
    out = []
    for row, i in zip(rows, layers):
        w, b = weight.double(), None if bias is None or bias.dim() == 2 else bias.double()
        if i >= 0:
            r = down.shape[1] if ranks is None else int(ranks[i])
            w = w + scaling[i].double() * up[i, :, :r].double() @ down[i, :r].double()
            b = bias[i].double() if bias is not None and bias.dim() == 2 else b
        out.append(w @ row + (0 if b is None else b))
    return (
        torch.stack(out).reshape(*x.shape[:-1], weight.shape[0])
        if out
        else rows.new_zeros(*x.shape[:-1], weight.shape[0])
    )


def make_indexed_inputs(m, k, n, layers, r, dtype, device="cpu", bias="layer", lead=(), seed=0):
    """x, weight, down [L, R, K], up [L, N, R], bias (None, [N] "shared" or [L, N] "layer"), scaling [L]
    (fp32), index [*lead, m] in [-1, L) with every layer and -1 present when there are rows enough."""
    x, weight, _, _, _ = make_inputs(m, k, n, 0, dtype, device, bias=False, lead=lead, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    down = rand(layers, r, k, scale=max(k, 1) ** -0.5)
    up = rand(layers, n, r, scale=max(r, 1) ** -0.5)
    b = {None: None, "shared": rand(n), "layer": rand(layers, n)}[bias]
    scaling = (torch.rand(layers, generator=g) + 0.5).to(device)
    count = m * (1 if not lead else int(torch.tensor(lead).prod()))
    index = (torch.arange(count) % (layers + 1) - 1)[torch.randperm(count, generator=g)]
    return x, weight, down, up, b, scaling, index.reshape(*lead, m).to(device)


def indexed_grads64(x, weight, down, up, bias, scaling, index, ranks, grad_out):
    """indexed64's output and the gradients of x, weight, down, up, scaling and bias (if any)."""
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, down, up, scaling)]
    b = bias.detach().double().requires_grad_() if bias is not None else None
    y = indexed64(*leaves[:4], b, leaves[4], index, ranks)
    if y.requires_grad:  # not without rows
        y.backward(grad_out.double())
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves + ([b] if b is not None else [])]
    return y.detach(), grads
