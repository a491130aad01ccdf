"""The pieces' forward without copies: the qkv projection writes into the fixed buffer it is given,
and Pieces copies only q, k or v that come from elsewhere (CPU; the graphs themselves are
tests/gpu/test_flashinfer.py's)."""

import torch
import torch.nn.functional as F

from tests.helpers import local_runner
from toka.protocol import StepPlan
from workers.graphs import Pieces
from workers.layers.attention import ForwardContext
from workers.layers.fp8 import fp8_linear, quantize_rows
from workers.layers.linear import ColumnParallelLinear


def test_column_linear_writes_into_the_buffer_it_is_given():
    torch.manual_seed(0)
    for bias in (False, True):
        layer = ColumnParallelLinear(8, {"q": 6, "k": 4}, bias=bias)
        layer.weight.data.normal_()
        if bias:
            layer.bias.data.normal_()
        x = torch.randn(5, 8)
        buffer = torch.zeros(7, 10)
        y = layer(x, out=buffer[:5])
        assert y.data_ptr() == buffer.data_ptr()
        torch.testing.assert_close(buffer[:5], F.linear(x, layer.weight, layer.bias))
        assert not buffer[5:].any()


def test_fp8_linear_writes_into_the_buffer_it_is_given():
    torch.manual_seed(0)
    weight, scale = quantize_rows(torch.randn(10, 8))
    x = torch.randn(5, 8, dtype=torch.bfloat16)
    for bias in (None, torch.randn(10, dtype=torch.bfloat16)):
        buffer = torch.zeros(7, 10, dtype=torch.bfloat16)
        y = fp8_linear(x, weight, scale.view(-1), bias, out=buffer[:5])
        assert y.data_ptr() == buffer.data_ptr()
        torch.testing.assert_close(buffer[:5], fp8_linear(x, weight, scale.view(-1), bias), rtol=0, atol=0)


def test_pieces_copy_only_what_is_not_in_the_buffer_already():
    qkv, out = torch.zeros(4, (2 + 2 * 1) * 3), torch.zeros(4, 2, 3)
    pieces = Pieces(qkv, out, (2, 1, 3))
    q, k, v = pieces.views(3)
    q.fill_(1.0)
    k_elsewhere = torch.full((3, 1, 3), 2.0)  # as a q/k norm returns it
    assert pieces.forward(0, q, k_elsewhere, v).data_ptr() == out.data_ptr()
    fixed_q, fixed_k, fixed_v = pieces.views(3)
    assert (fixed_q == 1.0).all() and (fixed_k == 2.0).all() and not fixed_v.any()
    assert pieces.layers == [0] and not pieces.graphs  # no pool: nothing captured


def test_a_forward_through_the_buffer_gives_the_same_hidden_states(tiny_models):
    for shape in ("tiny-llama", "tiny-qwen3"):  # qwen3's q/k norm hands attention new tensors
        runner = local_runner(tiny_models[shape])
        layer = next(iter(runner.model.model.layers.values())).self_attn
        width = (layer.num_heads + 2 * layer.num_kv_heads) * layer.head_dim
        hidden = []
        for qkv in (None, torch.zeros(6, width)):
            plan = StepPlan(0, [0], [0], [5], [5], [True], 1, [3, 1, 4, 1, 5], [0], [0], [1])
            batch, slots = runner._attention_batch(plan.slots, plan.q_lens, plan.kv_lens, 1)
            runner._write_pages(plan)
            runner.attn.plan(batch)
            ids = runner._inputs(plan, slots)
            hidden.append(runner.model(ids, ForwardContext(runner.attn, batch.positions, batch.seq_lens, qkv)))
        torch.testing.assert_close(hidden[0], hidden[1], rtol=0, atol=0)
