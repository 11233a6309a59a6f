"""Integer quantisation into compressed-tensors checkpoints that vLLM runs with its own kernels.

Two schemes, both symmetric integers written the way vLLM's compressed-tensors
loader reads them (vllm/model_executor/layers/quantization/compressed_tensors):

- W8A8 ("int-quantized"): int8 weights with one float32 scale per output
  channel; activations are quantised to int8 per token at run time by the
  kernel. On a CPU vLLM runs these with oneDNN int8 GEMMs
  (CPUInt8ScaledMMLinearKernel). SmoothQuant first moves activation outliers
  into the weights, since per-token int8 activations lose the small channels
  next to an outlier.
- W4A16 ("pack-quantized"): int4 weights in groups of `group_size` input
  channels with one scale per group, eight values packed per int32; vLLM's
  CPU kernel (CPUWNA16LinearKernel) dequantises in its GEMM.

Weights are rounded with GPTQ (Frantar et al., 2022): column by column, each
rounding error is pushed onto the not yet rounded columns through the
inverse Hessian X^T X of the layer's calibration inputs.
"""
from __future__ import annotations

import torch
from torch import nn

from airan.factory.variants.layerwise import LINEAR_NAMES, collect_input_stats, run_layerwise, submodule

# SmoothQuant pairs: (the module whose output feeds the linears, the linears).
# The scale divides the norm's weight (or up_proj's rows: down_proj's input is
# act(gate) * up, linear in up) and multiplies the linears' input columns.
SMOOTH_GROUPS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)


def qmax(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def symmetric_scale(w: torch.Tensor, bits: int, store_dtype: torch.dtype) -> torch.Tensor:
    """Per-row scale mapping the row's largest |w| to the top level, as stored on disk."""
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / qmax(bits)
    # round the scale to its storage dtype first, so GPTQ compensates the error the file will have
    return scale.to(store_dtype).float()


def quantize_rtn(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer levels of `w` (rows scaled by `scale[:, None]`), clamped to the signed range."""
    return torch.clamp(torch.round(w / scale[:, None]), -qmax(bits) - 1, qmax(bits))


def gptq(weight: torch.Tensor, gram: torch.Tensor, bits: int, group_size: int | None,
         scale_dtype: torch.dtype, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """GPTQ rounding of `weight` [out, in] given the input Gram matrix.

    Returns (integer levels as int8 [out, in], scales float32 [out, in // group_size]
    or [out, 1] per channel). No activation reordering: groups stay contiguous,
    which is what vLLM's kernels expect without a g_idx.
    """
    w = weight.detach().double().clone()
    rows, cols = w.shape
    h = gram.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    # damping keeps the Cholesky factorisation stable; raised until it succeeds
    mean_diag = torch.diag(h).mean()
    for attempt in range(6):
        try:
            hd = h + (damp * 10**attempt) * mean_diag * torch.eye(cols, dtype=h.dtype)
            hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hd)), upper=True)
            break
        except torch.linalg.LinAlgError:
            continue
    else:
        raise RuntimeError("GPTQ: the calibration Hessian is not positive definite even with damping")

    g = group_size or cols
    if cols % g:
        raise ValueError(f"group size {g} does not divide {cols} input channels")
    levels = torch.zeros_like(w)
    scales = torch.zeros(rows, cols // g, dtype=torch.float64)
    block = g if group_size else 128
    if group_size is None:
        scales[:, 0] = symmetric_scale(w.float(), bits, scale_dtype).double()
    for i1 in range(0, cols, block):  # bounded by the column count
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        if group_size:  # a block is one group: its scale sees the updates of earlier blocks
            scales[:, i1 // g] = symmetric_scale(w1.float(), bits, scale_dtype).double()
        for i in range(i2 - i1):
            col = i1 + i
            s = scales[:, col // g]
            q = quantize_rtn(w1[:, i : i + 1], s, bits)[:, 0]
            levels[:, col] = q
            err = (w1[:, i] - q * s) / hinv1[i, i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return levels.to(torch.int8), scales.float()


def dequantize(levels: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    rows, cols = levels.shape
    g = cols // scales.shape[1]
    return (levels.float().view(rows, -1, g) * scales[:, :, None]).view(rows, cols)


def smooth_layer_(layer: nn.Module, absmax: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """SmoothQuant on one decoder layer, in place; returns the input scale of each smoothed linear.

    s_j = max|X_j|^alpha / max|W_j|^(1-alpha); X_j / s_j, W_:j * s_j leaves outputs unchanged.
    """
    applied = {}
    with torch.no_grad():
        for source_name, linear_names in SMOOTH_GROUPS:
            source = submodule(layer, source_name)
            linears = [submodule(layer, n) for n in linear_names]
            act = absmax[linear_names[0]].clamp(min=1e-5)
            wmax = torch.stack([lin.weight.abs().amax(0) for lin in linears]).amax(0).clamp(min=1e-5)
            s = (act.pow(alpha) / wmax.pow(1 - alpha)).clamp(min=1e-5)
            if isinstance(source, nn.Linear):  # up_proj: scale its output rows
                source.weight.div_(s[:, None])
            else:  # RMSNorm weight
                source.weight.div_(s)
            for lin, name in zip(linears, linear_names):
                lin.weight.mul_(s[None, :])
                applied[name] = s
    return applied


def fake_quant_activations_(module: nn.Linear, bits: int = 8):
    """Per-token symmetric dynamic quantisation of the input, as vLLM's W8A8 kernel does."""

    def hook(_m, args):
        x = args[0]
        scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / qmax(bits)
        return (torch.clamp(torch.round(x / scale), -qmax(bits) - 1, qmax(bits)) * scale,)

    return module.register_forward_pre_hook(hook)


def quantize_model_(model: nn.Module, sequences, *, bits: int, group_size: int | None,
                    act_bits: int | None, smooth_alpha: float | None, damp: float,
                    scale_dtype: torch.dtype, show_progress: bool = True) -> dict[str, tuple]:  # fmt: skip
    """Quantise every decoder linear of `model` in place (weights set to their dequantised
    values, activation fake-quant hooks left on when `act_bits`); return
    {module path: (int levels, scales)} for the checkpoint writer."""
    packed: dict[str, tuple] = {}
    smoothed = 0

    def transform(i: int, layer: nn.Module, runner) -> None:
        nonlocal smoothed
        stats = collect_input_stats(layer, LINEAR_NAMES, lambda: runner.forward(layer),
                                    gram=True, absmax=smooth_alpha is not None)  # fmt: skip
        if smooth_alpha is not None:
            scales = smooth_layer_(layer, {n: s.absmax for n, s in stats.items()}, smooth_alpha)
            smoothed += 1
            for _, linear_names in SMOOTH_GROUPS:
                # inputs are now X / s: the Gram becomes diag(1/s) G diag(1/s); once per shared stats
                inv = (1.0 / scales[linear_names[0]]).double()
                stats[linear_names[0]].gram *= inv[:, None] * inv[None, :]
        for name in LINEAR_NAMES:
            linear = submodule(layer, name)
            levels, scales = gptq(linear.weight.data, stats[name].gram, bits, group_size, scale_dtype, damp)
            with torch.no_grad():
                linear.weight.copy_(dequantize(levels, scales))
            if act_bits:
                fake_quant_activations_(linear, act_bits)
            packed[f"model.layers.{i}.{name}"] = (levels, scales)

    desc = f"GPTQ int{bits}" + (" + SmoothQuant" if smooth_alpha is not None else "")
    run_layerwise(model, sequences, transform, desc=desc, show_progress=show_progress)
    return packed


# --- checkpoint formats --------------------------------------------------------------


def pack_int32(levels: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors "pack-quantized": unsigned (level + 2^(bits-1)) values, 32/bits per
    int32 along the input dim, the first value in the lowest bits."""
    per_word = 32 // bits
    rows, cols = levels.shape
    if cols % per_word:
        raise ValueError(f"{cols} input channels do not fill whole int32 words of {per_word} values")
    unsigned = (levels.to(torch.int32) + (1 << (bits - 1))).view(rows, cols // per_word, per_word)
    shifts = torch.arange(per_word, dtype=torch.int32) * bits
    # int64 sum then wrap: the top nibble sets the sign bit of the int32 word
    words = (unsigned.to(torch.int64) << shifts.to(torch.int64)).sum(dim=2)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def quantization_config(*, bits: int, group_size: int | None, act_bits: int | None) -> dict:
    """The `quantization_config` block of config.json for these weights."""
    weights = {
        "num_bits": bits,
        "type": "int",
        "symmetric": True,
        "strategy": "group" if group_size else "channel",
        "group_size": group_size,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
        "block_structure": None,
        "observer_kwargs": {},
    }
    inputs = None
    if act_bits:
        inputs = {
            "num_bits": act_bits,
            "type": "int",
            "symmetric": True,
            "strategy": "token",
            "group_size": None,
            "dynamic": True,
            "actorder": None,
            "observer": None,
            "block_structure": None,
            "observer_kwargs": {},
        }
    fmt = "int-quantized" if bits == 8 else "pack-quantized"
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                # every decoder linear; vLLM matches "Linear" to its linear layers by class
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": inputs,
                "output_activations": None,
                "format": fmt,
            }
        },
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "global_compression_ratio": None,
    }


def quantized_tensors(packed: dict[str, tuple], *, bits: int, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Checkpoint tensors of the quantised linears, in compressed-tensors naming."""
    out: dict[str, torch.Tensor] = {}
    for path, (levels, scales) in packed.items():
        if bits == 8:
            out[f"{path}.weight"] = levels.contiguous()
            out[f"{path}.weight_scale"] = scales.to(scale_dtype).contiguous()  # [out, 1]
        else:
            out[f"{path}.weight_packed"] = pack_int32(levels, bits).contiguous()
            out[f"{path}.weight_scale"] = scales.to(scale_dtype).contiguous()  # [out, in / group]
            out[f"{path}.weight_shape"] = torch.tensor(list(levels.shape), dtype=torch.int64)
    return out


def check_group_size(model: nn.Module, group_size: int | None, bits: int) -> None:
    """Refuse shapes vLLM's CPU kernels reject, before spending the calibration time."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dims = {cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * head_dim}
    for d in dims:
        if group_size and d % group_size:
            raise ValueError(f"group size {group_size} does not divide the layer width {d}")
        if bits == 4 and d % 32:
            raise ValueError(f"vLLM's CPU int4 kernel needs widths that are multiples of 32; {d} is not")
    if bits == 4 and (cfg.num_key_value_heads * head_dim) % 32:
        raise ValueError("vLLM's CPU int4 kernel needs k/v widths that are multiples of 32")
