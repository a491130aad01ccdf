"""What the launcher and server need to know about a model without loading its weights."""

from __future__ import annotations

import os
from dataclasses import dataclass

from toka.config import ConfigError

# What the engine reads of a hub repository; nothing else is downloaded (no .bin or GGUF copies).
TOKENIZER_FILES = ["tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                   "chat_template.*", "*.tiktoken"]
MODEL_FILES = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
               *TOKENIZER_FILES]


def local_folder(name: str, flag: str, files: list[str], revision: str | None = None) -> str:
    """The folder `name` names, or, for a hub id, its snapshot in the hub cache (downloaded when
    missing). The launcher calls this once, before any child starts, so every process reads the same
    local files and no child ever talks to the hub. huggingface_hub itself honours HF_HOME,
    HF_HUB_OFFLINE and HF_TOKEN."""
    if os.path.isdir(name):
        if revision is not None:
            raise ConfigError(f"--revision picks a version of a hub id; {flag} {name!r} is a folder")
        return name
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:  # a path: hub ids are NAME or ORG/NAME
        raise ConfigError(f"{flag} folder {name!r} does not exist")
    from huggingface_hub import constants, errors, snapshot_download

    try:
        return snapshot_download(name, revision=revision, allow_patterns=files)
    except errors.HFValidationError:
        raise ConfigError(f"{flag} {name!r} is neither a folder nor a hub id") from None
    except errors.RevisionNotFoundError:
        raise ConfigError(f"--revision {revision!r} does not exist in the hub repository {name!r}") from None
    except errors.RepositoryNotFoundError:  # also what a private or gated one answers without a token
        raise ConfigError(f"{flag} {name!r} is no folder, and no hub repository this machine may read "
                          "(a private or gated one needs HF_TOKEN)") from None
    except errors.LocalEntryNotFoundError as e:
        if constants.HF_HUB_OFFLINE:
            raise ConfigError(f"{flag} {name!r} is no folder and not in the hub cache {constants.HF_HUB_CACHE}, "
                              f"and HF_HUB_OFFLINE=1 forbids downloading it: run `hf download {name}` where "
                              "the hub is reachable, point HF_HOME at a cache that holds it, or unset "
                              "HF_HUB_OFFLINE") from None
        raise ConfigError(f"{flag} {name!r} is no folder, not in the hub cache, and cannot be downloaded: {e}") from None
    except OSError as e:  # the hub's HTTP errors and the disk's
        raise ConfigError(f"downloading {flag} {name!r} failed: {e}") from None


@dataclass
class ModelInfo:
    hf_config: object  # transformers.PretrainedConfig
    vocab_size: int
    max_position_embeddings: int
    eos_token_ids: list[int]
    sampling_defaults: dict  # what generation_config.json sets of temperature, top_p, top_k

    @property
    def num_layers(self) -> int:
        return self.hf_config.num_hidden_layers

    @property
    def checkpoint_dtype(self) -> str | None:
        """The dtype config.json names (`dtype` in transformers 5, `torch_dtype` before)."""
        dtype = getattr(self.hf_config, "dtype", None) or getattr(self.hf_config, "torch_dtype", None)
        return str(dtype).removeprefix("torch.") if dtype is not None else None

    @property
    def quantization(self) -> str | None:
        """fp8 when the checkpoint's weights are already e4m3 with scales (a `quantization_config` of the
        fbgemm_fp8, fp8 or compressed-tensors float-quantized kind), else None."""
        from workers.quant import Fp8Checkpoint

        q = getattr(self.hf_config, "quantization_config", None)
        if q is None:
            return None
        try:
            Fp8Checkpoint.parse(q if isinstance(q, dict) else q.to_dict())
        except ValueError as e:
            raise ConfigError(f"the checkpoint's quantization_config: {e}") from None
        return "fp8"

    @classmethod
    def load(cls, model: str) -> "ModelInfo":
        """`model` is a folder (local_folder resolved a hub id already)."""
        from transformers import AutoConfig, GenerationConfig

        from workers.models import SUPPORTED_MODEL_TYPES

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
