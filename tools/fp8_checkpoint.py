"""FP8 checkpoints in the compressed-tensors format (as llm-compressor's FP8_DYNAMIC scheme writes them):
every linear layer's weight in float8_e4m3fn beside a float32 `weight_scale`, one per output channel
([N, 1]) or one per tensor ([1]); activations are quantized per token at run time, so none are stored."""

from __future__ import annotations

import torch

from workers.layers.fp8 import quantize_rows

LINEAR_WEIGHTS = tuple(f"{name}.weight" for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"))
STRATEGIES = {"fp8": "channel", "fp8-tensor": "tensor"}  # make_model's --quantize choices


def quantization_config(quantize: str) -> dict:
    """config.json's quantization_config of a checkpoint written by `fp8_tensors(..., quantize)`."""
    weights = dict(num_bits=8, type="float", symmetric=True, strategy=STRATEGIES[quantize], dynamic=False,
                   group_size=None, block_structure=None, actorder=None, observer="minmax", observer_kwargs={})
    activations = dict(num_bits=8, type="float", symmetric=True, strategy="token", dynamic=True, group_size=None,
                       block_structure=None, actorder=None, observer=None, observer_kwargs={})
    group = dict(targets=["Linear"], weights=weights, input_activations=activations, output_activations=None)
    return dict(quant_method="compressed-tensors", format="float-quantized", quantization_status="compressed",
                config_groups={"group_0": group}, ignore=["lm_head"], kv_cache_scheme=None,
                global_compression_ratio=None)


def fp8_tensors(name: str, tensor: torch.Tensor, quantize: str) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of `tensor` (already in the checkpoint's dtype): a linear weight becomes
    e4m3 values and their scale, anything else stays as it is."""
    if not name.endswith(LINEAR_WEIGHTS):
        return {name: tensor}
    per_channel = STRATEGIES[quantize] == "channel"
    values, scale = quantize_rows(tensor if per_channel else tensor.reshape(1, -1))
    scale = scale.reshape(-1, 1) if per_channel else scale.reshape(1)
    return {name: values.view(tensor.shape), name.removesuffix("weight") + "weight_scale": scale}
