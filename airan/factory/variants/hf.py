"""Loading a Hugging Face causal LM for the factory: quietly, frozen, on the CPU.

torch and transformers are imported when a model is loaded, so `airan model list`
and the other light users of the factory do not pay for them.
"""
from __future__ import annotations

from pathlib import Path


def load_frozen(path: Path, dtype=None):
    """A Hugging Face causal LM in eval mode with gradients off (float32 unless `dtype`), quietly."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        # SDPA: the layer-by-layer passes give no mask and rely on its causal flag
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, attn_implementation="sdpa")
    finally:
        hf_logging.set_verbosity(previous)
        if bars:
            hf_logging.enable_progress_bar()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
