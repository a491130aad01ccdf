"""Write a random-weight Hugging Face-format causal LM folder for tests and benchmarks.

Usage:
    python -m tools.make_model SHAPE OUT_DIR [--seed 0] [--dtype float32|bfloat16] [--shard-size-mb N]
                                             [--quantize fp8|fp8-tensor]

The folder holds config.json, generation_config.json, safetensors weights (sharded with an
index when large or when asked) and a byte-level BPE tokenizer whose size equals the
config's vocab_size, so it loads with `AutoModelForCausalLM` / `AutoTokenizer` offline.
"""

import argparse
import heapq
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, GenerationConfig, PreTrainedTokenizerFast

from toka.server.token_bytes import bytes_to_unicode  # the alphabet the served tokens' bytes are read in
from tools.fp8_checkpoint import STRATEGIES, fp8_tensors, quantization_config

_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048, rope_theta=10000.0)

SHAPES = {
    "tiny-llama": dict(_SMALL, model_type="llama", head_dim=16, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                         original_max_position_embeddings=256)),
    "tiny-qwen2": dict(_SMALL, model_type="qwen2", rms_norm_eps=1e-6, tie_word_embeddings=True),
    "tiny-qwen3": dict(_SMALL, model_type="qwen3", head_dim=32, rms_norm_eps=1e-6, tie_word_embeddings=True),
    "tiny-mistral": dict(_SMALL, model_type="mistral", rms_norm_eps=1e-5, sliding_window=None,
                         tie_word_embeddings=False),
    # small but with a head size FlashInfer's prebuilt kernels cover: GPU tests
    "small-llama": dict(_SMALL, model_type="llama", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                        head_dim=64, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                         rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192), tie_word_embeddings=True),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192), tie_word_embeddings=False),
    "qwen3-0.6b": dict(model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                       max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
                       max_window_layers=28, tie_word_embeddings=True),
}

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Recipe of the small shapes (tiny-*, small-llama), used by the float32 CPU tests.
LOGIT_STD = 10.0  # std of final logits: top-1 probability is usually > 0.5, so greedy decoding is stable
ATTN_SCALE = 2.0  # extra query scale: attention scores get std ~2, so outputs depend on which tokens came before
BIAS_STD = 0.2  # enough for a missing q/k/v bias to change most argmaxes without swamping the inputs
# Recipe of the real shapes, which are also run in bfloat16 (see init_real_params). bfloat16 rounds
# the residual stream at each of the 2 * layers additions, so the final hidden state is off by
# 1-2% whatever the weights, and every logit by that fraction of the logits' spread. The logits
# are therefore kept small (std ~1) except for a few designed candidates per position.
REAL_EMBED_STD = 1.5  # embedding entries: a large, exactly stored part of the residual stream
REAL_ATTN_SCALE = 1.0  # extra query scale (sharper attention amplifies rounding)
NEXT_TOKENS = 3  # candidate next tokens per token, written by the last layer's MLP
NEXT_SPREAD = 0.08  # candidate strengths are U(1 - NEXT_SPREAD, 1): context decides between close ones
TOP_LOGIT = 15.0  # logit of a full-strength candidate
BULK_STD = 1.0  # std of all other logits (more if hidden < 900); bfloat16 moves them by ~1-2% of this
LOOKUP_GATE = 4.0  # gate and up pre-activations of the last MLP's neuron for the current token
# variance per element that one random decoder layer adds to the residual stream (measured)
LAYER_VAR = {"llama": 0.67, "qwen3": 0.79}
FIRST_WORD_ID = 256 + len(SPECIAL_TOKENS)  # ids below are bytes and special tokens: never candidates
DEFAULT_SHARD_MB = 2000  # models above this size are sharded even without --shard-size-mb
_LETTER_FREQ = dict(zip("etaoinshrdlcumwfgypbvkjxqz", [12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8,
                                                      2.8, 2.4, 2.4, 2.2, 2.0, 2.0, 1.9, 1.5, 1.0, .8, .15, .15, .1, .07]))


def build_merges(count: int) -> list[tuple[str, str]]:
    """Return `count` BPE merges for English-looking pieces, most likely first.

    A piece is an optional leading space marker "Ġ" followed by lowercase letters; its score is
    the product of unigram letter frequencies, so a prefix always outranks its extensions and every
    merge (piece[:-1], piece[-1]) only uses tokens that already exist. Pieces are enumerated
    best-first with a heap holding one "next sibling" per parent, which keeps this fast for 150k merges.
    """
    total = sum(_LETTER_FREQ.values())
    letters = sorted(_LETTER_FREQ, key=lambda c: -_LETTER_FREQ[c])
    logp = {c: math.log(_LETTER_FREQ[c] / total) for c in letters}
    logp["Ġ"] = math.log(0.18)
    heap = [(-(logp[s] + logp[letters[0]]), s, 0) for s in ["Ġ"] + letters]
    heapq.heapify(heap)
    merges = []
    while len(merges) < count:
        neg_score, parent, i = heapq.heappop(heap)
        piece = parent + letters[i]
        merges.append((parent, letters[i]))
        if i + 1 < len(letters):
            heapq.heappush(heap, (neg_score - logp[letters[i + 1]] + logp[letters[i]], parent, i + 1))
        heapq.heappush(heap, (neg_score - logp[letters[0]], piece, 0))
    return merges


def build_tokenizer(vocab_size: int, model_max_length: int = 2048) -> PreTrainedTokenizerFast:
    """Byte-level BPE with exactly `vocab_size` ids: 256 bytes, the special tokens, then merges.

    Every id is a real token, so anything the model samples decodes, and byte fallback means
    any text round-trips.
    """
    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    merges = build_merges(vocab_size - len(vocab))
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE, model_max_length=model_max_length)


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> None:
    """Save with the chat template inside tokenizer_config.json (where most engines look for it)."""
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    special = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
               "unk_token": tokenizer.unk_token, "pad_token": tokenizer.pad_token}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def build_config(shape: str, tokenizer: PreTrainedTokenizerFast, dtype: str):
    """The transformers config for `shape`, with special-token ids taken from the tokenizer."""
    fields = dict(SHAPES[shape])
    model_type = fields.pop("model_type")
    return AutoConfig.for_model(model_type, **fields, dtype=dtype, bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def param_shapes(config) -> list[tuple[str, tuple[int, ...]]]:
    """HF parameter names and shapes in file order; tied models have no lm_head.weight."""
    h, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q_dim, kv_dim = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    params = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        params += [(p + "input_layernorm.weight", (h,)),
                   (p + "self_attn.q_proj.weight", (q_dim, h)),
                   (p + "self_attn.k_proj.weight", (kv_dim, h)),
                   (p + "self_attn.v_proj.weight", (kv_dim, h))]
        if config.model_type == "qwen2" or getattr(config, "attention_bias", False):
            params += [(p + "self_attn.q_proj.bias", (q_dim,)), (p + "self_attn.k_proj.bias", (kv_dim,)),
                       (p + "self_attn.v_proj.bias", (kv_dim,))]
        if config.model_type == "qwen3":
            params += [(p + "self_attn.q_norm.weight", (head_dim,)), (p + "self_attn.k_norm.weight", (head_dim,))]
        params += [(p + "self_attn.o_proj.weight", (h, q_dim)),
                   (p + "post_attention_layernorm.weight", (h,)),
                   (p + "mlp.gate_proj.weight", (inter, h)),
                   (p + "mlp.up_proj.weight", (inter, h)),
                   (p + "mlp.down_proj.weight", (h, inter))]
    params.append(("model.norm.weight", (h,)))
    if not config.tie_word_embeddings:
        params.append(("lm_head.weight", (vocab, h)))
    return params


def init_param(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Small shapes: random float32 values chosen so the model is confident and its output depends on the context.

    Linear weights are N(0, 1/fan_in), so every sub-layer output is O(1) whatever the width; queries
    are ATTN_SCALE times larger (through q_proj, or q_norm for Qwen3) so attention is not just an
    average. Norm weights are drawn from U(0.5, 1.5) so that swapped or ignored norms change the
    output. Embeddings and lm_head rows have std 1/sqrt(hidden), small next to the residual stream,
    so a tied lm_head does not simply predict the current token again; the final norm then scales
    the logits up to LOGIT_STD.
    """
    if name == "model.norm.weight":
        return torch.full(shape, LOGIT_STD)
    if name.endswith("norm.weight"):
        scale = ATTN_SCALE if name.endswith("q_norm.weight") else 1.0
        return (torch.rand(shape, generator=gen) + 0.5) * scale
    if name.endswith(".bias"):
        return torch.randn(shape, generator=gen) * BIAS_STD
    scale = ATTN_SCALE if name.endswith("q_proj.weight") else 1.0
    return torch.randn(shape, generator=gen) * (scale / math.sqrt(shape[1]))


def is_real_shape(config) -> bool:
    """Real shapes get init_real_params; the small test shapes keep init_param."""
    return config.vocab_size > 4 * FIRST_WORD_ID and config.intermediate_size // NEXT_TOKENS > FIRST_WORD_ID + 1


def _unembedding_rows(seed: int, rows: int, hidden: int, chunk: int = 4096) -> torch.Tensor:
    """The first `rows` rows of an untied lm_head, drawn in fixed chunks from their own generator,
    so the last MLP can use some rows before the whole lm_head is drawn and written."""
    gen = torch.Generator().manual_seed(seed + 2_000_003)
    out = [torch.randn(min(chunk, rows - start), hidden, generator=gen) / math.sqrt(hidden)
           for start in range(0, rows, chunk)]
    return torch.cat(out)


def init_real_params(config, seed: int):
    """Yield (name, float32 tensor) in file order for a real shape: a random transformer whose last
    MLP is a next-token lookup, made to give close logprobs in bfloat16 and float32.

    Every layer but the last is random as for the small shapes: norm weights U(0.5, 1.5), linears
    N(0, 1/fan_in), queries REAL_ATTN_SCALE larger. Embedding entries have std REAL_EMBED_STD, so
    the embedding (stored, hence exact) is a large part of the residual stream.

    The last layer's MLP gives each token t of ids [0, K), K = intermediate_size // NEXT_TOKENS,
    NEXT_TOKENS neurons: gate and up rows along t's embedding (they fire when t is the current
    token) and down columns along the unembedding rows of candidate next tokens (random word pieces
    other than t) with strengths U(1 - NEXT_SPREAD, 1). The final norm weights have random signs,
    which the down columns share, so a candidate's logit is about TOP_LOGIT times its strength,
    while the current token's own embedding (tied models) adds nothing on average. All other logits
    are random with std BULK_STD; the context, through the random layers, shifts every logit by a
    fraction of that and so decides between candidates of similar strength. bfloat16 rounding moves
    logits by only ~1-2% of BULK_STD, so argmaxes rarely flip and logprobs stay close, and greedy
    text (lowercase word pieces) depends on the prompt without repeating the current token.
    """
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    tied = config.tie_word_embeddings
    specs = param_shapes(config)
    gen = torch.Generator().manual_seed(seed)
    sgen = torch.Generator().manual_seed(seed + 1_000_003)
    signs = torch.randint(0, 2, (h,), generator=sgen).float() * 2 - 1
    count = inter // NEXT_TOKENS
    token = torch.arange(inter) % count  # neuron -> current token; the first few tokens get one more
    cand = torch.randint(FIRST_WORD_ID, count - 1, (inter,), generator=sgen)
    cand += (cand >= token).long() * (token >= FIRST_WORD_ID).long()  # never the token itself
    strength = 1 - NEXT_SPREAD * torch.rand(inter, generator=sgen)
    final_gain = torch.rand(h, generator=sgen) * 0.2 + 0.9
    # residual stream rms at the last MLP's input: embedding, layers - 1 random layers, one attention
    layer_var = LAYER_VAR.get(config.model_type, 0.72)
    rms = math.sqrt(REAL_EMBED_STD ** 2 + layer_var * (layers - 0.5))
    # A candidate's logit is sqrt(h) * share times the std of the other logits, where share is the
    # part of the final hidden state along its unembedding row. The candidates of one token are
    # near-orthogonal, so each adds share^2 of the final squared norm and the stream keeps the rest.
    share = min(TOP_LOGIT / (math.sqrt(h) * BULK_STD), math.sqrt(0.75 / NEXT_TOKENS))  # cap for small h
    bulk_std = TOP_LOGIT / (math.sqrt(h) * share)
    out_ratio = share / math.sqrt(1 - NEXT_TOKENS * share ** 2)  # one candidate's norm / stream norm
    unembed_norm = REAL_EMBED_STD * math.sqrt(h) if tied else 1.0
    last = f"model.layers.{layers - 1}.mlp."
    embed_rows = None
    for name, shape in specs:
        if name == "model.embed_tokens.weight":
            t = torch.randn(shape, generator=gen) * REAL_EMBED_STD
            embed_rows = t[:count].clone()
        elif name.startswith(last):
            if not name.endswith("down_proj.weight"):
                unit = embed_rows / embed_rows.norm(dim=1, keepdim=True)
                # dot with the normed input is ~1 for the current token, ~1/sqrt(h) for others
                t = unit[token] * (LOOKUP_GATE * rms / (math.sqrt(h) * REAL_EMBED_STD))
                if name.endswith("up_proj.weight"):
                    t *= strength[:, None]
            else:
                rows = embed_rows if tied else _unembedding_rows(seed, count, h)
                u = rows[cand]
                u = u / u.norm(dim=1, keepdim=True)
                act = LOOKUP_GATE * LOOKUP_GATE / (1 + math.exp(-LOOKUP_GATE))  # silu(gate) * up
                t = (signs[:, None] * u.T) * (out_ratio * math.sqrt(h) * rms / act)
        elif name == "model.norm.weight":
            t = signs * final_gain * (bulk_std / unembed_norm)
        elif name == "lm_head.weight":
            t = _unembedding_rows(seed, shape[0], h)
        elif name.endswith("norm.weight"):
            scale = REAL_ATTN_SCALE if name.endswith("q_norm.weight") else 1.0
            t = (torch.rand(shape, generator=gen) + 0.5) * scale
        elif name.endswith(".bias"):
            t = torch.randn(shape, generator=gen) * BIAS_STD
        else:
            scale = REAL_ATTN_SCALE if name.endswith("q_proj.weight") else 1.0
            t = torch.randn(shape, generator=gen) * (scale / math.sqrt(shape[1]))
        yield name, t.contiguous()


def write_weights(config, out_dir: Path, seed: int, dtype: str, shard_size_mb: float | None,
                  quantize: str | None = None) -> list[Path]:
    """Generate and write the weights one shard at a time, so peak memory is about one shard.

    Values are drawn in float32 in a fixed order, so a given seed gives the same model for any
    shard size, and the bfloat16 model is the rounded float32 one; `quantize` (tools/fp8_checkpoint.py)
    stores that model's linear weights in FP8.
    """
    torch_dtype = getattr(torch, dtype)
    specs = param_shapes(config)
    item = torch.tensor([], dtype=torch_dtype).element_size()
    sizes = [math.prod(shape) * item for _, shape in specs]
    total = sum(sizes)
    limit = (shard_size_mb or DEFAULT_SHARD_MB) * 10**6
    shards: list[list[int]] = [[]]
    used = 0
    for i, size in enumerate(sizes):
        if shards[-1] and used + size > limit:
            shards.append([])
            used = 0
        shards[-1].append(i)
        used += size
    if shard_size_mb is None and total <= limit:
        shards = [list(range(len(specs)))]
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    if is_real_shape(config):
        params = init_real_params(config, seed)
    else:
        gen = torch.Generator().manual_seed(seed)
        params = ((name, init_param(name, shape, gen)) for name, shape in specs)
    weight_map = {}
    for fname, members in zip(names, shards):
        tensors = {}
        for i in members:
            name, tensor = next(params)
            assert name == specs[i][0] and tuple(tensor.shape) == specs[i][1], name
            stored = {name: tensor.to(torch_dtype)}
            if quantize:
                stored = fp8_tensors(name, stored[name], quantize)
            tensors.update(stored)
            weight_map.update(dict.fromkeys(stored, fname))
        save_file(tensors, str(out_dir / fname), metadata={"format": "pt"})
        del tensors
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [out_dir / n for n in names]


def make_model(shape: str, out_dir, seed: int = 0, dtype: str = "float32",
               shard_size_mb: float | None = None, weights: bool = True, quantize: str | None = None) -> Path:
    """Write the model folder for `shape` into `out_dir` and return its path; without `weights`,
    only the config and tokenizer (enough for `--load-format random`). `quantize`: fp8 (a scale per
    output channel) or fp8-tensor (one per tensor) writes the linear weights in FP8, compressed-tensors'
    format."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16, not {dtype!r}")
    if quantize not in (None, *STRATEGIES):
        raise ValueError(f"quantize must be one of {', '.join(STRATEGIES)}, not {quantize!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in list(out_dir.glob("model*.safetensors")) + list(out_dir.glob("model.safetensors.index.json")):
        old.unlink()
    tokenizer = build_tokenizer(SHAPES[shape]["vocab_size"], SHAPES[shape]["max_position_embeddings"])
    assert len(tokenizer) == SHAPES[shape]["vocab_size"]
    config = build_config(shape, tokenizer, dtype)
    if quantize:
        config.quantization_config = quantization_config(quantize)
    config.save_pretrained(out_dir)
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=eos,
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(out_dir)
    save_tokenizer(tokenizer, out_dir)
    if weights:
        write_weights(config, out_dir, seed, dtype, shard_size_mb, quantize)
    return out_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shape", choices=list(SHAPES))
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--shard-size-mb", type=float, default=None,
                        help=f"shard the weights into files of at most N MB (default: one file up to "
                             f"{DEFAULT_SHARD_MB} MB)")
    parser.add_argument("--no-weights", action="store_true",
                        help="write only the config and tokenizer, for --load-format random")
    parser.add_argument("--quantize", choices=list(STRATEGIES), default=None,
                        help="linear weights in float8_e4m3fn with a scale per output channel (fp8) or per tensor "
                             "(fp8-tensor), in the compressed-tensors format")
    args = parser.parse_args(argv)
    out = make_model(args.shape, args.out_dir, seed=args.seed, dtype=args.dtype, shard_size_mb=args.shard_size_mb,
                     weights=not args.no_weights, quantize=args.quantize)
    print(out)


if __name__ == "__main__":
    main()
