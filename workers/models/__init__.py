"""The model registry: Hugging Face `model_type` -> model class. Adding an architecture is one
file in this folder plus one line here (docs/adding-a-model.md)."""

from workers.models.llama import LlamaForCausalLM
from workers.models.mistral import MistralForCausalLM
from workers.models.qwen2 import Qwen2ForCausalLM
from workers.models.qwen3 import Qwen3ForCausalLM

MODELS = {
    "llama": LlamaForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "qwen3": Qwen3ForCausalLM,
    "mistral": MistralForCausalLM,
}
SUPPORTED_MODEL_TYPES = frozenset(MODELS)


def model_class(model_type: str):
    try:
        return MODELS[model_type]
    except KeyError:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(MODELS))}") from None
