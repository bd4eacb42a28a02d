"""One hidden-layer resolver for both trainer integrations: where, in a Hugging Face causal LM, the
tensor `output_hidden_states=True` returns at index `layer` can be read by a hook, without asking
the model for all layers' states.

`hidden_states[0]` is the input of the first decoder layer (the embeddings, with positions and
scaling where the model adds them: GPT-2 adds `wpe` to `wte`, Gemma scales by sqrt(D)), so it is
read by a forward *pre*-hook on that layer, never from the embedding module; `hidden_states[i]`
(1 <= i < n) is the output of decoder layer i; `hidden_states[n]` (= -1) the output of the final
norm. Model families: anything whose decoder exposes its layers as `layers` (Llama, Qwen2, Gemma,
Mistral, Phi, ...), `h` (GPT-2) or `layers` under `gpt_neox`, found through `get_decoder()`, the
model's `base_model_prefix`, or the usual attribute names; wrapped models are unwrapped first
(PEFT's `get_base_model()`, FSDP/DDP's `.module`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

_DECODER_ATTRIBUTES = ("model", "transformer", "gpt_neox", "decoder")
_LAYER_ATTRIBUTES = ("layers", "h", "layer", "blocks")
_NORM_ATTRIBUTES = ("norm", "final_layernorm", "ln_f", "final_layer_norm", "final_norm")


def unwrap(model):
    """The Hugging Face model inside FSDP/DDP (`.module`) and PEFT (`get_base_model()`) wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), torch.nn.Module) and not hasattr(model, "config"):
            model = model.module
    return model


def _decoder(model):
    if hasattr(model, "get_decoder"):
        try:
            decoder = model.get_decoder()
        except (AttributeError, NotImplementedError):  # some models declare it without a decoder
            decoder = None
        if decoder is not None and _layers_of(decoder) is not None:
            return decoder
    prefix = getattr(model, "base_model_prefix", None)
    for name in ((prefix,) if prefix else ()) + _DECODER_ATTRIBUTES:
        inner = getattr(model, name, None) if name else None
        if isinstance(inner, torch.nn.Module) and _layers_of(inner) is not None:
            return inner
    return model if _layers_of(model) is not None else None


def _layers_of(module):
    for name in _LAYER_ATTRIBUTES:
        layers = getattr(module, name, None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
            return layers
    return None


class HiddenLayer:
    """The place to read `hidden_states[layer]` of `model` by a hook.

    `module` is the hooked module; `before` is True when the tensor is that module's input
    (index 0: the first decoder layer's input) rather than its output. `hook(fn)` registers a hook
    calling fn(tensor) at every forward and returns the removable handle.
    """

    def __init__(self, model, layer: int, *, name: str = "hidden_layer"):
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"{name} must be an int (a hidden_states index), got {type(layer).__name__}")
        base = unwrap(model)
        decoder = _decoder(base)
        if decoder is None:
            raise ValueError(f"cannot find the decoder layers of {type(base).__name__} to read hidden states from "
                             f"(looked for {'/'.join(_LAYER_ATTRIBUTES)} under get_decoder(), base_model_prefix or "
                             f"{'/'.join(_DECODER_ATTRIBUTES)})")
        layers = _layers_of(decoder)
        n = len(layers)
        if not -(n + 1) <= layer <= n:
            raise ValueError(f"{name} must be an int in [{-(n + 1)}, {n}] for this model ({n} layers), got {layer!r}")
        self.index = layer % (n + 1)
        self.num_layers = n
        self.before = self.index == 0
        if self.index == 0:
            self.module = layers[0]
        elif self.index < n:
            self.module = layers[self.index - 1]
        else:
            norm = next((getattr(decoder, a) for a in _NORM_ATTRIBUTES
                         if isinstance(getattr(decoder, a, None), torch.nn.Module)), None)
            if norm is None:
                raise ValueError(f"cannot find the final norm of {type(base).__name__}; pass {name} < {n}")
            self.module = norm

    def hook(self, fn: Callable[[Tensor], None]):
        if self.before:
            def pre_hook(module, args, kwargs):
                fn(args[0] if args else kwargs["hidden_states"])
            return self.module.register_forward_pre_hook(pre_hook, with_kwargs=True)

        def hook(module, inputs, output):
            fn(output if isinstance(output, Tensor) else output[0])
        return self.module.register_forward_hook(hook)


def resolve_layer(model, layer: int, *, name: str = "hidden_layer") -> HiddenLayer:
    """`HiddenLayer(model, layer)`: a clear ValueError/TypeError (naming `name`) for a bad layer or
    a model whose decoder layers cannot be found."""
    return HiddenLayer(model, layer, name=name)
