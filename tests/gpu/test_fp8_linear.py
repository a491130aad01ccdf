"""FP8 linear layers on CUDA (sm89 or later): the FP8 matmul against bf16 at Llama-3.2-1B's shapes, the
Triton activation kernel against its torch reference bit for bit, CUDA-graph capture, and whole models
in FP8 through the rank's build() against bf16."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
    pytest.skip("needs a CUDA GPU with FP8 tensor cores (sm89 or later)", allow_module_level=True)

import torch.nn.functional as F  # noqa: E402

from tests.helpers import fp8_against_bf16, prefill_plan  # noqa: E402
from tests.unit.test_make_model import MID  # noqa: E402
from toka.config import EngineConfig  # noqa: E402
from tools.make_model import FIRST_WORD_ID, SHAPES, make_model  # noqa: E402
from workers.layers.fp8 import FP8_MAX, MIN_AMAX, fp8_linear, quantize_rows  # noqa: E402
from workers.layers.fp8_kernel import quantize_rows_cuda  # noqa: E402

DEV = torch.device("cuda")
# Llama-3.2-1B's linears: qkv (32 + 2 x 8 heads of 64), gate_up (2 x 8192), down
SHAPES_1B = {"qkv": (2048, 3072), "gate_up": (2048, 16384), "down": (8192, 2048)}


def randn(*shape, seed: int, scale: float = 1.0, dtype=torch.bfloat16) -> torch.Tensor:
    g = torch.Generator(device=DEV).manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, device=DEV)).to(dtype)


@pytest.mark.parametrize("tokens", [1, 16, 512])
@pytest.mark.parametrize("name", list(SHAPES_1B))
def test_fp8_linear_is_within_e4m3s_error_of_bf16(name, tokens):
    """e4m3 keeps 3 mantissa bits: an element's relative error is at most 2^-4, and 0.026 RMS over
    Gaussian values (tests/unit/test_fp8.py measures both). An output sums K products that each carry
    an activation's and a weight's independent error, and errors and values both add up as random sums
    over K, so the output's relative RMS error is sqrt(2) x 0.026 = 0.037 whatever K (0.037 measured on
    the CPU at these shapes); bf16's own rounding adds 0.002. Bounds: 0.045 over the whole output and
    0.06 for any token's row (thousands of outputs each, so a row's error is close to the mean). Against
    the float64 product of the same e4m3 values only the bf16 output rounding (2^-8) and fp32
    accumulation remain: Hopper's FP8 tensor cores add partial sums in fewer bits than float32, so the
    product is held to 2^-7 of its norm (bf16's rounding alone is ~2^-9), not element by element."""
    k, n = SHAPES_1B[name]
    x = randn(tokens, k, seed=0)
    w = randn(n, k, seed=1, scale=k**-0.5)
    wq, ws = quantize_rows(w)
    y = fp8_linear(x, wq, ws.view(-1))
    ref = F.linear(x, w).float()
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    err = (y.float() - ref).norm(dim=1) / ref.norm(dim=1)
    total = ((y.float() - ref).norm() / ref.norm()).item()
    assert total < 0.045 and err.max().item() < 0.06, (total, err.max().item())
    xq, xs = quantize_rows(x)
    exact = (xq.double() * xs.double()) @ (wq.double() * ws.double()).t()
    assert ((y.double() - exact).norm() / exact.norm()).item() < 2**-7


def test_fp8_linear_with_a_bias_in_bf16_and_fp16():
    for dtype in (torch.bfloat16, torch.float16):
        x = randn(33, 2048, seed=0, dtype=dtype)
        w = randn(3072, 2048, seed=1, scale=2048**-0.5)
        bias = randn(3072, seed=2, dtype=dtype)
        wq, ws = quantize_rows(w)
        y = fp8_linear(x, wq, ws.view(-1), bias)
        ref = F.linear(x.float(), w.float(), bias.float())
        assert y.dtype == dtype and ((y.float() - ref).norm() / ref.norm()).item() < 0.045


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows,cols", [(1, 2048), (333, 8192), (7, 100), (64, 20000)])  # 20000: the chunked loop
def test_the_activation_kernel_computes_the_torch_references_bits(rows, cols, dtype):
    """Values and scales bit for bit, over rows of magnitudes 1e-4 to 1e4, an all-zero row and rows read
    with a stride (a slice of wider activations). Not under TRITON_INTERPRET: the interpreter's cast to
    e4m3 rounds ties away from zero and loses the carry into the exponent (124.3 -> 64)."""
    wide = randn(rows, cols + 24, seed=3, dtype=torch.float32)
    wide *= torch.logspace(-4, 4, rows, device=DEV)[:, None]
    if rows > 1:
        wide[rows // 2] = 0
    x = wide.to(dtype)[:, :cols]
    q, scale = quantize_rows_cuda(x, FP8_MAX, MIN_AMAX)
    want_q, want_scale = quantize_rows(x)
    assert q.is_contiguous() and scale.shape == (rows, 1)
    assert torch.equal(scale, want_scale)
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))


def test_fp8_linear_replays_in_a_cuda_graph():
    x = randn(8, 2048, seed=0)
    wq, ws = quantize_rows(randn(3072, 2048, seed=1, scale=2048**-0.5))
    eager = fp8_linear(x, wq, ws.view(-1))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fp8_linear(x, wq, ws.view(-1))  # compiles the kernel outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp8_linear(x, wq, ws.view(-1))
    x.copy_(randn(8, 2048, seed=5))
    graph.replay()
    assert torch.equal(out, fp8_linear(x, wq, ws.view(-1))) and not torch.equal(out, eager)


def test_the_whole_model_in_fp8_stays_close_to_bf16(tmp_path, monkeypatch):
    """As tests/unit/test_fp8_checkpoint.py on the CPU (FP8's error reorders a position's close candidates
    at about one position in ten), here with FlashInfer and CUDA graphs captured at build."""
    monkeypatch.setitem(SHAPES, "mid-llama", MID)
    path = str(make_model("mid-llama", tmp_path / "m", dtype="bfloat16"))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(FIRST_WORD_ID, 1024, (96,), generator=g).tolist() for _ in range(8)]
    same, mean, most = fp8_against_bf16(path, "cuda", prompts, kv_cache_tokens=4096, max_seqs=16)
    assert same >= 0.8 and mean < 0.12 and most < 0.8, (same, mean, most)


def test_random_weights_of_a_real_shape_run_in_fp8(tmp_path):
    """Llama-3.2-1B's shapes with --load-format random: the random bf16 weights quantized after they are
    drawn; a prefill gives finite logprobs, and the linears hold e4m3."""
    from workers.rank import build

    path = str(make_model("llama-3.2-1b", tmp_path / "m", weights=False))
    cfg = EngineConfig(model=path, device="cuda", dtype="bfloat16", load_format="random", quantization="fp8",
                       kv_cache_tokens=8192, max_seqs=8, max_tokens_per_forward=2048, max_model_len=4096).resolve()
    runner, _ = build(cfg, 0)
    layer = runner.model.model.layers["0"]
    assert layer.mlp.down_proj.weight.dtype == torch.float8_e4m3fn
    assert layer.self_attn.qkv_proj.weight_scale.shape == (3072,)
    result = runner.step(prefill_plan(0, [list(range(300, 812))], runner.page_size, prompt_logprobs=0))
    assert all(abs(lp) < 1e3 for lp in result.prompt[0].logprobs)
    runner.close()
