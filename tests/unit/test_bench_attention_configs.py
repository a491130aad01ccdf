"""tools/bench_attention.py's --triton-configs entries, read as the Triton decode kernel's keywords."""

import pytest

from tools.bench_attention import triton_settings


def test_numbers_then_words_in_any_order():
    assert triton_settings("2:2:16") == dict(warps=2, stages=2, chunk=16, per_kv_head=False, lazy_rescale=False)
    assert triton_settings("4:2:32:168") == dict(warps=4, stages=2, chunk=32, max_registers=168, per_kv_head=False,
                                                 lazy_rescale=False)
    assert triton_settings("1:2:16:pb2:head:lazy") == dict(warps=1, stages=2, chunk=16, per_kv_head=True,
                                                           lazy_rescale=True, pages_a_tile=2)


def test_an_unknown_word_names_itself():
    with pytest.raises(ValueError, match="unknown setting 'pack'"):
        triton_settings("4:2:32:pack")
