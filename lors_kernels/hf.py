"""A converted model loads through transformers' own ``from_pretrained`` (``AutoModel``, ``AutoModelFor*``,
``SentenceTransformer``), by the extension point transformers keeps for checkpoints whose modules differ
from the architecture's: a quantization method. ``lorsify`` writes ``quantization_config = {"quant_method":
"lors", "structure": ...}`` into the config; transformers then hands the freshly built dense model to
the ``lors`` quantizer, which gives it its LORS stacks (``restore_lors``) before the weights are loaded.

The method is registered when ``transformers.quantizers.auto`` is imported after ``lors_kernels`` (an
import hook, so that ``import lors_kernels`` stays cheap), or right away when it already was.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Any

METHOD = "lors"
_AUTO = "transformers.quantizers.auto"


def quantization_config(structure: dict) -> Any:
    """The config entry marking a checkpoint as converted: a ``LorsConfig`` holding ``structure``
    (``lors_structure(model)``)."""
    return register()[0](structure=structure)


def structure_of(config: Any) -> dict | None:
    """The LORS structure a Hugging Face config records: its ``quantization_config`` of method ``lors`` (or
    the ``lors`` entry older conversions wrote), else None."""
    entry = getattr(config, "quantization_config", None)
    if entry is not None:
        entry = entry if isinstance(entry, dict) else entry.to_dict()
        if entry.get("quant_method") == METHOD:
            return entry.get("structure")
    return getattr(config, "lors", None)


def register() -> tuple[type, type]:
    """Register the ``lors`` quantization config and quantizer with transformers (once); returns both."""
    from transformers.quantizers import auto

    if METHOD in auto.AUTO_QUANTIZER_MAPPING:
        return auto.AUTO_QUANTIZATION_CONFIG_MAPPING[METHOD], auto.AUTO_QUANTIZER_MAPPING[METHOD]
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    from .convert import restore_lors, to_dense

    class LorsConfig(QuantizationConfigMixin):
        """A checkpoint converted by lorsify: its LORS^T stacks (``lors_structure``)."""

        def __init__(self, structure: dict | None = None, **kwargs: Any) -> None:
            self.quant_method = METHOD
            self.structure = structure

    class LorsQuantizer(HfQuantizer):
        """Gives the dense model transformers built its LORS stacks before the weights load. Only
        converted checkpoints take it: a dense checkpoint is converted by lorsify, which needs data."""

        requires_calibration = True

        def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> Any:
            root, structure = _rooted(model, self.quantization_config.structure)
            restore_lors(root, structure)
            return model

        def _dequantize(self, model: Any, dtype: Any = None) -> Any:  # model.dequantize()
            return to_dense(model)

        def is_serializable(self, **kwargs: Any) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return True

    auto.register_quantization_config(METHOD)(LorsConfig)
    auto.register_quantizer(METHOD)(LorsQuantizer)
    return LorsConfig, LorsQuantizer


def _rooted(model: Any, structure: dict) -> tuple[Any, dict]:
    """Where in ``model`` the structure's layer names start: the model itself, its base model (a checkpoint
    of ``BertModel`` loaded by ``AutoModelForSequenceClassification``, whose names start with ``bert.``),
    or the model with the saved head model's prefix taken off (the other way round), as transformers
    maps the weights' names."""
    names = [layer["name"] for stack in structure["stacks"] for layer in stack["layers"]]
    prefix = getattr(model, "base_model_prefix", "")

    def holds(module, name):
        try:
            module.get_submodule(name)
            return True
        except AttributeError:
            return False

    if all(holds(model, n) for n in names) or not prefix:
        return model, structure
    if hasattr(model, prefix) and all(holds(getattr(model, prefix), n) for n in names):
        return getattr(model, prefix), structure
    start = prefix + "."
    if all(n.startswith(start) for n in names):
        stacks = [
            {**stack, "layers": [{**layer, "name": layer["name"][len(start) :]} for layer in stack["layers"]]}
            for stack in structure["stacks"]
        ]
        return model, {**structure, "stacks": stacks}
    return model, structure  # restore_lors names what it cannot find


class _RegisterOnImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Runs ``register()`` right after ``transformers.quantizers.auto`` is first imported."""

    def find_spec(self, name, path, target=None):
        if name != _AUTO:
            return None
        sys.meta_path.remove(self)  # find the real module, once
        spec = importlib.util.find_spec(name)
        if spec is not None:
            self.loader = spec.loader
            spec.loader = self
        return spec

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        register()


def install() -> None:
    """Register now if transformers' quantizers are loaded, else when they are."""
    if _AUTO in sys.modules:
        register()
    elif not any(isinstance(finder, _RegisterOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())
