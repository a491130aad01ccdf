"""What the launcher and server need to know about a model without loading its weights."""

from __future__ import annotations

import os
from dataclasses import dataclass

from toka.config import ConfigError


@dataclass
class ModelInfo:
    hf_config: object  # transformers.PretrainedConfig
    vocab_size: int
    max_position_embeddings: int
    eos_token_ids: list[int]
    sampling_defaults: dict  # what generation_config.json sets of temperature, top_p, top_k

    @property
    def checkpoint_dtype(self) -> str | None:
        """The dtype config.json names (`dtype` in transformers 5, `torch_dtype` before)."""
        dtype = getattr(self.hf_config, "dtype", None) or getattr(self.hf_config, "torch_dtype", None)
        return str(dtype).removeprefix("torch.") if dtype is not None else None

    @classmethod
    def load(cls, model: str) -> "ModelInfo":
        from transformers import AutoConfig, GenerationConfig

        from workers.models import SUPPORTED_MODEL_TYPES

        if os.path.sep in model and not os.path.isdir(model):
            raise ConfigError(f"model folder {model!r} does not exist")
        try:
            cfg = AutoConfig.from_pretrained(model)
        except Exception as e:  # transformers raises several kinds for a missing or bad config
            raise ConfigError(f"cannot read a model config from {model!r}: {e}") from None
        if cfg.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type {cfg.model_type!r} is not supported; supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
            )
        eos, defaults = cfg.eos_token_id, {}
        try:
            gen = GenerationConfig.from_pretrained(model)
            eos = gen.eos_token_id or eos
            if gen.do_sample:  # only an explicit sampling setup overrides the API's defaults
                given = gen.to_diff_dict()  # only what the file sets, not transformers' own defaults
                defaults = {k: given[k] for k in ("temperature", "top_p", "top_k") if given.get(k) is not None}
        except OSError:
            pass  # no generation_config.json: the model config's EOS stands
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        return cls(cfg, cfg.vocab_size, cfg.max_position_embeddings, eos_ids, defaults)

    def check_architecture(self, max_model_len: int) -> None:
        from workers.models import model_class

        try:
            model_class(self.hf_config.model_type).check_config(self.hf_config, max_model_len)
        except ValueError as e:
            raise ConfigError(f"{self.hf_config.model_type}: {e}") from None

    def check_tp(self, tp: int) -> None:
        cfg = self.hf_config
        if cfg.num_attention_heads % tp:
            raise ConfigError(f"--tp {tp} does not divide the {cfg.num_attention_heads} attention heads")
        kv = cfg.num_key_value_heads
        if kv % tp and tp % kv:
            raise ConfigError(f"--tp {tp} neither divides nor is a multiple of the {kv} KV heads")
        if cfg.intermediate_size % tp:
            raise ConfigError(f"--tp {tp} does not divide the intermediate size {cfg.intermediate_size}")
