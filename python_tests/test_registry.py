"""The op registry: a toy family built by docs/design.md's checklist, and what every op gets from it."""

import contextlib

import pytest
import torch
import triton
import triton.language as tl
from helpers import KERNEL_DEVICE, assert_close, dtype_id, fake_cuda, needs_interpreter, no_kernel, op_calls
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

import lors_kernels as lk
from lors_kernels import registry, triton_utils
from lors_kernels.registry import Impl, define_op, public

# ------------------------------------------------------------------ the toy family: y = scale * relu(x)


def reference_scaled_relu(x, scale):
    return scale * torch.relu(x)


@triton.jit
def scaled_relu_kernel(x_ptr, y_ptr, n, scale, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, (scale * tl.maximum(x, 0.0)).to(y_ptr.dtype.element_ty), mask=offs < n)


def triton_scaled_relu(x, scale):
    x = x.contiguous()  # the kernel indexes x flat
    y = torch.empty_like(x)
    if x.numel():
        triton_utils.launch(
            scaled_relu_kernel, (triton.cdiv(x.numel(), 1024),), (x, y, x.numel(), scale), dict(BLOCK=1024), num_warps=4
        )
    return y


def check_scaled_relu(x, scale):
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise TypeError(f"scaled_relu: x must be a floating tensor, got {getattr(x, 'dtype', type(x).__name__)}")


def scaled_relu_backward(c, grad):
    return (grad * (c.scale * (c.x > 0)).to(grad.dtype),)


scaled_relu_op = define_op(
    "test_scaled_relu",
    "(Tensor x, float scale) -> Tensor",
    check=check_scaled_relu,
    fake=lambda x, scale: torch.empty_like(x, memory_format=torch.contiguous_format),
    grads=("x",),
    impls=[
        Impl(
            "triton",
            "cuda",
            triton_scaled_relu,
            scaled_relu_backward,
            fits=lambda c: c.x.dtype != torch.float64,
            takes="float32, float16, bfloat16",
        ),
        Impl("reference", None, reference_scaled_relu, scaled_relu_backward, eager=reference_scaled_relu),
    ],
)


@public(scaled_relu_op)
def scaled_relu(x, *, scale=1.0):
    return x, float(scale)


# ------------------------------------------------------------------------------------ the toy's tests

DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("shape", [(0,), (7,), (3, 1000), (2, 5, 33)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_toy_forward_backward(backend_name, dtype, shape, use_backend):
    use_backend(backend_name)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(*shape, 2, generator=g).to(device=KERNEL_DEVICE, dtype=dtype)
    x = base[..., 0].requires_grad_()  # every second element: not contiguous
    y = scaled_relu(x, scale=1.5)
    dy = torch.randn(y.shape, generator=g).to(y)
    y.backward(dy)
    x64 = x.detach().double().requires_grad_()
    (1.5 * torch.relu(x64)).backward(dy.double())
    assert_close(y, 1.5 * torch.relu(x64.detach()), dtype, "y")
    assert_close(x.grad, x64.grad, dtype, "dx")


def test_toy_opcheck_and_compile(use_backend):
    use_backend("triton")
    x = torch.randn(4, 9, device=KERNEL_DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.lors.test_scaled_relu.default, (x, 0.5))
    torch.library.opcheck(
        torch.ops.lors.test_scaled_relu_backward.default,
        ([torch.ones(4, 9, device=KERNEL_DEVICE)], [], [True], x.detach(), 0.5),
    )
    compiled = torch.compile(lambda t: scaled_relu(t, scale=0.5).sum(), fullgraph=True)
    compiled(x).backward()
    assert_close(x.grad, 0.5 * (x.detach() > 0).double(), torch.float32, "compiled dx")


@needs_interpreter
def test_toy_routes(use_backend):
    x = torch.randn(3)
    assert scaled_relu_op.route(x, 1.0).backend == "reference"  # on CPU the automatic choice
    use_backend("triton")
    assert scaled_relu_op.route(x, 1.0).backend == "triton"  # forced, under the interpreter
    with pytest.raises(
        RuntimeError,
        match="backend 'triton' has no kernel for this call of test_scaled_relu on "
        r"cpu \(it takes cuda: float32, float16, bfloat16\)",
    ):
        scaled_relu(x.double())
    use_backend("native")  # the toy has no native kernel: its reference runs
    assert scaled_relu_op.route(x, 1.0).backend == "reference"
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        scaled_relu(torch.arange(3))


@needs_interpreter
def test_toy_public_route_takes_the_public_arguments(use_backend):
    x = torch.randn(3)
    assert scaled_relu.route(x).backend == "reference"
    use_backend("triton")
    assert scaled_relu.route(x, scale=2.0) is scaled_relu_op.route(x, 2.0)
    with pytest.raises(TypeError, match="x must be a floating tensor"):  # checked as a call is
        scaled_relu.route(torch.arange(3))
    with pytest.raises(TypeError):  # scale is keyword-only, as in the call
        scaled_relu.route(x, 2.0)


@needs_interpreter
def test_launches_go_to_the_inputs_device(monkeypatch):
    """Inputs on cuda:1 while another device is current: forward and backward launch under cuda:1."""
    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda device: entered.append(device) or contextlib.nullcontext())
    x = fake_cuda(torch.randn(6), index=1).requires_grad_()
    scaled_relu(x, scale=2.0).sum().backward()  # Triton under the interpreter, on the CPU data
    assert entered == [torch.device("cuda", 1)] * 2
    assert_close(x.grad, 2.0 * (x.detach() > 0).double(), torch.float32, "dx")


def test_measured_choice_times_each_shape_class_once_and_keeps_the_faster(monkeypatch):
    """wins=Measured: the first call of a shape class times both forwards; the faster runs from then on."""
    timed, runs = [], []
    speed = {"triton": 2.0, "reference": 1.0}  # the kernel is slower here: the reference must win

    def timer(fn, args):
        fn(*args)
        return speed[runs[-1]]

    measured = registry.Measured(lambda c: c.x.shape[0], timer=timer)
    op = define_op(
        "test_measured",
        "(Tensor x) -> Tensor",
        check=lambda x: None,
        fake=torch.empty_like,
        impls=[
            Impl("triton", "cuda", lambda x: runs.append("triton") or x * 2, wins=measured),
            Impl("reference", None, lambda x: runs.append("reference") or x * 2),
        ],
    )
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(measured, "timer", lambda fn, args: timed.append(1) or timer(fn, args))
    for rows in (3, 3, 5):
        op(fake_cuda(torch.ones(rows)))
    assert len(timed) == 4  # two shape classes, two forwards timed each
    # class 3: timed (triton, reference), then the reference runs twice; class 5: timed, then the reference
    assert runs == ["triton", "reference", "reference", "reference", "triton", "reference", "reference"]
    assert measured.verdicts == {(0, 3): False, (0, 5): False}
    assert op.route(torch.ones(3)).backend == "reference"  # off CUDA nothing is timed


# --------------------------------------------------------------------------- every op of the package


class OpsSeen(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend_name", ["auto", "reference"])
@pytest.mark.parametrize("name", list(op_calls()))
def test_eager_calls_do_not_go_through_torch_library(name, backend_name, use_backend):
    use_backend(None if backend_name == "auto" else backend_name)
    with OpsSeen() as seen:
        out = op_calls()[name].run()
        if out.requires_grad:
            out.float().square().sum().backward()
    assert seen.names and not [n for n in seen.names if n.startswith("lors::")], seen.names
    with OpsSeen() as seen:  # the check can see custom ops: calling one directly shows it
        torch.ops.lors.test_scaled_relu(torch.randn(3), 1.0)
    assert "lors::test_scaled_relu" in seen.names


@pytest.mark.parametrize("name", list(op_calls()))
def test_an_eager_training_step_chooses_its_route_once(name, monkeypatch):
    chosen = []
    original = registry.Op.route
    monkeypatch.setattr(registry.Op, "route", lambda self, *args: chosen.append(self.name) or original(self, *args))
    out = op_calls()[name].run()
    if out.requires_grad:
        out.float().sum().backward()
    assert len(chosen) == 1, chosen


def public_calls():
    """(public function, args, kwargs) of every op, keywords and defaults included."""
    import lors_kernels as lk

    g = torch.Generator().manual_seed(0)
    x, weight, down, up, bias = (
        torch.randn(*shape, generator=g) for shape in ((4, 64), (32, 64), (8, 64), (32, 8), (32,))
    )
    scores = torch.rand(2, 5, 4 * 8, generator=g)
    q, k, v = torch.randn(2, 2, 5, 16, generator=g), torch.randn(2, 2, 64, 16, generator=g), torch.randn(2, 2, 64, 16)
    per_query = torch.randint(-1, 64, (2, 5, 24), generator=g)
    mixing = torch.randn(6, 2, 8, 16), torch.randn(6, 2, 16, 16), torch.randn(6, 2, 12, 8)
    channel = torch.randn(4, 16, 4), torch.randn(6, 4, 4, 4), torch.randn(4, 4, 16)
    layout = dict(groups=2, in_channels=4, out_channels=4, in_points=3, out_points=5)
    return {
        "lors_linear": (lk.lors_linear, (x, weight, down, up), {}),
        "lors_linear_keywords": (lk.lors_linear, (x, weight, down), dict(up=up, bias=bias, scaling=0.5)),
        "lors_linear_indexed": (
            lk.lors_linear,
            (x, weight, down[None].expand(3, 8, 64), up[None].expand(3, 32, 8)),
            dict(index=torch.tensor([2, -1, 0, 2]), ranks=[8, 2, 5], scaling=0.5),
        ),
        "adaptive_mixing": (lk.adaptive_mixing, mixing, dict(channel_private=channel, eps=1e-6)),
        "generate_mixing_weights": (lk.generate_mixing_weights, (torch.randn(3, 16), torch.randn(62, 16)), layout),
        "select_windows": (lk.select_windows, (scores, (4, 8), (16, 32), 3), {}),
        "select_topk_pixels": (lk.select_topk_pixels, (scores, (4, 8), (16, 32)), dict(k=40, per_query=True)),
        "sparse_cross_attention": (lk.sparse_cross_attention, (q, k, v, per_query), dict(scale=0.5)),
    }


@pytest.mark.parametrize("backend_name", ["auto", "reference"])
@pytest.mark.parametrize("name", list(public_calls()))
def test_public_route_is_the_route_of_the_same_call(name, backend_name, use_backend, monkeypatch):
    """fn.route takes the public function's own arguments (keywords, defaults) and tells what fn runs."""
    use_backend(None if backend_name == "auto" else backend_name)
    fn, args, kwargs = public_calls()[name]
    chosen = []
    original = registry.Op.route
    monkeypatch.setattr(registry.Op, "route", lambda self, *a: chosen.append(original(self, *a)) or chosen[-1])
    told = fn.route(*args, **kwargs)
    fn(*args, **kwargs)
    assert len(chosen) == 2 and told is chosen[1], chosen
    if backend_name == "reference":
        assert told.backend == "reference"


def test_lors_linear_route_follows_its_arguments(use_backend):
    import lors_kernels as lk

    x, weight, down, up = torch.randn(4, 64), torch.randn(32, 64), torch.randn(8, 64), torch.randn(32, 8)
    small = "native" if registry.backend.native() is not None else "reference"
    assert lk.lors_linear.route(x, weight, down, up).backend == small
    assert lk.lors_linear.route(x, weight, down, up, bias=torch.randn(32), scaling=0.5).backend == small
    assert lk.lors_linear.route(x.double(), weight.double(), down.double(), up.double()).backend == "reference"
    assert lk.lors_linear.route(x.expand(64, 4, 64), weight, down, up, None).backend == "reference"  # 256 rows
    use_backend("reference")
    assert lk.lors_linear.route(x, weight, down, up).backend == "reference"
    with pytest.raises(ValueError, match="down"):  # checked as the call checks it
        lk.lors_linear.route(x, weight, down.t(), up)
    from lors_kernels.static.op import lors_linear_op  # the op's own route: the schema's arguments, any way given

    assert lors_linear_op.route(x, weight, down, up, bias=None, scaling=0.5).backend == "reference"
    with pytest.raises(TypeError, match="takes every argument of the op's schema .x, weight, down, up, bias, scaling"):
        lors_linear_op.route(x, weight, down, up, None)


def test_define_op_wants_the_reference_last():
    with pytest.raises(ValueError, match="the last implementation must be the reference"):
        define_op(
            "test_no_reference",
            "(Tensor x) -> Tensor",
            check=lambda x: None,
            fake=torch.empty_like,
            impls=[Impl("triton", "cuda", torch.relu)],
        )


@pytest.mark.parametrize("name", [n for n in op_calls() if not n.startswith("select")])
def test_activation_checkpointing_recomputes_the_same_gradients(name):
    """Non-reentrant checkpointing unpacks saved tensors lazily: an op may read them once only."""
    call = op_calls()[name]
    want = torch.autograd.grad(call.run().square().sum(), call.inputs)
    out = torch.utils.checkpoint.checkpoint(call.run, use_reentrant=False)
    for got, expected in zip(torch.autograd.grad(out.square().sum(), call.inputs), want):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("backend_name", ["native", "triton", "reference"])
@pytest.mark.parametrize("name", [n for n in op_calls() if not n.startswith("select")])
def test_gradients_taken_with_create_graph_are_differentiable_on_every_route(name, backend_name, use_backend):
    """A backward with create_graph=True (double backward, gradient penalties) gets the gradients the
    reference's autograd records, so a second gradient matches the reference route's."""

    def second_gradients():
        call = op_calls(KERNEL_DEVICE, torch.float32)[name]
        out = call.run()
        out = out[0] if isinstance(out, tuple) else out
        first = torch.autograd.grad((out * out).sum(), call.inputs, create_graph=True, allow_unused=True)
        penalty = sum((g * g).sum() for g in first if g is not None)
        return torch.autograd.grad(penalty, call.inputs, allow_unused=True)

    # The reference's attention is PyTorch's SDPA, whose CPU flash kernel has no double backward; its math
    # kernel has one.
    with sdpa_kernel([SDPBackend.MATH]):
        use_backend("reference")
        expected = second_gradients()
        use_backend(backend_name)
        try:
            got = second_gradients()
        except RuntimeError as error:  # on a GPU: no native CUDA kernel for adaptive mixing or attention
            if not no_kernel(error):
                raise
            pytest.skip(f"backend {backend_name!r} has no kernel for {name} on {KERNEL_DEVICE}")
    for i, (g, e) in enumerate(zip(got, expected)):
        assert (g is None) == (e is None), i
        if g is not None:
            assert_close(g, e.double(), torch.float32, f"second gradient {i}")


def _call_with(name, **changes):
    """A small valid call of each public op with some arguments replaced."""
    g = torch.Generator().manual_seed(0)
    t = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    calls = {
        "lors_linear": (lk.lors_linear, dict(x=t(2, 4), weight=t(3, 4), down=t(1, 4), up=t(3, 1), scaling=0.5)),
        "adaptive_mixing": (lk.adaptive_mixing, dict(x=t(2, 1, 3, 4), M=t(2, 1, 4, 4), S=t(2, 1, 3, 3), eps=1e-5)),
        "generate_mixing_weights": (
            lk.generate_mixing_weights,
            dict(
                query=t(2, 8), gen_weight=t(20, 8), groups=2, in_channels=2, out_channels=2, in_points=2, out_points=3
            ),
        ),
        "sparse_cross_attention": (
            lk.sparse_cross_attention,
            dict(q=t(1, 1, 2, 4), k=t(1, 1, 3, 4), v=t(1, 1, 3, 4), index=torch.tensor([[0, 2]]), scale=0.5),
        ),
    }
    fn, kwargs = calls[name]
    return lambda: fn(**{**kwargs, **changes})


BAD_ARGUMENTS = {
    "lors_linear-x_list": ("lors_linear", dict(x=[[1.0] * 4]), r"lors_linear: x must be a Tensor, got list"),
    "lors_linear-scaling_str": ("lors_linear", dict(scaling="big"), r"scaling must be a number, got 'big'"),
    "adaptive_mixing-x_list": ("adaptive_mixing", dict(x=[1.0]), r"adaptive_mixing: x must be a Tensor, got list"),
    "adaptive_mixing-M_none": ("adaptive_mixing", dict(M=None), r"M must be a Tensor, got NoneType"),
    "adaptive_mixing-eps_str": ("adaptive_mixing", dict(eps="small"), r"eps must be a number, got 'small'"),
    "generate-query_list": ("generate_mixing_weights", dict(query=[1.0]), r"query must be a Tensor, got list"),
    "generate-gen_weight_array": ("generate_mixing_weights", dict(gen_weight=(1, 2)), r"gen_weight must be a Tensor"),
    "attention-k_list": ("sparse_cross_attention", dict(k=[1.0]), r"k must be a Tensor, got list"),
    "attention-scale_str": ("sparse_cross_attention", dict(scale="auto"), r"scale must be a number, got 'auto'"),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_arguments_of_the_wrong_kind_are_named(case):
    name, changes, message = BAD_ARGUMENTS[case]
    with pytest.raises(TypeError, match=message):
        _call_with(name, **changes)()


def _export_cases():
    """name: (the call, its inputs), every op at small sizes; the attention's index with padding."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, std=1.0):
        return torch.randn(*shape, generator=g) * std

    index = torch.randint(-1, 12, (2, 5), generator=g)
    return {
        "lors_linear": (
            lambda x, w, d, u, b: lk.lors_linear(x, w, d, u, b, scaling=0.5),
            (rand(2, 3, 8), rand(6, 8), rand(2, 8), rand(6, 2), rand(6)),
        ),
        "adaptive_mixing": (
            lambda x, m, s, e, q, f: lk.adaptive_mixing(x, m, s, channel_private=(e, q, f)),
            (
                rand(3, 2, 4, 5),
                rand(3, 2, 5, 6, std=0.4),
                rand(3, 2, 7, 4, std=0.5),
                rand(2, 5, 2),
                rand(3, 2, 2, 2),
                rand(2, 2, 6),
            ),
        ),
        "generate_mixing_weights": (
            lambda q, w, b, cw, cb: lk.generate_mixing_weights(
                q, w, b, cw, cb, groups=2, in_channels=2, out_channels=3, in_points=3, out_points=2, rank=1
            ),
            (rand(2, 3, 5), rand(2 * (6 + 6), 5), rand(24), rand(4, 5), rand(4)),
        ),
        "select_windows": (lambda s: lk.select_windows(s, (4, 8), (16, 32), 3), (rand(2, 5, 32),)),
        "select_topk_pixels": (
            lambda s: lk.select_topk_pixels(s, (4, 8), (16, 32), 40, per_query=True),
            (rand(2, 5, 32),),
        ),
        "sparse_cross_attention_shared": (
            lk.sparse_cross_attention,
            (rand(2, 2, 4, 8), rand(2, 2, 12, 8), rand(2, 2, 12, 8), index),
        ),
        "sparse_cross_attention_per_query": (
            lk.sparse_cross_attention,
            (rand(2, 2, 4, 8), rand(2, 2, 12, 8), rand(2, 2, 12, 8), index[:, None].expand(2, 4, 5).contiguous()),
        ),
    }


class _Call(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *inputs):
        return self.fn(*inputs)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize("name", list(_export_cases()))
def test_export_holds_standard_ops_and_onnx_runs_them(name):
    """torch.export records each op's reference (standard ops, no lors:: node), so the program runs without
    lors_kernels and torch.onnx.export translates it; onnxruntime gives the eager outputs, the selections'
    ties included (ONNX's TopK breaks them to the lower index, as the selection does)."""
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    fn, inputs = _export_cases()[name]
    model = _Call(fn).eval()
    expected = model(*inputs)
    expected = list(expected) if isinstance(expected, tuple) else [expected]
    program = torch.export.export(model, inputs)
    assert not [n.target for n in program.graph.nodes if "lors" in str(n.target)]
    got = program.module()(*inputs)
    for e, o in zip(expected, list(got) if isinstance(got, tuple) else [got]):
        if name.startswith("select"):  # torch.topk, run by PyTorch, orders ties as it likes (ONNX's TopK does not)
            assert o.shape == e.shape and o.dtype == e.dtype
        else:
            torch.testing.assert_close(o, e)
    onnx = torch.onnx.export(model, inputs, dynamo=True, verbose=False)
    for e, o in zip(expected, onnx(*inputs)):
        torch.testing.assert_close(torch.as_tensor(o), e, rtol=1e-5, atol=1e-5)
