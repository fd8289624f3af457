"""adaptive/reference.py: forward and backward formulas against the float64 loops."""

import pytest
import torch
from helpers import assert_close

from lors_kernels.adaptive import reference

from .oracle import SHAPES, leaves_of, loops64, make_inputs


@pytest.mark.parametrize("shape", list(SHAPES))
def test_reference_matches_float64_loops(shape):
    x, m, s, cp, sp = make_inputs(*SHAPES[shape], torch.float64)
    assert_close(reference.adaptive_mixing(x, m, s, cp, sp), loops64(x, m, s, cp, sp), torch.float64, "out")


@pytest.mark.parametrize("shape", list(SHAPES))
def test_reference_backward_formulas(shape):
    x, m, s, cp, sp = make_inputs(*SHAPES[shape], torch.float64)
    leaves = [t.requires_grad_() for t in leaves_of(x, m, s, cp, sp)]
    out = loops64(x, m, s, cp, sp)
    dout = torch.randn_like(out)
    expected = torch.autograd.grad(out, leaves, dout)
    dx, dm, ds, dcm, dsp = reference.adaptive_mixing_backward(dout, x, m, s, cp, sp)
    got = [dx, dm, ds, *(dcm or ()), *(dsp or ())]
    assert len(got) == len(expected)
    for i, (a, e) in enumerate(zip(got, expected)):
        assert_close(a, e, torch.float64, f"grad {i}")
