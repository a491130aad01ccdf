"""Checkpoint loading: declarative name mapping, strictness, sharded files, tied embeddings, the
parts of pipeline stages."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from tools.make_model import make_model
from workers.layers.parallel import PipelineStage, TPGroup
from workers.models import model_class
from workers.weights import load_checkpoint


def build(path, stage: int = 0, stages: int = 1):
    cfg = AutoConfig.from_pretrained(path)
    return model_class(cfg.model_type)(cfg, TPGroup(), PipelineStage.of(cfg.num_hidden_layers, stage, stages))


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
    attn = model.model.layers["1"].self_attn
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


def test_pipeline_stages_split_the_layers_evenly():
    assert [PipelineStage.of(10, i, 4).layers for i in range(4)] == [range(0, 3), range(3, 6), range(6, 8), range(8, 10)]
    assert [PipelineStage.of(2, i, 2).layers for i in range(2)] == [range(0, 1), range(1, 2)]
    with pytest.raises(ValueError, match="--pp 3 needs at least as many layers, but the model has 2"):
        PipelineStage.of(2, 0, 3)


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-qwen3"])  # untied and tied embeddings
def test_pipeline_stages_load_their_own_tensors(tmp_path, shape):
    """Each stage loads exactly its layers (strictly: nothing missing), the first the embedding, the
    last the norm and the LM head; a tied head on a last stage without the embedding is its copy."""
    path = make_model(shape, tmp_path / "m")
    whole = build(path)
    load_checkpoint(whole, str(path))
    parts = [build(path, s, 2) for s in range(2)]
    for part in parts:
        load_checkpoint(part, str(path))
    first, last = parts
    assert first.lm_head is None and first.model.norm is None and list(first.model.layers) == ["0"]
    assert last.model.embed_tokens is None and list(last.model.layers) == ["1"]
    assert last.model.layers["1"].self_attn.layer_id == 0  # the stage's KV cache holds its layers only
    expected = whole.state_dict()
    for part in parts:
        for name, tensor in part.state_dict().items():
            assert torch.equal(tensor, expected[name]), name
    assert torch.equal(last.lm_head.weight, whole.model.embed_tokens.weight if whole.config.tie_word_embeddings
                       else whole.lm_head.weight)
