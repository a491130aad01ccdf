"""Llama (and the architectures that differ from it only by flags: see qwen2, qwen3, mistral)."""

from __future__ import annotations

import torch
from torch import nn

from workers.layers.attention import ForwardContext, SelfAttention
from workers.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from workers.layers.mlp import GatedMLP
from workers.layers.norm import RMSNorm
from workers.layers.parallel import PipelineStage, TPGroup
from workers.layers.rotary import RotaryEmbedding, rope_parameters


class DecoderLayer(nn.Module):
    def __init__(self, cfg, layer_id: int, rope: RotaryEmbedding, tp: TPGroup, qkv_bias: bool, qk_norm: bool):
        super().__init__()
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SelfAttention(
            layer_id, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, head_dim, rope, tp,
            qkv_bias=qkv_bias, qk_norm_eps=cfg.rms_norm_eps if qk_norm else None,
        )
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, tp)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, ctx: ForwardContext):
        """x: the previous layer's MLP output (the embeddings, with residual None, for the first
        layer); residual: the sum of all outputs before x. Returns the same pair for the next layer,
        so each residual add is fused into the norm after it."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, ctx)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg, tp: TPGroup, stage: PipelineStage, qkv_bias: bool, qk_norm: bool):
        super().__init__()
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        rope = RotaryEmbedding(head_dim, cfg.max_position_embeddings, rope_parameters(cfg))
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp) if stage.first else None
        # keyed by the global layer index, as checkpoints name them; the KV cache holds this stage's only
        self.layers = nn.ModuleDict({
            str(i): DecoderLayer(cfg, local, rope, tp, qkv_bias, qk_norm) for local, i in enumerate(stage.layers)
        })
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if stage.last else None

    def forward(self, inputs: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """inputs: token ids on the first stage, else the previous stage's output. Returns the final
        norm's output on the last stage, else the residual stream (x + residual) for the next."""
        x, residual = (self.embed_tokens(inputs) if self.embed_tokens is not None else inputs), None
        for layer in self.layers.values():
            x, residual = layer(x, residual, ctx)
        if self.norm is None:
            return x + residual
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    # Flags the variants set; checkpoint names that load into fused parameters.
    qkv_bias = False
    qk_norm = False
    packed = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up"),
    }

    def __init__(self, cfg, tp: TPGroup, stage: PipelineStage | None = None):
        super().__init__()
        self.config = cfg
        self.stage = stage = stage or PipelineStage.of(cfg.num_hidden_layers)
        qkv_bias = getattr(cfg, "attention_bias", False) or self.qkv_bias
        self.model = LlamaModel(cfg, tp, stage, qkv_bias, self.qk_norm)
        # a last stage without the embedding loads its own copy of a tied one (weights.py)
        tied = self.model.embed_tokens if cfg.tie_word_embeddings else None
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp, tied=tied) if stage.last else None

    @classmethod
    def check_config(cls, cfg, max_model_len: int) -> None:
        """Called at launch: refuses settings this implementation would silently get wrong."""
        if getattr(cfg, "mlp_bias", False):
            raise ValueError("mlp_bias=True is not supported")
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {cfg.hidden_act!r} is not supported (silu only)")

    def forward(self, inputs: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Final-norm hidden states [tokens, hidden] (the stage's output under pipeline parallelism);
        the runner maps the rows it samples through `lm_head`."""
        return self.model(inputs, ctx)
