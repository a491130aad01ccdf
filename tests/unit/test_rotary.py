"""RotaryEmbedding against transformers' LlamaRotaryEmbedding / apply_rotary_pos_emb (float32, 1e-5)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from workers.layers.rotary import RotaryEmbedding, rope_parameters

HEAD_DIM, HEADS, KV_HEADS = 16, 4, 2
TOL = dict(atol=1e-5, rtol=1e-5)

KINDS = {
    "default": (dict(rope_type="default", rope_theta=10000.0), 128),
    "default-big-theta": (dict(rope_type="default", rope_theta=1_000_000.0), 128),
    "linear": (dict(rope_type="linear", rope_theta=10000.0, factor=4.0), 128),
    # original window 64 with head_dim 16 and theta 5e5: wavelengths below, inside and above [16, 64]
    "llama3": (dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=64), 128),
    "dynamic": (dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0), 32),
}


def config(kind: str) -> LlamaConfig:
    rp, max_pos = KINDS[kind]
    return LlamaConfig(hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                       head_dim=HEAD_DIM, max_position_embeddings=max_pos, rope_parameters=dict(rp))


def ours(cfg: LlamaConfig) -> RotaryEmbedding:
    return RotaryEmbedding(HEAD_DIM, cfg.max_position_embeddings, rope_parameters(cfg))


def hf_apply(cfg, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
    """transformers on one sequence: q [T, H, D], k [T, KVH, D]; a fresh module per call (its dynamic
    state depends on what it saw before)."""
    rope = LlamaRotaryEmbedding(cfg)
    cos, sin = rope(q[None], positions[None])
    qh, kh = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    return qh[0].transpose(0, 1), kh[0].transpose(0, 1), cos[0], sin[0]


def qk(T: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, HEADS, HEAD_DIM, generator=g), torch.randn(T, KV_HEADS, HEAD_DIM, generator=g)


@pytest.mark.parametrize("kind", ["default", "default-big-theta", "linear", "llama3"])
def test_static_kinds_match_transformers_over_the_whole_window(kind):
    cfg = config(kind)
    emb = ours(cfg)
    T = cfg.max_position_embeddings
    pos = torch.arange(T)
    q, k = qk(T)
    qh, kh, cos, sin = hf_apply(cfg, pos, q, k)
    qo, ko = emb(pos, q, k, torch.full((T,), T))
    torch.testing.assert_close(qo, qh, **TOL)
    torch.testing.assert_close(ko, kh, **TOL)
    half = HEAD_DIM // 2
    torch.testing.assert_close(emb.cos_sin[:T, :half], cos[:, :half], **TOL)
    torch.testing.assert_close(emb.cos_sin[:T, half:], sin[:, :half], **TOL)
    assert emb.cos_sin.shape == (T, HEAD_DIM)


@pytest.mark.parametrize("kind", ["default", "linear", "llama3", "dynamic"])
def test_inverse_frequencies_match_transformers(kind):
    """At position 1 the angles are the inverse frequencies themselves: recover ours from cos/sin."""
    cfg = config(kind)
    emb = ours(cfg)
    if kind == "default":
        inv, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    else:
        inv, _ = ROPE_INIT_FUNCTIONS[kind](cfg, torch.device("cpu"))
    half = HEAD_DIM // 2
    cs = emb.cos_sin[1].double()
    angles = torch.atan2(cs[half:], cs[:half])
    torch.testing.assert_close(angles, inv.double(), atol=1e-7, rtol=1e-5)


def test_llama3_scales_low_frequencies_only():
    cfg = config("llama3")
    emb = ours(cfg)
    half = HEAD_DIM // 2
    angles = torch.atan2(emb.cos_sin[1, half:].double(), emb.cos_sin[1, :half].double())
    inv = 1.0 / (500000.0 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM))
    wavelen = 2 * torch.pi / inv
    high = wavelen < 64 / 4.0
    low = wavelen > 64 / 1.0
    assert high.any() and low.any() and (~high & ~low).any(), "the test config covers all three bands"
    torch.testing.assert_close(angles[high], inv[high], atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(angles[low], inv[low] / 8.0, atol=1e-7, rtol=1e-6)
    mid = ~high & ~low
    assert ((angles[mid] < inv[mid]) & (angles[mid] > inv[mid] / 8.0)).all()


@pytest.mark.parametrize("length", [1, 17, 32, 33, 48, 100])
def test_dynamic_prefill_matches_transformers(length):
    """A whole sequence of `length` tokens in one forward: transformers rescales the base for
    max(position) + 1 = length; ours gets the row's kv length as seq_lens."""
    cfg = config("dynamic")
    emb = ours(cfg)
    pos = torch.arange(length)
    q, k = qk(length, seed=length)
    qh, kh, _, _ = hf_apply(cfg, pos, q, k)
    qo, ko = emb(pos, q, k, torch.full((length,), length))
    torch.testing.assert_close(qo, qh, **TOL)
    torch.testing.assert_close(ko, kh, **TOL)


@pytest.mark.parametrize("position", [0, 5, 31, 32, 40, 63, 99, 127])
def test_dynamic_decode_matches_transformers(position):
    """One decode token at `position`: transformers' seq_len is position + 1, our row's kv length."""
    cfg = config("dynamic")
    emb = ours(cfg)
    q, k = qk(1, seed=position)
    pos = torch.tensor([position])
    qh, kh, _, _ = hf_apply(cfg, pos, q, k)
    qo, ko = emb(pos, q, k, torch.tensor([position + 1]))
    torch.testing.assert_close(qo, qh, **TOL)
    torch.testing.assert_close(ko, kh, **TOL)


def test_dynamic_mixed_batch_uses_each_rows_length():
    """Rows of different lengths in one batch: each token gets the frequencies of its own row."""
    cfg = config("dynamic")
    emb = ours(cfg)
    rows = [(0, 20), (30, 70), (99, 100), (10, 11)]  # (first position, kv length) per row
    positions = torch.cat([torch.arange(a, b) for a, b in rows])
    seq_lens = torch.cat([torch.full((b - a,), b) for a, b in rows])
    q, k = qk(len(positions), seed=3)
    qo, ko = emb(positions, q, k, seq_lens)
    start = 0
    for a, b in rows:
        n = b - a
        # transformers sees the whole sequence 0..b-1; compare the rows' tokens
        qfull, kfull = qk(b, seed=99)
        qfull[a:b], kfull[a:b] = q[start : start + n], k[start : start + n]
        qh, kh, _, _ = hf_apply(cfg, torch.arange(b), qfull, kfull)
        torch.testing.assert_close(qo[start : start + n], qh[a:b], **TOL)
        torch.testing.assert_close(ko[start : start + n], kh[a:b], **TOL)
        start += n


def test_dynamic_within_the_window_equals_default():
    dyn = ours(config("dynamic"))
    default_cfg = LlamaConfig(hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                              head_dim=HEAD_DIM, max_position_embeddings=32,
                              rope_parameters=dict(rope_type="default", rope_theta=10000.0))
    plain = ours(default_cfg)
    pos = torch.arange(32)
    q, k = qk(32, seed=4)
    for n in (1, 16, 32):
        a = dyn(pos[:n], q[:n], k[:n], torch.full((n,), n))
        b = plain(pos[:n], q[:n], k[:n], torch.full((n,), n))
        torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=1e-6)
    # past the window the frequencies change
    long = dyn(pos[:32], q, k, torch.full((32,), 64))
    assert not torch.allclose(long[0][1:], plain(pos, q, k)[0][1:], atol=1e-4)


def test_rotation_preserves_norms_and_relative_positions():
    cfg = config("llama3")
    emb = ours(cfg)
    q, k = qk(1, seed=5)
    # <rot(q, m), rot(k, n)> depends only on m - n
    dots = []
    for m, n in [(10, 3), (50, 43), (127, 120)]:
        qm, _ = emb(torch.tensor([m]), q, k[:, :1].expand(1, HEADS, HEAD_DIM).contiguous())
        _, kn = emb(torch.tensor([n]), q, k[:, :1].expand(1, HEADS, HEAD_DIM).contiguous())
        dots.append((qm * kn).sum(-1))
        torch.testing.assert_close(qm.norm(dim=-1), q.norm(dim=-1), **TOL)
    torch.testing.assert_close(dots[1], dots[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dots[2], dots[0], atol=1e-4, rtol=1e-4)


def test_output_keeps_the_input_dtype():
    emb = ours(config("default"))
    q, k = qk(8)
    qo, ko = emb(torch.arange(8), q.bfloat16(), k.bfloat16())
    assert qo.dtype == ko.dtype == torch.bfloat16
    ref, _ = emb(torch.arange(8), q, k)
    torch.testing.assert_close(qo.float(), ref, atol=0.05, rtol=0.02)


# ---- rope_parameters ---------------------------------------------------------------------------------
def test_rope_parameters_from_transformers_5_config():
    p = rope_parameters(config("llama3"))
    assert p["rope_type"] == "llama3" and p["rope_theta"] == 500000.0 and p["factor"] == 8.0
    assert p["original_max_position_embeddings"] == 64


def test_rope_parameters_from_legacy_fields():
    p = rope_parameters(SimpleNamespace(rope_theta=5e5, rope_scaling={"type": "linear", "factor": 2.0}))
    assert p["rope_type"] == "linear" and p["rope_theta"] == 5e5 and p["factor"] == 2.0
    p = rope_parameters(SimpleNamespace(rope_theta=1e4, rope_scaling=None))
    assert p["rope_type"] == "default" and p["rope_theta"] == 1e4
    p = rope_parameters(SimpleNamespace())
    assert p == {"rope_theta": 10000.0, "rope_type": "default"}


@pytest.mark.parametrize("kind", ["yarn", "longrope", "su"])
def test_unsupported_scaling_is_refused(kind):
    with pytest.raises(ValueError):
        rope_parameters(SimpleNamespace(rope_theta=1e4, rope_scaling={"rope_type": kind, "factor": 2.0}))
