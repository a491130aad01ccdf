from workers.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True  # RMSNorm over each head of q and k before the rotary embedding
