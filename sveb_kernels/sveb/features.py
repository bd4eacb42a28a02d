"""Hidden states of a Hugging Face causal LM for the response tokens of a batch."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..packing import Packing
from .progress import progress_bar


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def hidden_states_fn(model, *, layer: int = -1, batch_size: int = 16, device: Optional[torch.device] = None,
                     show_progress: bool = False):
    """A function (input_ids, attention_mask, packing) -> hidden [N, D] of the packed response tokens.

    `layer` indexes the model's `hidden_states` output: 0 the embeddings, -1 the last layer (after
    the final norm in most transformers models). Rows are run `batch_size` at a time, trimmed to
    their longest sequence; results stay on `device` in the model's dtype.
    """
    device = device or next(model.parameters()).device
    num_layers = getattr(model.config, "num_hidden_layers", None)
    if num_layers is not None and not -(num_layers + 1) <= layer <= num_layers:
        raise ValueError(f"layer must be in [{-(num_layers + 1)}, {num_layers}] for this model, got {layer}")

    @torch.no_grad()
    def compute(input_ids: Tensor, attention_mask: Tensor, packing: Packing) -> Tensor:
        rows, length = input_ids.shape
        packed_index = torch.full((rows * length,), -1, dtype=torch.int64)
        packed_index[packing.token_index.cpu()] = torch.arange(packing.num_tokens)
        packed_index = packed_index.view(rows, length)
        out: Optional[Tensor] = None
        bar = progress_bar(total=rows, desc="hidden states", disable=not show_progress)
        for r0 in range(0, rows, batch_size):
            r1 = min(r0 + batch_size, rows)
            width = int(attention_mask[r0:r1].sum(dim=1).max())
            ids = input_ids[r0:r1, :width].to(device)
            attn = attention_mask[r0:r1, :width].to(device)
            hidden = model(input_ids=ids, attention_mask=attn.long(), output_hidden_states=True).hidden_states[layer]
            where = packed_index[r0:r1, :width]
            keep = where >= 0
            if out is None:
                out = torch.empty(packing.num_tokens, hidden.shape[-1], dtype=hidden.dtype, device=device)
            out[where[keep].to(device)] = hidden[keep.to(device)]
            bar.update(r1 - r0)
        bar.close()
        if out is None:
            out = torch.empty(0, getattr(model.config, "hidden_size", 1), device=device)
        return out

    return compute


def load_model(path: str, *, device: torch.device, dtype: str = "auto"):
    """AutoModelForCausalLM + AutoTokenizer from a local path (or an id already in the HF cache)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16,
                   "float16": torch.float16}[dtype]
    if dtype == "auto" and device.type == "cpu":
        torch_dtype = torch.float32  # bf16 matmuls on CPU are slow and gain nothing here
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    return model.to(device).eval(), tokenizer
