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
