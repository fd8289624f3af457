"""Devices, dtypes and tolerances shared by the tests of every op family."""

import contextlib
import pathlib
import shutil
import subprocess
import sys
import types
import typing

import pytest
import torch
from torch import nn

import lors_kernels as lk

CUDA = torch.cuda.is_available()
# Devices the Triton kernels are tested on: the interpreter on CPU, the real thing on a GPU.
KERNEL_DEVICE = "cuda" if CUDA else "cpu"
# The interpreter's bf16 arithmetic is not faithful (docs/design.md §5): bf16 is tested on GPUs only.
KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
# Relative-norm error allowed against a float64 reference, by the inputs' dtype.
RTOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}
# The checkout: csrc/ beside python_tests/.
ROOT = pathlib.Path(__file__).resolve().parents[1]
CXX = shutil.which("c++") or shutil.which("g++")


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64; a NaN or inf anywhere fails."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    if not torch.isfinite(actual).all():
        return float("inf")
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def assert_close(actual, expected, dtype, what=""):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype} != {dtype}"
    err = rel_err(actual, expected)
    assert err <= RTOL[dtype], f"{what}: relative error {err:.2e} > {RTOL[dtype]:.0e} ({dtype_id(dtype)})"


class Call(typing.NamedTuple):
    run: typing.Callable  # () -> the op's output
    inputs: tuple  # the float tensors it reads


def op_calls(device="cpu", dtype=torch.float32, grad=True, seed=0):
    """One small call of every public op, on fixed inputs: {name: Call}. Float inputs require gradients
    when `grad`; the privates of adaptive mixing are included."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype).requires_grad_(grad)

    scores = torch.rand(2, 5, 4 * 8, generator=g).to(device=device, dtype=dtype)
    linear = (rand(37, 64), rand(48, 64, std=0.125), rand(8, 64, std=0.125), rand(48, 8, std=0.35), rand(48))
    # Rows at four layers of a stack (and -1), ranks 8, 3, 0, 5, a bias per layer, scaling per layer.
    stacked = (linear[0], linear[1], rand(4, 8, 64, std=0.125), rand(4, 48, 8, std=0.35), rand(4, 48), rand(4))
    layer_of_row = (torch.arange(37) % 5 - 1).to(device)
    ranks = torch.tensor([8, 3, 0, 5], device=device)
    bn, groups, p_in, c, p_out, r, k = 6, 2, 8, 16, 12, 4, 2
    mixing = (rand(bn, groups, p_in, c), rand(bn, groups, c, c, std=0.25), rand(bn, groups, p_out, p_in, std=0.35))
    channel = (rand(groups * k, c, r, std=0.25), rand(bn, groups * k, r, r, std=0.5), rand(groups * k, r, c, std=0.5))
    spatial = (
        rand(groups * k, p_out, r, std=0.5),
        rand(bn, groups * k, r, r, std=0.5),
        rand(groups * k, r, p_in, std=0.35),
    )
    shape = dict(groups=2, in_channels=4, out_channels=4, in_points=3, out_points=5)
    generation = (rand(2, 3, 16), rand(2 * (16 + 15), 16, std=0.25), rand(2 * (16 + 15)))
    attention = (rand(2, 2, 5, 16), rand(2, 2, 64, 16), rand(2, 2, 64, 16))
    shared = torch.randint(-1, 64, (2, 24), generator=g).to(device)
    per_query = torch.randint(-1, 64, (2, 5, 24), generator=g).to(device)
    return {
        "lors_linear": Call(lambda: lk.lors_linear(*linear, scaling=0.5), linear),
        "lors_linear_indexed": Call(
            lambda: lk.lors_linear(*stacked[:5], scaling=stacked[5], index=layer_of_row, ranks=ranks), stacked
        ),
        "adaptive_mixing": Call(
            lambda: lk.adaptive_mixing(*mixing, channel_private=channel, spatial_private=spatial),
            mixing + channel + spatial,
        ),
        "generate_mixing_weights": Call(lambda: lk.generate_mixing_weights(*generation, **shape)[1], generation),
        "select_windows": Call(lambda: lk.select_windows(scores, (4, 8), (16, 32), 3), (scores,)),
        "select_topk_pixels": Call(
            lambda: lk.select_topk_pixels(scores, (4, 8), (16, 32), 40, per_query=True), (scores,)
        ),
        "sparse_cross_attention_shared": Call(lambda: lk.sparse_cross_attention(*attention, shared), attention),
        "sparse_cross_attention_per_query": Call(lambda: lk.sparse_cross_attention(*attention, per_query), attention),
    }


class FakeCudaTensor(torch.Tensor):
    """A CPU tensor that claims to be on a GPU (cuda:0, or the index set on the class): what dispatch
    looks at, without one. Results of ops on it are FakeCudaTensors too."""

    cuda_index = 0

    @property
    def device(self):
        return torch.device("cuda", self.cuda_index)

    @property
    def is_cuda(self):
        return True

    @property
    def is_cpu(self):
        return False


def fake_cuda(t, index=0):
    cls = FakeCudaTensor if index == 0 else type(f"FakeCuda{index}Tensor", (FakeCudaTensor,), {"cuda_index": index})
    return t.as_subclass(cls)


def run_cli(*args):
    """`python -m lors_kernels *args`, its output captured."""
    return subprocess.run([sys.executable, "-m", "lors_kernels", *args], capture_output=True, text=True, check=False)


def fake_native_extension(monkeypatch, **kernels):
    """Installs, for the test, an extension built with CUDA holding `kernels` (name=function), each
    recording its calls; returns (module, calls), a call being (name, args)."""
    from lors_kernels import backend

    calls = []

    def recorder(name, result):
        def run(*args):
            calls.append((name, args))
            return result(*args)

        return run

    module = types.SimpleNamespace(
        built_backends=lambda: ["cpu", "cuda"], **{name: recorder(name, kernel) for name, kernel in kernels.items()}
    )
    monkeypatch.setattr(backend, "native", lambda: module)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())  # the launch guard
    return module, calls


def cuda_extension():
    """lors_kernels._C where it runs its CUDA kernels (a GPU, and the extension built with CUDA), else None."""
    from lors_kernels import backend

    native = backend.native() if CUDA else None
    return native if native is not None and "cuda" in native.built_backends() else None


needs_cuda_extension = pytest.mark.skipif(
    cuda_extension() is None, reason="needs a GPU and lors_kernels._C built with CUDA (LORS_KERNELS_BUILD_CUDA=1)"
)


def route_device(route):
    """Where a test of a forced route puts its tensors: the kernel device for Triton, else the CPU."""
    return KERNEL_DEVICE if route == "triton" else "cpu"


def no_kernel(error):
    """The forced route has no kernel for this case (a dtype, size or device it does not take)."""
    return "has no kernel for this call" in str(error) or "cannot run on" in str(error)


# Tests that run Triton kernels on CPU tensors (forced routes, fake CUDA tensors over CPU data): only the
# interpreter does that, and a machine with a GPU runs the compiled kernels instead.
needs_interpreter = pytest.mark.skipif(CUDA, reason="runs Triton on CPU tensors: the interpreter, not used with a GPU")
# What the native CUDA kernels take.
GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# Models with LORS layers, which the static family's module tests and the interop tests share.


def random_pairs(module, seed=0):
    """Non-zero private pairs (up starts at zero) so that every term shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, lk.LorsLinear):
                layer.up.copy_(torch.randn(layer.up.shape, generator=g) * 0.3)
    return module


def own_layer(seed=0):
    torch.manual_seed(seed)
    return random_pairs(lk.LorsLinear(6, 4, rank=2), seed)


class Stacked(nn.Module):
    """Two LORS stacks (one reachable under two names) and a plain layer."""

    def __init__(self):
        super().__init__()
        self.blocks = lk.make_lors_stack(3, 8, 8, rank=2)
        self.heads = lk.make_lors_stack(2, 8, 5, rank=[1, 3], init="xavier")
        self.alias = self.heads[1]
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.out(self.heads[0](x) + self.heads[1](x))


class Mlp(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.fc2, self.head = nn.Linear(10, 16), nn.Linear(16, 16, bias=False), nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def peft_model(model, seed=1, **config):
    """PEFT's own LoRA model on ``model``, with random lora_B (PEFT starts it at zero)."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    config = {"r": 4, "lora_alpha": 6, "target_modules": ["fc1", "fc2"], **config}
    model = get_peft_model(model, LoraConfig(**config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def tiny_bert(seed=0):
    pytest.importorskip("transformers")
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=32,
    )
    return BertModel(config).eval()


TARGETS = ["encoder.layer.*.attention.self.query", "encoder.layer.*.intermediate.dense", "encoder.layer.*.output.dense"]
