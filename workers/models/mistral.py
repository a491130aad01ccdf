from workers.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    """Llama's layers. A sliding window is refused unless no sequence can outgrow it."""

    @classmethod
    def check_config(cls, cfg, max_model_len: int) -> None:
        super().check_config(cfg, max_model_len)
        window = getattr(cfg, "sliding_window", None)
        if window is not None and max_model_len > window:
            raise ValueError(
                f"sliding_window={window} is not implemented; launch with --max-model-len {window} or less"
            )
