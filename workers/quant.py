"""FP8 weight quantization of a built model (`--quantization fp8`), and what a checkpoint's own
`quantization_config` says of the FP8 weights it stores.

`use_fp8(model, quantization_config)` switches every tensor-parallel linear layer (q/k/v, o, gate/up,
down) to FP8 storage before the checkpoint loads, so each rank quantizes (or, from an FP8 checkpoint,
copies) its own part of one tensor at a time. Embeddings, norms and the LM head keep the model's dtype
(a norm before an FP8 linear writes its output quantized for it).
Model files know nothing of this: any model built from the shared linear layers gets it. The model is
built in its own dtype first, so until use_fp8 frees them a rank holds its linears' (unfilled) bf16
weights: the device's peak before loading is still the bf16 model's size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from workers.layers.fp8 import FP8_FORMS, Fp8ColumnParallelLinear, switch_to_fp8
from workers.layers.norm import RMSNorm


@dataclass(frozen=True)
class Fp8Checkpoint:
    """A checkpoint whose linear weights are stored in e4m3, each with a `weight_scale` (one per output
    channel or one per tensor). `targets` and `ignore` name the checkpoint modules that are (and are
    not) quantized: exact names, "re:" + a regular expression, or "Linear" for every linear layer."""

    method: str
    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = ()

    @classmethod
    def parse(cls, config: dict) -> "Fp8Checkpoint":
        """Raises ValueError, naming the setting, for quantization we do not load as stored."""
        method = config.get("quant_method")
        if method == "fbgemm_fp8":
            return cls(method, ignore=tuple(config.get("modules_to_not_convert") or ()))
        if method == "fp8":
            if config.get("weight_block_size"):
                raise ValueError(f"block-wise FP8 (weight_block_size {config['weight_block_size']}, weight_scale_inv) "
                                 "is not supported: toka's FP8 matmuls take a scale per output channel")
            if config.get("fmt", "e4m3") != "e4m3":
                raise ValueError(f"FP8 weights in {config['fmt']} are not supported (e4m3 only)")
            ignore = config.get("ignored_layers") or config.get("modules_to_not_convert") or ()
            return cls(method, ignore=tuple(ignore))
        if method == "compressed-tensors":
            return cls._parse_compressed_tensors(config)
        raise ValueError(f"quant_method {method!r} is not one toka loads; supported: fp8 e4m3 weights "
                         "(fbgemm_fp8, fp8, compressed-tensors float 8-bit)")

    @classmethod
    def _parse_compressed_tensors(cls, config: dict) -> "Fp8Checkpoint":
        groups = (config.get("config_groups") or {}).values()
        if not groups:
            raise ValueError("a compressed-tensors quantization_config without config_groups")
        targets = []
        for group in groups:
            w = group.get("weights") or {}
            if w.get("type") != "float" or w.get("num_bits") != 8:
                raise ValueError(f"compressed-tensors weights of type {w.get('type')!r} and {w.get('num_bits')} "
                                 "bits are not supported (float 8-bit only)")
            if w.get("strategy") not in ("channel", "tensor") or not w.get("symmetric", True):
                raise ValueError(f"compressed-tensors FP8 weights of strategy {w.get('strategy')!r}"
                                 f"{'' if w.get('symmetric', True) else ', asymmetric'} are not supported "
                                 "(symmetric, per channel or per tensor only)")
            # activations are quantized per token from their own amax whatever the group says: a static
            # scheme's calibrated per-tensor input_scale is never finer than that, so it is not read
            a = group.get("input_activations")
            if a and (a.get("type") != "float" or a.get("num_bits") != 8):
                raise ValueError(f"compressed-tensors input activations of type {a.get('type')!r} and "
                                 f"{a.get('num_bits')} bits are not supported (float 8-bit only)")
            targets += group.get("targets") or []
        return cls("compressed-tensors", tuple(targets), tuple(config.get("ignore") or ()))

    def quantized(self, names: list[str]) -> bool:
        """Whether the checkpoint stores the modules `names` (the parts of one fused layer) in e4m3."""
        marks = {self._matches(self.targets, n) and not self._matches(self.ignore, n) for n in names}
        if len(marks) > 1:
            raise ValueError(f"{', '.join(names)} load into one fused layer, but the quantization_config "
                             "quantizes some of them and not the others")
        return marks.pop()

    @staticmethod
    def _matches(patterns: tuple[str, ...], name: str) -> bool:
        for p in patterns:
            if p == "Linear" or p == name or name.endswith("." + p):
                return True
            if p.startswith("re:") and re.match(p[3:], name):
                return True
        return False


# (norm, linear) of a decoder layer where the linear alone reads the norm's output: an FP8 linear
# there takes it quantized by the norm's own kernel (RMSNorm.quantize), never written in bf16 first
NORM_READERS = (("input_layernorm", "self_attn.qkv_proj"), ("post_attention_layernorm", "mlp.gate_up_proj"))


def use_fp8(model: nn.Module, quantization_config: dict | None = None, quantize_held: bool = False) -> None:
    """Switches the model's linear layers to FP8 before it loads: given the checkpoint's own
    quantization_config, those it stores in e4m3 take their values and scales from it and the others
    keep the model's dtype; without one, each weight is quantized as it loads. `quantize_held`:
    quantize the weights the layers hold now (random weights) instead of waiting for a checkpoint.
    The norms before FP8 linears (NORM_READERS) then quantize their own outputs."""
    stored = Fp8Checkpoint.parse(quantization_config) if quantization_config else None
    for path, module in list(model.named_modules()):
        if type(module) not in FP8_FORMS:
            continue
        if stored is not None and not stored.quantized(checkpoint_names(model, path)):
            continue
        try:
            switch_to_fp8(module, scales_in_checkpoint=stored is not None and not quantize_held,
                          quantize_held=quantize_held)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    for layer in model.modules():
        for norm, reader in NORM_READERS:
            if isinstance(getattr(layer, norm, None), RMSNorm):
                try:
                    fp8_reader = isinstance(layer.get_submodule(reader), Fp8ColumnParallelLinear)
                except AttributeError:  # a layer of another shape: its norm keeps its own output
                    fp8_reader = False
                getattr(layer, norm).quantize = fp8_reader


def checkpoint_names(model: nn.Module, path: str) -> list[str]:
    """The checkpoint's names of the modules that load into ours at `path` (q_proj, k_proj, v_proj for
    qkv_proj, through the model's `packed` table)."""
    parent, _, leaf = path.rpartition(".")
    parts = [name for name, (fused, _) in model.packed.items() if fused == leaf]
    return [f"{parent}.{name}" for name in parts] if parts else [path]
