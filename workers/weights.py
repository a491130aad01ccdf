"""Loading Hugging Face safetensors checkpoints (one file or sharded with an index) into our modules.

Checkpoint names map to our modules declaratively: a name is our module path, except that the
model's `packed` table sends e.g. `q_proj` to the `q` part of `qkv_proj`. Every module that holds
weights has `load(tensor, shard, is_bias)` and indexes out its own tensor-parallel part; `tensor`
is a lazy safetensors slice, so a rank reads only the bytes it keeps. Under pipeline parallelism a
stage skips the tensors of the others' layers. Loading is strict: an unexpected tensor or one never
loaded is an error that names it.

FP8 checkpoints add a `weight_scale` to each e4m3 linear weight (loaded by the layer's
`load_scale(tensor, shard)`, whole: scales are small and may be scalars) and may carry scalar K and
V cache scales per attention layer (`self_attn.k_scale`, `v_scale`), kept as floats on the layer.
"""

from __future__ import annotations

import glob
import json
import os

import torch
from safetensors import safe_open
from torch import nn

# Buffers some checkpoints carry that our modules recompute.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# What a checkpoint tensor's last name part may be: a module's tensors, an FP8 layer's scale, an
# attention layer's KV cache scales.
TENSOR_KINDS = ("weight", "bias", "weight_scale")
ATTENTION_SCALES = ("k_scale", "v_scale")
# Static activation scales (and fbgemm's upper bound on them) beside FP8 weights: the FP8 layers quantize
# each token from its own amax, which no calibrated per-tensor scale is finer than.
ACTIVATION_SCALES = ("input_scale", "input_scale_ub")


def checkpoint_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(folder, n) for n in names]
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {folder}")
    return files


def expected_targets(model: nn.Module) -> set[tuple[str, str, str]]:
    """(module path, shard, kind) of every tensor the checkpoint must provide; kind is one of TENSOR_KINDS."""
    targets = set()
    for path, module in model.named_modules():
        if not hasattr(module, "load"):
            continue
        if getattr(module, "weight", None) is not None and _tied_to_other(model, path, module):
            continue
        shards = list(getattr(module, "layout", {"": None}))
        for shard in shards:
            targets.add((path, shard, "weight"))
            if getattr(module, "bias", None) is not None:
                targets.add((path, shard, "bias"))
            if getattr(module, "scales_in_checkpoint", False):
                targets.add((path, shard, "weight_scale"))
    return targets


def _tied_to_other(model: nn.Module, path: str, module: nn.Module) -> bool:
    embed = getattr(model.model, "embed_tokens", None)
    return path == "lm_head" and embed is not None and module.weight is embed.weight


def resolve(model: nn.Module, name: str) -> tuple[str, str, str]:
    """Checkpoint name -> (our module path, shard, kind)."""
    module_path, _, kind = name.rpartition(".")
    if kind not in TENSOR_KINDS + ATTENTION_SCALES + ACTIVATION_SCALES:
        raise KeyError(name)
    parent, _, leaf = module_path.rpartition(".")
    shard = ""
    if leaf in model.packed:
        leaf, shard = model.packed[leaf]
        module_path = f"{parent}.{leaf}" if parent else leaf
    return module_path, shard, kind


def load_checkpoint(model: nn.Module, folder: str) -> None:
    expected = expected_targets(model)
    loaded: set[tuple[str, str, str]] = set()
    tied = model.config.tie_word_embeddings
    stage = model.stage
    # a last stage without the embedding reads a tied LM head from the embedding's tensor
    head_from_embed = tied and stage.last and not stage.first
    for path in checkpoint_files(folder):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                if name.endswith(IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
                    continue
                if head_from_embed and name == "model.embed_tokens.weight":
                    model.lm_head.load(f.get_slice(name), "", False)
                    loaded.add(("lm_head", "", "weight"))
                    continue
                if stage.elsewhere(name):
                    continue
                unexpected = f"unexpected tensor {name!r} in {os.path.basename(path)}"
                try:
                    target = resolve(model, name)
                    module = model.get_submodule(target[0])
                except (KeyError, AttributeError):
                    raise ValueError(unexpected) from None
                _, shard, kind = target
                if kind in ATTENTION_SCALES and hasattr(module, kind):
                    setattr(module, kind, f.get_tensor(name).item())
                    continue
                if kind in ACTIVATION_SCALES and getattr(module, "scales_in_checkpoint", False):
                    continue
                if target not in expected:
                    raise ValueError(unexpected)
                if f.get_slice(name).get_dtype() == "F8_E4M3" and not hasattr(module, "scales_in_checkpoint"):
                    raise ValueError(f"{name} is float8_e4m3fn, but it loads into a layer kept in the model's "
                                     "dtype (the checkpoint's quantization_config leaves it out, or none was given)")
                try:
                    if kind == "weight_scale":
                        module.load_scale(f.get_tensor(name), shard)
                    else:  # a lazy slice: each module indexes out only its own tensor-parallel part
                        module.load(f.get_slice(name), shard, kind == "bias")
                except ValueError as e:
                    raise ValueError(f"{name}: {e}") from None
                loaded.add(target)
    missing = sorted(expected - loaded)
    if missing:
        names = [f"{p}[{s}]" + ("" if k == "weight" else f".{k}") if s else f"{p}.{k}" for p, s, k in missing]
        raise ValueError(f"checkpoint {folder} lacks {len(missing)} tensors: {', '.join(names[:10])}")


def init_random(model: nn.Module, seed: int) -> None:
    """Random weights for benchmarks: small normal matrices, unit norms, so activations stay finite."""
    for i, (name, p) in enumerate(model.named_parameters()):
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
        else:
            gen = torch.Generator(device=p.device).manual_seed(seed * 100003 + i)
            p.data.normal_(0.0, 0.02, generator=gen)
