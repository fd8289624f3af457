"""The op registry: every op of the package is defined once, by :func:`define_op`.

An op is a schema, its input checks, a fake (output shapes for torch.compile) and an ordered table of
implementations (:class:`Impl`). From these ``define_op`` builds

- the custom op ``lors::<name>`` (opaque to torch.compile) with its fake,
- when the op has gradients, the backward op ``lors::<name>_backward``, its fake, and the autograd
  registration linking the two,
- the eager twin: one autograd.Function over the same forwards and backwards, so that eager calls
  skip torch.library's Python dispatch (~30 us a call, more than a whole small kernel),
- the public entry (:class:`Op` ``__call__``): check, choose the route once, run it.

The public function (:func:`public`) turns the user's arguments into the op's and calls the op; its
``route`` takes the same arguments and tells which implementation that call takes.

The route is the first implementation of the table that runs on the inputs' device, fits the case
and wins it (or, with a backend forced, the first of that backend that fits). An eager call chooses
it once and keeps it on ctx for the backward. A compiled graph chooses when its forward op runs and
again in the backward op, from the same case: a route depends only on the case and the override.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ParamSpec

import torch

from . import backend

P = ParamSpec("P")


def require_tensors(op: str, **named: object) -> None:
    """A clear error for the first argument that is not a Tensor (None is the op's own checks' to judge)."""
    for name, t in named.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")


def as_float(op: str, name: str, value: object) -> float:
    """A number argument as a float, or a clear error naming it."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{op}: {name} must be a number, got {value!r}") from None


def shape_str(t: torch.Tensor) -> str:
    """ "[2, 3]" for error messages that name the shapes they saw."""
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """[..., F] -> [rows, F] (a view when strides allow); explicit sizes, since F or rows may be 0."""
    return t if t.dim() == 2 else t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def _always(case) -> bool:
    return True


@dataclasses.dataclass(frozen=True)
class Impl:
    """One implementation of an op.

    ``forward(*args)`` returns the schema's outputs; ``backward(saved, *grads)`` one gradient (or None)
    per input named in the op's ``grads``, where ``saved`` holds the inputs and saved outputs by name
    and ``saved.needs`` which gradients are asked for. ``fits(case)`` says whether it takes the call
    at all (dtype, sizes, what was built), ``wins(case)`` whether the automatic choice takes it
    (measured faster); ``case`` is the inputs by name.
    """

    backend: str  # "triton", "native" or "reference"
    device: str | None  # "cuda" or "cpu"; None: any (the reference)
    forward: Callable
    backward: Callable | None = None
    fits: Callable = _always
    wins: Callable = _always
    auto: bool = True  # False: runs only when its backend is forced
    train: Callable | None = None  # the forward of a recording call: fills outputs the backward reads
    eager: Callable | None = None  # a PyTorch forward recorded by autograd itself (eager calls only)
    takes: str = ""  # what it takes, for the error when it is forced and does not fit

    def of(self, forced: str) -> bool:
        """Whether forcing the backend `forced` selects this implementation ("cuda": native CUDA kernels)."""
        return self.backend == forced or (forced == "cuda" and self.backend == "native" and self.device == "cuda")

    def runs_on(self, device: torch.device, forced: bool) -> bool:
        if self.backend == "reference":
            return True
        if self.backend == "triton":  # on CPU tensors only under the interpreter, and only when forced
            return backend.triton_runs_on(device) if forced else device.type == "cuda" and backend.triton_available()
        return device.type == self.device and backend.native() is not None


def cuda_time_ms(fn: Callable, args: tuple, calls: int = 5) -> float:
    """Median of `calls` timed calls of fn(*args) after one warm-up (CUDA events)."""
    fn(*args)
    times = []
    for _ in range(calls):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn(*args)
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    return sorted(times)[len(times) // 2]


class Measured:
    """``wins`` by measurement: the first call of a shape class times this implementation's forward against
    the rival backend's (like Triton's autotuner) and keeps the verdict per (device, shape class); later
    calls read it. ``key(case)`` is the shape class (dtype included). Nothing is timed while a CUDA graph
    is captured (an untimed class then takes this implementation), nor off CUDA devices."""

    def __init__(self, key: Callable, rival: str = "reference", timer: Callable = cuda_time_ms) -> None:
        self.key, self.rival, self.timer = key, rival, timer
        self.verdicts: dict = {}
        self.op = self.impl = None  # set by the Op that lists it

    def __call__(self, case: tuple) -> bool:
        device = _device(case)
        if device.type != "cuda":
            return True
        key = (device.index, self.key(case))
        verdict = self.verdicts.get(key)
        if verdict is None:
            if _capturing(device):
                return True
            rival = next(i for i in self.op.impls if i.backend == self.rival and i.fits(case))
            mine = self.timer(lambda *a: _run(self.impl, self.impl.forward, a, device), tuple(case))
            theirs = self.timer(lambda *a: _run(rival, rival.forward, a, device), tuple(case))
            verdict = self.verdicts[key] = mine <= theirs
        return verdict


def _parse(name: str, schema: str):
    """(argument declarations as written, argument names, output names) of ``(args) -> outputs``."""
    parsed = torch._C.parse_schema(f"lors::{name}{schema}")
    declared = schema[schema.index("(") + 1 : schema.rindex(")", 0, schema.index("->"))]
    names = [a.name for a in parsed.arguments]
    outputs = [r.name or "out" for r in parsed.returns]
    return declared, names, outputs


def _device(args) -> torch.device:
    """Where a call runs: its first input's device (every op's first input is a tensor)."""
    return args[0].device


def _capturing(device: torch.device) -> bool:
    """A CUDA graph is being captured on the current stream: no host sync, no timing."""
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _run(impl: Impl, fn: Callable, args, device: torch.device):
    """One call of an implementation, launching on the inputs' device."""
    if device.type == "cuda" and impl.backend != "reference":
        with torch.cuda.device(device):
            return fn(*args)
    return fn(*args)


class Op:
    """A defined op, called with the schema's arguments; ``route(*args)`` tells which implementation runs."""

    def __init__(
        self,
        name: str,
        schema: str,
        *,
        check: Callable,
        fake: Callable,
        impls: Iterable[Impl],
        returns: int | None,
        grads: Sequence[str],
        save: Sequence[str],
        validate: Callable | None,
    ) -> None:
        self.name = name
        declared, self.args, self.outputs = _parse(name, schema)
        self.impls = tuple(impls)
        if self.impls[-1].backend != "reference":
            raise ValueError(f"{name}: the last implementation must be the reference, which takes every case")
        for impl in self.impls:
            if isinstance(impl.wins, Measured):
                impl.wins.op, impl.wins.impl = self, impl
        self.check, self.validate = check, validate
        self.returns = len(self.outputs) if returns is None else returns
        self.Case = collections.namedtuple(f"{name}_case", self.args)
        self.grads = tuple(self.args.index(g) for g in grads)
        self.Needs = collections.namedtuple(f"{name}_needs", grads) if grads else None
        self.saved_outputs = tuple(self.outputs.index(s) for s in save)
        self.Saved = collections.namedtuple(f"{name}_saved", [*self.args, *save, "needs"])
        self.twin = self._twin() if grads else None

        self.op = torch.library.custom_op(f"lors::{name}", self._op_forward, mutates_args=(), schema=schema)
        self.op.register_fake(self._fake_forward(fake))
        if grads:
            backward_schema = f"(Tensor[] grads, Tensor[] outputs, bool[] needs, {declared}) -> Tensor[]"
            self.backward_op = torch.library.custom_op(
                f"lors::{name}_backward", self._op_backward, mutates_args=(), schema=backward_schema
            )
            self.backward_op.register_fake(self._fake_backward)
            self.op.register_autograd(self._compiled_backward, setup_context=self._setup)

    # ---------------------------------------------------------------------------------- choosing

    def route(self, *args: Any, **kwargs: Any) -> Impl:
        """The implementation that runs this call (the schema's arguments, by position or name): the
        override if any, else the automatic choice."""
        try:
            case = self.Case(*args, **kwargs)
        except TypeError as error:
            raise TypeError(
                f"{self.name}_op.route takes every argument of the op's schema ({', '.join(self.args)}), which has "
                f"no defaults; lk.{self.name}.route takes the public function's arguments ({error})"
            ) from None
        device = _device(case)
        forced = backend.forced_backend()
        if forced is None:
            kind = device.type
            for impl in self.impls:  # the reference, last, takes every case
                if (
                    impl.auto
                    and impl.device in (kind, None)
                    and impl.runs_on(device, False)
                    and impl.fits(case)
                    and impl.wins(case)
                ):
                    return impl
        chosen = [impl for impl in self.impls if impl.of(forced)]
        if forced == "cuda" and device.type != "cuda":
            raise RuntimeError(self._refusal(forced, chosen, device))
        if not chosen:  # the op has no kernel of that backend at all: its reference runs
            forced, chosen = "reference", [impl for impl in self.impls if impl.backend == "reference"]
        for impl in chosen:
            if impl.runs_on(device, True) and impl.fits(case):
                return impl
        raise RuntimeError(self._refusal(forced, chosen, device))

    def _refusal(self, forced: str, chosen, device: torch.device) -> str:
        if forced == "triton" and not backend.triton_runs_on(device):
            return f"lors_kernels backend 'triton' cannot run on {device.type} tensors here: " + (
                "triton is not installed"
                if not backend.triton_available()
                else "set TRITON_INTERPRET=1 before importing lors_kernels to run Triton on CPU tensors"
            )
        if forced == "cuda" and device.type != "cuda":
            return (
                f"lors_kernels backend 'cuda' runs the native CUDA kernels, on CUDA tensors; this call of "
                f"{self.name} is on {device.type} (backend 'native' runs the C++ CPU kernels)"
            )
        if forced in ("native", "cuda") and backend.native() is None:
            why = f"extension not built: {backend.native_error()}"
        else:
            why = "; ".join(f"{impl.device}: {impl.takes or 'other cases'}" for impl in chosen)
            why = f"it takes {why}"
        return f"lors_kernels backend '{forced}' has no kernel for this call of {self.name} on {device.type} ({why})"

    # ------------------------------------------------------------------------------------ eager

    def __call__(self, *args: Any) -> Any:
        if torch.compiler.is_compiling():
            if torch.compiler.is_exporting():  # an exported program holds standard ops (ONNX knows them)
                self.check(*args)
                return self._visible(self.impls[-1].forward(*args))
            return self._visible(self.op(*args))
        self.check(*args)
        if self.validate is not None:  # eager: a clear error, unless a CUDA graph is being captured
            self.validate(*args, sync=not _capturing(_device(args)))
        impl = self.route(*args)
        if impl.eager is not None:
            return impl.eager(*args)
        if self.twin is not None and self._recording(args):
            return self._visible(self.twin.apply(impl, *args))
        return self._visible(_run(impl, impl.forward, args, _device(args)))

    def _recording(self, args) -> bool:
        if not torch.is_grad_enabled():
            return False
        return any(args[i] is not None and args[i].requires_grad for i in self.grads)

    def _visible(self, outputs):
        if len(self.outputs) == 1 or self.returns == len(self.outputs):
            return outputs
        return outputs[0] if self.returns == 1 else outputs[: self.returns]

    def _twin(self):
        op = self

        def forward(ctx, impl, *args):
            outputs = _run(impl, impl.train or impl.forward, args, _device(args))
            ctx.impl = impl
            op._setup(ctx, args, outputs)
            return outputs

        def backward(ctx, *grads):
            needs = ctx.needs_input_grad[1:]
            inputs, outputs = op._unpack(ctx)
            if torch.is_grad_enabled():  # create_graph=True: the gradients must be differentiable themselves
                return None, *op._recorded_grads(inputs, needs, grads[: op.returns])
            result = op._backward(ctx.impl, inputs, outputs, [needs[i] for i in op.grads], grads[: op.returns])
            return None, *op._spread(result, needs)

        # Built by type() so that autograd names its nodes after the op (LorsLinearFunctionBackward).
        title = "".join(part.title() for part in self.name.split("_")) + "Function"
        return type(
            title, (torch.autograd.Function,), {"forward": staticmethod(forward), "backward": staticmethod(backward)}
        )

    # ---------------------------------------------------------------------------- saving for backward

    def _setup(self, ctx, inputs, output):
        """Keep the inputs and the outputs the backward reads (torch.library's setup_context signature)."""
        outputs = output if isinstance(output, tuple) else (output,)
        hidden = outputs[self.returns :]
        if hidden:
            ctx.mark_non_differentiable(*hidden)
        ctx.save_for_backward(
            *[a if isinstance(a, torch.Tensor) else None for a in inputs], *[outputs[i] for i in self.saved_outputs]
        )
        ctx.constants = [None if isinstance(a, torch.Tensor) else a for a in inputs]

    def _unpack(self, ctx):
        """(the forward's inputs, its saved outputs), back from what _setup kept. saved_tensors is read
        once: under activation checkpointing each read recomputes and a second one is an error."""
        tensors = ctx.saved_tensors
        n = len(self.args)
        return [t if c is None else c for t, c in zip(tensors[:n], ctx.constants)], tensors[n:]

    def _backward(self, impl: Impl, args, outputs, needs, grads):
        """impl's backward, given the inputs and saved outputs by name."""
        saved = self.Saved(*args, *outputs, self.Needs(*needs))
        return _run(impl, impl.backward, (saved, *grads), _device(args))

    def _recorded_grads(self, inputs, needs, grads) -> list:
        """The gradients as autograd computes them through the reference, recorded: what a backward with
        create_graph=True gets (double backward, gradient penalties), whatever route ran the forward,
        since the kernels' own backwards are not differentiable."""
        reference = self.impls[-1]
        outputs = reference.forward(*inputs)  # the written-out forward: twice differentiable (SDPA on CPU is not)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs[: self.returns], grads) if o.requires_grad]
        wrt = [i for i, need in enumerate(needs) if need]
        result = torch.autograd.grad(
            [o for o, _ in pairs], [inputs[i] for i in wrt], [g for _, g in pairs], create_graph=True, allow_unused=True
        )
        recorded = [None] * len(inputs)
        for i, g in zip(wrt, result):
            recorded[i] = g
        return recorded

    def _spread(self, result, needs):
        """One gradient per input (None where not asked for) from one per differentiable input."""
        grads = [None] * len(self.args)
        for i, g in zip(self.grads, result):
            grads[i] = g if needs[i] else None
        return grads

    # ---------------------------------------------------------------------------------- compiled

    def _op_forward(self, *args):
        self.check(*args)
        if self.validate is not None:  # compiled graphs (maybe CUDA graphs too): no host sync on a GPU
            self.validate(*args, sync=_device(args).type != "cuda")
        impl = self.route(*args)
        outputs = _run(impl, impl.forward, args, _device(args))
        # Outputs as the fake made them: fresh, dense.
        if isinstance(outputs, tuple):
            return tuple(o.contiguous() for o in outputs)
        return outputs.contiguous()

    def _fake_forward(self, fake):
        def run(*args):
            self.check(*args)
            return fake(*args)

        return run

    def _compiled_backward(self, ctx, *grads):
        needs = [bool(ctx.needs_input_grad[i]) for i in self.grads]
        inputs, outputs = self._unpack(ctx)
        result = self.backward_op(list(grads[: self.returns]), list(outputs), needs, *inputs)
        return tuple(self._spread(result, ctx.needs_input_grad))

    def _op_backward(self, grads, outputs, needs, *args):
        result = self._backward(self.route(*args), args, outputs, needs, grads)
        return [g.contiguous() if need else grads[0].new_empty(0) for g, need in zip(result, needs)]

    def _fake_backward(self, grads, outputs, needs, *args):
        return [
            args[i].new_empty(args[i].shape) if need else grads[0].new_empty(0) for i, need in zip(self.grads, needs)
        ]


def define_op(
    name: str,
    schema: str,
    *,
    check: Callable,
    fake: Callable,
    impls: Iterable[Impl],
    returns: int | None = None,
    grads: Iterable[str] = (),
    save: Iterable[str] = (),
    validate: Callable | None = None,
) -> Op:
    """Define the op ``lors::<name>``.

    schema: ``"(Tensor x, ..., float scaling) -> Tensor"`` (name multiple outputs: ``-> (Tensor out,
    Tensor lse)``). check(*args): raise a clear error for bad input (eager calls, the fake and the op).
    validate(*args, sync): checks of values (eager calls and the op); with sync False they must not
    wait for the device (in compiled graphs and CUDA-graph capture: a device-side assert). fake(*args):
    outputs of the right shapes. impls: the table, the reference last. returns: how many outputs the
    public call returns (the others only feed the backward). grads: the inputs that get gradients.
    save: the outputs the backward reads (the inputs are always saved).
    """
    return Op(
        name,
        schema,
        check=check,
        fake=fake,
        impls=impls,
        returns=returns,
        grads=tuple(grads),
        save=tuple(save),
        validate=validate,
    )


def public(*ops: Op, finish: Callable | None = None) -> Callable[[Callable[P, tuple]], Callable[P, Any]]:
    """Decorator making the public function of ``ops`` from ``arguments``, a function with the public
    signature and docstring that returns the op's arguments (its schema's, in order); a function over
    several ops (lors_linear with and without ``index``) returns ``(op, arguments)``, the op one of them.

    The decorated function keeps the parameters of ``arguments`` but returns the op's outputs (one tensor
    or a tuple of them), not its arguments: it calls the op on what ``arguments`` returns and returns the
    outputs, or ``finish(outputs, *args, **kwargs)`` given the public arguments. Its ``route(*args,
    **kwargs)`` takes the public arguments too: the implementation that call takes (its inputs checked as
    the call checks them), without running it.
    """

    def make(arguments: Callable[P, tuple]) -> Callable[P, Any]:
        def call(*args, **kwargs) -> tuple[Op, tuple]:
            chosen = arguments(*args, **kwargs)
            return (ops[0], chosen) if len(ops) == 1 else chosen

        @functools.wraps(arguments)
        def function(*args: P.args, **kwargs: P.kwargs) -> Any:
            op, op_args = call(*args, **kwargs)
            outputs = op(*op_args)
            return outputs if finish is None else finish(outputs, *args, **kwargs)

        def route(*args: P.args, **kwargs: P.kwargs) -> Impl:
            op, op_args = call(*args, **kwargs)
            op.check(*op_args)
            return op.route(*op_args)

        function.route = route
        # help() and IDEs show the public parameters; what the call returns is the docstring's to say.
        function.__signature__ = inspect.signature(arguments).replace(return_annotation=inspect.Signature.empty)
        return function

    return make
