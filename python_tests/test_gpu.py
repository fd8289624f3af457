"""What only a GPU shows: every op captured in a CUDA graph and replayed, deterministic mode bitwise
the same twice, a non-default current device, torch.compile(mode="reduce-overhead"). Skipped without
CUDA; `python -m lors_kernels gpu-check` runs them with the rest of the CUDA suite."""

import os

# cuBLAS is deterministic only with a fixed workspace; set before its first use in this process.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import CUDA, assert_close, op_calls  # noqa: E402

pytestmark = pytest.mark.skipif(not CUDA, reason="needs a GPU")
NAMES = list(op_calls())


def _outputs(out):
    return [out] if isinstance(out, torch.Tensor) else list(out)


@pytest.mark.parametrize("name", NAMES)
def test_cuda_graph_capture_and_replay(name):
    """Forward calls capture (no host sync, no allocation outside the graph's pool) and replay to the
    eager result on new inputs."""
    with torch.no_grad():
        call = op_calls("cuda", torch.bfloat16, grad=False)[name].run
        eager = call()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
            call()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = call()
        graph.replay()
        torch.cuda.synchronize()
    for got, want in zip(_outputs(captured), _outputs(eager)):
        assert torch.equal(got, want), name


def _step(name, dtype):
    """Forward and backward of one op on fresh inputs: (output, gradient of every input)."""
    call = op_calls("cuda", dtype, grad=True)[name]
    out = call.run()
    return out, torch.autograd.grad(out.float().square().sum(), call.inputs)


@pytest.mark.parametrize("name", [n for n in NAMES if not n.startswith("select")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_deterministic_mode_is_bitwise_repeatable(name, dtype):
    saved = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = _step(name, dtype), _step(name, dtype)
    finally:
        torch.use_deterministic_algorithms(saved)
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[1], second[1]):
        assert torch.equal(a, b), name


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("name", NAMES)
def test_inputs_on_a_device_that_is_not_current(name):
    """Tensors on cuda:1 while cuda:0 is current: every launch goes to the tensors' device."""
    want = op_calls("cuda:0", torch.float32, grad=False)[name].run()
    with torch.cuda.device(0):
        got = op_calls("cuda:1", torch.float32, grad=False)[name].run()
    for g, w in zip(_outputs(got), _outputs(want)):
        assert g.device == torch.device("cuda:1")
        if g.dtype.is_floating_point:
            assert_close(g.cpu(), w.cpu().double(), torch.float32, name)
        else:
            assert torch.equal(g.cpu(), w.cpu())


@pytest.mark.parametrize("name", ["lors_linear", "sparse_cross_attention_shared", "sparse_cross_attention_per_query"])
def test_compile_reduce_overhead(name):
    """CUDA graphs through torch.compile: the ops must not sync the host inside the captured region."""
    call = op_calls("cuda", torch.bfloat16, grad=False)[name].run
    compiled = torch.compile(call, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        want = call()
        for _ in range(3):  # recording, then replays
            got = compiled()
    assert torch.equal(got, want), name
