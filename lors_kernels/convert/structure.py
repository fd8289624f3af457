"""The structure of a converted model, for checkpoints: its LORS^T stacks as JSON-able data, a dense
model given those stacks again, and a converted model made dense."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from .. import hf
from ..static import LorsLinear, SharedWeight, shared_stacks
from .modules import _stack_name, replace_modules

__all__ = ["lors_structure", "restore_lors", "to_dense"]


def lors_structure(model: nn.Module) -> dict:
    """The LORS^T stacks of ``model`` as JSON-able data: for each stack its shape, the shared weight's
    init and each layer's name, rank, groups, bias, scaling and dropout. ``lorsify`` stores it in a
    Hugging Face model's config (``quantization_config``, so that ``save_pretrained`` writes it to
    config.json and ``from_pretrained`` rebuilds the stacks: ``lors_kernels.hf``); ``restore_lors``
    rebuilds the stacks from it."""
    stacks = [
        {
            "pattern": _stack_name([n for n, _ in layers]),
            "in_features": shared.in_features,
            "out_features": shared.out_features,
            "init": shared.init,
            "layers": [
                {
                    "name": n,
                    "rank": layer.rank,
                    "groups": layer.groups,
                    "bias": layer.bias is not None,
                    "scaling": layer.scaling,
                    "dropout": layer.dropout,
                }
                for n, layer in layers
            ],
        }
        for shared, layers in shared_stacks(model)
    ]
    return {"format": "lors_kernels", "version": 1, "stacks": stacks}


def restore_lors(model: nn.Module, structure: dict | None = None) -> nn.Module:
    """Give a dense model (the same architecture, e.g. built from its config) the LORS stacks that
    ``structure`` (from ``lors_structure``; by default the one the model's config records) describes, in place and
    with fresh values, ready to load the converted model's checkpoint. Stacks the model builds itself
    (LorsAdaptiveMixing's output projection) are left as they are. Returns ``model``."""
    if structure is None:
        structure = hf.structure_of(getattr(model, "config", None))
        if structure is None:
            raise ValueError(
                "restore_lors: no structure given, and the model's config records none (lorsify records "
                "it in a Hugging Face model's config; elsewhere save lors_structure(model) yourself)"
            )
    if not isinstance(structure, Mapping) or structure.get("format") != "lors_kernels" or structure.get("version") != 1:
        raise ValueError("restore_lors: not a lors_kernels structure (version 1) as lors_structure returns")
    new = {}
    for stack in structure["stacks"]:
        shape = (stack["in_features"], stack["out_features"])
        names = [spec["name"] for spec in stack["layers"]]
        try:
            modules = [model.get_submodule(n) for n in names]
        except AttributeError as e:
            raise ValueError(f"restore_lors: stack {stack['pattern']}: {e}") from None
        if (
            all(isinstance(m, LorsLinear) for m in modules)
            and len({id(m.shared) for m in modules}) == 1
            and [(m.in_features, m.out_features, m.rank, m.groups) for m in modules]
            == [(*shape, spec["rank"], spec["groups"]) for spec in stack["layers"]]
        ):
            continue  # built by the model itself
        bad = [
            f"{n} ({type(m).__name__})"
            for n, m in zip(names, modules)
            if type(m) is not nn.Linear or (m.in_features, m.out_features) != shape
        ]
        if bad:
            raise ValueError(
                f"restore_lors: stack {stack['pattern']} needs nn.Linear{shape} layers to replace; "
                f"found {', '.join(bad[:4])}"
            )
        weight = modules[0].weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        shared = SharedWeight(*shape, init=stack["init"], **factory)
        for module, spec in zip(modules, stack["layers"]):
            new[id(module)] = LorsLinear(
                *shape,
                rank=spec["rank"],
                groups=spec["groups"],
                bias=spec["bias"],
                shared=shared,
                scaling=spec["scaling"],
                dropout=spec["dropout"],
                **factory,
            )
    replace_modules(model, new)
    return model


def to_dense(model: nn.Module) -> nn.Module:
    """The way back from ``lorsify``, in place: every LorsLinear of ``model`` replaced by the nn.Linear
    computing what it computes (``LorsLinear.to_linear``, merged layers included), and the structure
    record (the config's ``quantization_config`` of method "lors") dropped, so that the model saves and
    loads as its dense architecture. ``model.dequantize()`` of a loaded Hugging Face model does the same.
    Returns ``model``."""
    new = {id(m): m.to_linear().train(m.training) for m in model.modules() if isinstance(m, LorsLinear)}
    replace_modules(model, new)
    config = getattr(model, "config", None)
    if getattr(config, "lors", None) is not None:  # the record of older conversions
        del config.lors
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and quantizer.quantization_config.quant_method == hf.METHOD:
        quantizer.remove_quantization_config(model)  # loaded by from_pretrained: is_quantized goes too
    elif hf.structure_of(config) is not None:
        del config.quantization_config
    return model
