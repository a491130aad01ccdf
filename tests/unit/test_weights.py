"""Checkpoint loading: declarative name mapping, strictness, sharded files, tied embeddings."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from tools.make_model import make_model
from workers.layers.parallel import TPGroup
from workers.models import model_class
from workers.weights import load_checkpoint


def build(path):
    cfg = AutoConfig.from_pretrained(path)
    return model_class(cfg.model_type)(cfg, TPGroup())


def test_sharded_checkpoint_loads_the_same_weights(tmp_path):
    one = make_model("tiny-qwen2", tmp_path / "one")
    many = make_model("tiny-qwen2", tmp_path / "many", shard_size_mb=0.05)
    assert (many / "model.safetensors.index.json").exists()
    a, b = build(one), build(many)
    load_checkpoint(a, str(one))
    load_checkpoint(b, str(many))
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name


def test_fused_parameters_hold_the_checkpoint_tensors(tmp_path):
    path = make_model("tiny-qwen3", tmp_path / "m")
    model = build(path)
    load_checkpoint(model, str(path))
    sd = load_file(str(path / "model.safetensors"))
    attn = model.model.layers[1].self_attn
    q, k, v = (sd[f"model.layers.1.self_attn.{n}_proj.{w}"] for n in "qkv" for w in ["weight"])
    assert torch.equal(attn.qkv_proj.weight, torch.cat([q, k, v]))
    assert torch.equal(attn.q_norm.weight, sd["model.layers.1.self_attn.q_norm.weight"])
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied


def rewrite(path, change):
    sd = load_file(str(path / "model.safetensors"))
    change(sd)
    save_file(sd, str(path / "model.safetensors"))


def test_missing_tensor_is_named(tmp_path):
    path = make_model("tiny-llama", tmp_path / "m")
    rewrite(path, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.gate_up_proj\[up\]"):
        load_checkpoint(build(path), str(path))


def test_unexpected_tensor_is_named(tmp_path):
    path = make_model("tiny-llama", tmp_path / "m")
    rewrite(path, lambda sd: sd.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.mlp\.extra\.weight'"):
        load_checkpoint(build(path), str(path))


def test_untied_model_needs_its_lm_head(tmp_path):
    path = make_model("tiny-mistral", tmp_path / "m")
    rewrite(path, lambda sd: sd.pop("lm_head.weight"))
    with pytest.raises(ValueError, match="lm_head"):
        load_checkpoint(build(path), str(path))


def test_unknown_architecture_lists_supported_types(tmp_path):
    from toka.config import ConfigError
    from toka.model_info import ModelInfo

    path = make_model("tiny-llama", tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="llama, mistral, qwen2, qwen3"):
        ModelInfo.load(str(path))


def test_mistral_sliding_window_is_refused_unless_the_context_fits(tmp_path):
    from toka.config import ConfigError, EngineConfig

    path = make_model("tiny-mistral", tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["sliding_window"] = 64
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="--max-model-len 64"):
        EngineConfig(model=str(path), device="cpu").resolve()
    assert EngineConfig(model=str(path), device="cpu", max_model_len=64).resolve().max_model_len == 64
