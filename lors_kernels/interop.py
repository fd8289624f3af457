"""LORS models and the tools around them: PEFT LoRA adapters, Hugging Face and safetensors checkpoints.

- ``register_peft(config)``: ``peft.get_peft_model`` then puts LoRA adapters on LorsLinear layers too;
  ``all_linear(model)`` names what ``target_modules="all-linear"`` would, LORS layers included.
- ``load_lora(model, state_dict, config)``: a PEFT LoRA adapter checkpoint applied without PEFT, each
  adapted nn.Linear becoming a LorsLinear (one fused kernel for base + adapter).
- ``fuse_mixed_batches(model)``: PEFT's mixed-adapter batches (``model(x, adapter_names=[...])``) run as one
  ``lors_linear(..., index=)`` call per LoRA layer.
- ``lors_from_peft(peft_model)``: a PEFT LoRA model unloaded into LorsLinear layers, one stack per base weight
  its layers share (``LoraConfig(layer_replication=...)``).
- ``from_pretrained(model_class, directory)``: a converted Hugging Face model back from ``save_pretrained``
  (``lorsify`` records the stacks in ``config.lors``).
- ``save_model`` / ``load_model``: safetensors files of any module, the stacks in the file's metadata.

PEFT, transformers and safetensors are imported only by the functions that need them.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import sys
import warnings
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from . import hf
from .convert import lors_structure, replace_modules, restore_lors
from .static import LorsLinear, lors_linear
from .static.module import stack_pairs

__all__ = [
    "all_linear",
    "from_pretrained",
    "fuse_mixed_batches",
    "load_lora",
    "load_model",
    "lora_scaling",
    "lors_from_peft",
    "register_peft",
    "save_model",
]


def lora_scaling(lora_alpha: float, r: int, use_rslora: bool = False) -> float:
    """PEFT's LoRA scaling: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA (rank-stabilized)."""
    return lora_alpha / (math.sqrt(r) if use_rslora else r)


def register_peft(config: Any) -> Any:
    """Let ``peft.get_peft_model(model, config)`` adapt LorsLinear layers (``config`` a peft LoraConfig; returned).

    PEFT's own LoRA layer wraps a LorsLinear as it wraps an nn.Linear (through PEFT's experimental custom
    module API): same forward, ``merge()``, ``unmerge()``, ``merge_and_unload()``. Merging adds each
    adapter to the LorsLinear's private pair (``merge_lora``: rank R becomes R + r), exact on every
    layer of a stack, the shared weight untouched; unmerging restores the pair bit for bit. Without this
    registration PEFT refuses LorsLinear targets, also when
    loading a saved adapter: pass the registered config,
    ``PeftModel.from_pretrained(model, path, config=register_peft(LoraConfig.from_pretrained(path)))``.
    """
    config._register_custom_module({LorsLinear: _lora_over_lors()})
    return config


def all_linear(model: nn.Module) -> list[str]:
    """The names of every nn.Linear and LorsLinear of ``model`` but its output layer (a Hugging Face
    model's ``get_output_embeddings()``): what PEFT's ``target_modules="all-linear"`` means, LORS layers
    included (PEFT looks for nn.Linear only). ``LoraConfig(target_modules=interop.all_linear(model))``."""
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, LorsLinear)) and module is not output
    ]


@functools.cache
def _lora_over_lors() -> type:
    """PEFT's LoRA layer for a LorsLinear base. Merging concatenates each adapter to the base's private pair
    (``LorsLinear.merge_lora``): exact, and the shared weight of a stack is left alone, where PEFT's own
    merge writes a dense delta into the weight, which only a layer that owns its shared weight can take.
    Unmerging takes the adapters off in reverse order, the pair restored bit for bit."""
    import torch
    from peft.tuners.lora.layer import Linear
    from peft.tuners.tuners_utils import check_adapters_to_merge

    class LoraOverLors(Linear):
        def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
            return module.in_features, module.out_features  # (PEFT warns of any layer type it does not know)

        def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
            base = self.get_base_layer()
            for name in check_adapters_to_merge(self, adapter_names):
                if name not in self.lora_A:
                    continue
                if name in self.lora_variant:
                    raise NotImplementedError(
                        f"adapter {name!r} is a LoRA variant (DoRA, ...): it rescales the dense weight, which a "
                        "LorsLinear of a stack shares; merge plain LoRA adapters only"
                    )
                down, up = self.lora_A[name].weight, self.lora_B[name].weight
                if safe_merge and not (torch.isfinite(down).all() and torch.isfinite(up).all()):
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
                base.merge_lora(down, up, self.scaling[name])
                if self.lora_bias[name]:
                    with torch.no_grad():
                        base.bias += self.lora_B[name].bias * self.scaling[name]
                self.merged_adapters.append(name)

        def unmerge(self) -> None:
            if not self.merged:
                warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
                return
            base = self.get_base_layer()
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                if name in self.lora_A:
                    base.unmerge_lora(self.lora_A[name].weight.shape[0])
                    if self.lora_bias[name]:
                        with torch.no_grad():
                            base.bias -= self.lora_B[name].bias * self.scaling[name]

    return LoraOverLors


def fuse_mixed_batches(model: nn.Module) -> list[str]:
    """Make PEFT's mixed-adapter batches (``peft_model(x, adapter_names=[...])``, one adapter name per sample,
    ``"__base__"`` for none) run as ONE ``lors_linear(..., index=)`` call per LoRA layer, where PEFT runs the
    base layer and then each adapter of the batch on its rows. In place, on every plain PEFT LoRA
    ``Linear`` of ``model`` (over an nn.Linear, or a transformers Conv1D: PEFT's fan_in_fan_out); layers
    added later need another call. Returns the names of the fused layers.

    Per call, the adapters of the batch that the layer has are stacked (down = lora_A, up = lora_B, lower
    ranks zero-padded to the largest and passed as ``ranks``; PEFT's scaling per adapter); rows of
    ``"__base__"`` or of an adapter the layer lacks get the base layer alone, as in PEFT. The base bias
    and each adapter's lora_B bias times its scaling (lora_bias) become one bias per adapter. The stack is
    rebuilt on every call, so it follows the parameters as they train and gradients reach each adapter's
    lora_A / lora_B (and biases). Adapters kept in another dtype than the base (PEFT keeps those of a
    float16 / bfloat16 model in float32: autocast_adapter_dtype) are cast to the base's, the kernel taking
    one dtype: the result is PEFT's up to that dtype's rounding.

    PEFT's own ``_mixed_batch_forward`` runs instead when the batch holds a LoRA variant adapter of the
    layer (DoRA, aLoRA, MiCA, ...), when an adapter's lora_dropout is active (> 0 in training mode: only
    direct layer calls, as PeftModel refuses ``adapter_names`` in training), when the layer is merged,
    when the base layer has forward hooks (accelerate's offloading among them) or x another dtype than the
    base weight or autocast is on, and when no adapter of the layer is in the batch. LoRA layers of other
    kinds (Embedding, Conv, MultiheadAttention, quantized bases, LoRA over a LorsLinear) are left as PEFT's.
    """
    from peft.tuners.lora.layer import Linear

    fused = _fused_mixed_lora()
    names = []
    for name, module in model.named_modules():
        if type(module) is Linear and _linear_weight(module.get_base_layer()) is not None:
            module.__class__ = fused
        if type(module) is fused:
            names.append(name)
    return names


def _linear_weight(base: nn.Module) -> tuple[Tensor, Tensor | None] | None:
    """The weight [out, in] and the bias that ``base``'s forward applies when that forward is nn.Linear's or
    transformers' Conv1D's (weight stored [in, out], PEFT's fan_in_fan_out); None for other layers."""
    if type(base).forward is nn.Linear.forward:
        return base.weight, base.bias
    utils = sys.modules.get("transformers.pytorch_utils")  # no Conv1D exists unless transformers was loaded
    if utils is not None and type(base).forward is utils.Conv1D.forward:
        return base.weight.t(), base.bias
    return None


@functools.cache
def _fused_mixed_lora() -> type:
    """PEFT's LoRA Linear whose mixed-adapter batches run as one indexed lors_linear call (fuse_mixed_batches)."""
    import torch
    from peft.tuners.lora.layer import Linear

    class FusedMixedLora(Linear):
        def _mixed_batch_forward(self, x: Tensor, *args: Any, adapter_names: list[str], **kwargs: Any) -> Tensor:
            base = self.get_base_layer()
            weight, bias = _linear_weight(base)
            names = [n for n in dict.fromkeys(adapter_names) if n in self.lora_A]  # the batch's, once each
            if (
                not names
                or self.merged
                or base._forward_hooks
                or base._forward_pre_hooks
                or x.dtype != weight.dtype
                or torch.is_autocast_enabled(x.device.type)
                or any(
                    n in self.lora_variant or (self.lora_dropout[n].training and getattr(self.lora_dropout[n], "p", 0))
                    for n in names
                )
            ):
                return super()._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
            layer_of = {n: i for i, n in enumerate(names)}
            index = [layer_of.get(n, -1) for n in adapter_names]
            downs = [self.lora_A[n].weight for n in names]
            ups = [self.lora_B[n].weight for n in names]
            scalings = [self.scaling[n] for n in names]
            lora_biases = [self.lora_B[n].bias for n in names]
            if any(b is not None for b in lora_biases):
                # The op takes one bias, [out] for every row or [L, out] for the rows of each layer (none at -1):
                # the base bias joins each adapter's, and rows without an adapter take a pair of rank 0 holding
                # the base bias alone.
                own = weight.new_zeros(weight.shape[0]) if bias is None else bias
                rows = [own if b is None else own + b.to(weight.dtype) * s for b, s in zip(lora_biases, scalings)]
                if -1 in index:
                    index = [len(names) if i < 0 else i for i in index]
                    downs.append(weight.new_zeros(0, weight.shape[1]))
                    ups.append(weight.new_zeros(weight.shape[0], 0))
                    scalings.append(0.0)
                    rows.append(own)
                bias = torch.stack(rows)
            down, up, ranks = stack_pairs([d.to(weight.dtype) for d in downs], [u.to(weight.dtype) for u in ups])
            return lors_linear(
                x,
                weight,
                down,
                up,
                bias,
                scaling=torch.tensor(scalings, device=x.device),
                index=torch.tensor(index, device=x.device).view(len(index), *[1] * (x.dim() - 2)),
                ranks=ranks,
            )

    return FusedMixedLora


def lors_from_peft(peft_model: Any) -> nn.Module:
    """The model under a PEFT LoRA model with each LoRA layer a LorsLinear (``LorsLinear.from_peft`` of the
    active adapter), the layers over one base weight sharing one SharedWeight: a LORS stack. PEFT's
    ``LoraConfig(layer_replication=[[0, 2], [1, 3]])`` repeats layers over the same base tensors, each copy
    with its own adapter; here each repeated layer becomes a stack whose private pairs are those
    adapters, computed by the fused kernels. A LoRA layer over a base weight of its own becomes a stack of
    one. Base biases PEFT's copies share stay one tensor where the adapter has no lora_bias.

    In place, as ``merge_and_unload``: the PeftModel is used up; what is returned holds no PEFT module
    (``modules_to_save`` are PEFT's active copies, layers without the active adapter their base layers).
    The outputs equal the PEFT model's. One adapter must be active (``set_adapter``); LoRA layers must be
    plain LoRA over nn.Linear or transformers Conv1D layers (not merged, no variant such as DoRA).
    """
    from peft.tuners.lora import LoraModel
    from peft.tuners.lora.layer import Linear
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    tuner = getattr(peft_model, "base_model", None)
    if not isinstance(tuner, LoraModel):
        raise TypeError(
            f"lors_from_peft: peft_model must be a PEFT model of LoRA adapters, got {type(peft_model).__name__}"
        )
    if len(tuner.active_adapters) != 1:
        raise ValueError(
            f"lors_from_peft: one adapter must be active, {tuner.active_adapters} are: set_adapter(name) first"
        )
    (adapter,) = tuner.active_adapters
    loras, other = [], []
    for name, module in tuner.model.named_modules():
        if isinstance(module, Linear) and _linear_weight(module.get_base_layer()) is not None:
            loras.append(module)
        elif isinstance(module, BaseTunerLayer) or (
            isinstance(module, AuxiliaryTrainingWrapper) and not isinstance(module, ModulesToSaveWrapper)
        ):
            other.append(f"{name} ({type(module).__name__})")
    if other:
        raise ValueError(
            "lors_from_peft: only LoRA layers over nn.Linear or Conv1D become LorsLinear; the model also has "
            f"{other[:4]}, whose adapters would be lost"
        )
    new, stacks, biases = {}, {}, {}
    for lora in loras:
        if adapter not in lora.lora_A:
            continue  # unload() puts its base layer back, which is what PEFT applies there
        layer = LorsLinear.from_peft(lora, adapter)
        base = lora.get_base_layer()
        layer.shared = stacks.setdefault(id(base.weight), layer.shared)
        if base.bias is not None and lora.lora_B[adapter].bias is None:
            layer.bias = biases.setdefault(id(base.bias), layer.bias)
        new[id(lora)] = layer
    replace_modules(tuner.model, new)
    return tuner.unload()


_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.(?P<adapter>[^.]+))?"
    r"\.(?P<kind>weight|bias)$"
)


def _matches_pattern(pattern: str, name: str) -> bool:
    """PEFT's rule for rank_pattern / alpha_pattern keys: a regex matching the end of the module name,
    at a name-component boundary."""
    return re.match(rf"(.*\.)?({pattern})$", name) is not None


def load_lora(model: nn.Module, state_dict: Mapping, config: Any, adapter_name: str | None = None) -> list[str]:
    """Apply a PEFT LoRA adapter to ``model`` in place, without PEFT: each adapted nn.Linear becomes
    ``LorsLinear.from_lora`` of its weight and bias with down = lora_A, up = lora_B (+ lora_B's bias),
    scaling from ``config`` and dropout = lora_dropout. The outputs equal PEFT's model with that adapter.

    state_dict: the adapter's tensors only, as ``peft.get_peft_model_state_dict`` or
        ``adapter_model.safetensors`` hold them (``base_model.model.<module>.lora_A.weight``); keys that
        name the adapter (``<module>.lora_A.<adapter>.weight``) are taken too, and with several adapters
        ``adapter_name`` says which.
    config: a peft LoraConfig, or the Mapping of ``adapter_config.json``: lora_alpha, alpha_pattern,
        use_rslora, lora_dropout are read; the ranks are the tensors' shapes.
    Returns the names of the layers replaced.
    """
    get = config.get if isinstance(config, Mapping) else lambda key, default=None: getattr(config, key, default)
    if get("use_dora", False):
        raise ValueError("load_lora: a DoRA adapter (use_dora) is not plain LoRA; LorsLinear holds plain LoRA only")
    factors: dict[str, dict[str, Tensor]] = {}
    adapters, other = set(), []
    for key, value in state_dict.items():
        match = _LORA_KEY.match(key)
        if match is None:
            other.append(key)
            continue
        adapters.add(match["adapter"])
        if adapter_name is None or match["adapter"] in (None, adapter_name):
            factors.setdefault(match["module"], {})[match["factor"] + "." + match["kind"]] = value
    if other:
        raise ValueError(
            f"load_lora: tensors that are not plain LoRA lora_A / lora_B: {other[:4]} (embedding or "
            "variant adapters are not supported; load modules_to_save with load_state_dict)"
        )
    if adapter_name is None and len(adapters - {None}) > 1:
        raise ValueError(
            f"load_lora: the state dict holds adapters {sorted(a for a in adapters if a)}: give adapter_name"
        )
    if not factors:
        raise ValueError(
            "load_lora: no lora_A / lora_B tensors in the state dict"
            + (f" for adapter {adapter_name!r}" if adapter_name else "")
        )
    alpha_pattern = get("alpha_pattern") or {}
    new, names = {}, []
    for name, pair in factors.items():
        if "A.weight" not in pair or "B.weight" not in pair:
            raise ValueError(f"load_lora: {name} has {sorted(pair)}, needs both lora_A.weight and lora_B.weight")
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"load_lora: the adapter targets {name}, which the model does not have") from None
        if type(linear) is not nn.Linear:
            raise ValueError(f"load_lora: {name} is a {type(linear).__name__}; only nn.Linear layers become LorsLinear")
        down, up = pair["A.weight"], pair["B.weight"]
        alpha = next((a for p, a in alpha_pattern.items() if _matches_pattern(p, name)), get("lora_alpha", 8))
        scaling = lora_scaling(alpha, down.shape[0], get("use_rslora", False))
        bias = None if linear.bias is None else linear.bias.detach()
        if "B.bias" in pair:  # PEFT's lora_bias: scaled like the pair
            bias = (0 if bias is None else bias) + scaling * pair["B.bias"].to(linear.weight)
        layer = LorsLinear.from_lora(
            linear.weight.detach(), down, up, bias, scaling=scaling, dropout=get("lora_dropout", 0.0) or 0.0
        )
        new[id(linear)] = layer.train(linear.training)
        names.append(name)
    replace_modules(model, new)
    return names


def from_pretrained(model_class: type, directory: str, **kwargs: Any) -> nn.Module:
    """A converted Hugging Face model back from its ``save_pretrained`` directory: the architecture from
    config.json (``model_class.from_config``, or ``_from_config`` for a concrete class; ``kwargs`` go
    to it), the LORS stacks from its ``lors`` entry, then the weights (one safetensors file or shards),
    every tensor checked. In eval mode, as ``from_pretrained`` returns models. Local directories only."""
    from transformers import AutoConfig

    if not os.path.isdir(directory):
        raise ValueError(f"from_pretrained: {directory!r} is not a directory (save_pretrained's output)")
    config = AutoConfig.from_pretrained(directory)
    structure = hf.structure_of(config)
    if structure is None:
        raise ValueError(
            f"from_pretrained: {directory}/config.json records no LORS structure: not a model converted by "
            "lorsify (set model.config.quantization_config = lors_kernels.hf.quantization_config("
            "lors_structure(model)) before save_pretrained)"
        )
    build = getattr(model_class, "from_config", None) or model_class._from_config
    model = restore_lors(build(config, **kwargs), structure)
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    _load_files(model, [os.path.join(directory, name) for name in files])
    return model.eval()


def save_model(model: nn.Module, filename: str) -> None:
    """``safetensors.torch.save_model`` with the LORS structure (``lors_structure``) in the file's metadata."""
    from safetensors.torch import save_model as save

    save(model, filename, metadata={"lors": json.dumps(lors_structure(model))})


def load_model(model: nn.Module, filename: str) -> nn.Module:
    """Into ``model`` as built dense (its architecture without LORS), the converted model that
    ``save_model`` wrote: the stacks rebuilt from the file's metadata, then every tensor loaded."""
    from safetensors import safe_open

    with safe_open(filename, "pt") as f:
        structure = (f.metadata() or {}).get("lors")
    if structure is None:
        raise ValueError(f"load_model: {filename} has no LORS structure in its metadata (written by save_model?)")
    restore_lors(model, json.loads(structure))
    _load_files(model, [filename])
    return model


def _load_files(model: nn.Module, files: list[str]) -> None:
    """Load safetensors files into ``model``; each key must land, and every tensor of the model be found
    in one of the files (aliases of a loaded tensor, such as tied embeddings, count as found)."""
    from safetensors.torch import load_model as load

    missing, unexpected = None, set()
    for name in files:
        file_missing, file_unexpected = load(model, name, strict=False)
        missing = set(file_missing) if missing is None else missing & set(file_missing)
        unexpected |= set(file_unexpected)
    if missing or unexpected:
        raise RuntimeError(f"loading {files}: missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}")
