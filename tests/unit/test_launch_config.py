"""Launch flags as users meet them: served names, limits that are errors rather than silent caps,
usage errors, the help text, the listen address and the open-files warning. No server starts."""

from __future__ import annotations

import json
import os
import re
import socket

import pytest
import torch

from toka.config import ConfigError, EngineConfig, make_parser, parse_args
from toka.launch import check_listen_address, open_files_warning


def pretend_cuda(monkeypatch, gpus: int = 1) -> None:
    """torch reports `gpus` CUDA devices, so the launcher's checks run as on a GPU host."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)


def pretend_capability(monkeypatch, capability: tuple[int, int], name: str = "NVIDIA A100") -> None:
    """The GPU a rank checks is `name` of this compute capability."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: name)


def test_served_model_name_takes_aliases_and_responses_report_the_first(tiny_models):
    cfg = parse_args(["--model", tiny_models["tiny-llama"], "--device", "cpu",
                      "--served-model-name", "alpha", "beta", "gamma"]).resolve()
    assert cfg.served_names == ["alpha", "beta", "gamma"] and cfg.model_name == "alpha"
    assert cfg.model == tiny_models["tiny-llama"]


def test_the_default_served_name_is_the_model_as_given(tiny_models, monkeypatch):
    cfg = EngineConfig(model=tiny_models["tiny-qwen2"], device="cpu").resolve()
    assert cfg.served_names == [tiny_models["tiny-qwen2"]]
    # the embedded model keeps its own name, not the cache folder it is converted into
    from toka import default_model

    monkeypatch.setattr(default_model, "default_model_path", lambda: tiny_models["tiny-qwen2"])
    cfg = EngineConfig(device="cpu").resolve()
    assert cfg.model == tiny_models["tiny-qwen2"] and cfg.served_names == ["SmolLM2-135M-Instruct"]


def test_max_model_len_beyond_the_models_context_is_an_error(tiny_models):
    with pytest.raises(ConfigError, match=r"--max-model-len 4096 .* 2048 tokens"):
        EngineConfig(model=tiny_models["tiny-llama"], device="cpu", max_model_len=4096).resolve()
    assert EngineConfig(model=tiny_models["tiny-llama"], device="cpu", max_model_len=2048).resolve().max_model_len == 2048


def test_an_unknown_log_level_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit:
        parse_args(["--log-level", "LOUD"])
    assert exit.value.code == 2 and "--log-level: invalid choice: 'LOUD'" in capsys.readouterr().err
    assert parse_args(["--log-level", "debug"]).log_level == "DEBUG"


def test_help_shows_every_default_once(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    options = make_parser().format_help().split("\noptions:\n", 1)[1]
    entries = re.split(r"\n  (?=-)", "\n" + options)[1:]  # one per flag: its names, then its help
    assert len(entries) > 30 and entries[0].startswith("-h, --help")
    for entry in entries[1:]:
        assert entry.count("(default:") == 1, entry
    assert "(default: 127.0.0.1)" in next(e for e in entries if e.startswith("--host"))


def test_a_bad_host_is_told_apart_from_a_taken_port():
    with pytest.raises(ConfigError, match=r"--host 999\.1\.1\.1 is not a valid IPv4 address"):
        check_listen_address("999.1.1.1", 0)
    with pytest.raises(ConfigError, match="--host no-such-host.invalid is neither an IP address nor a name"):
        check_listen_address("no-such-host.invalid", 0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ConfigError, match=f"port {port} on 127.0.0.1 is already in use"):
            check_listen_address("127.0.0.1", port)
    check_listen_address("127.0.0.1", port)  # free again: no error


def test_the_open_files_warning_names_the_limit_and_how_to_raise_it():
    warning = open_files_warning(1024)
    assert "limited to 1024" in warning and "ulimit -n 65536" in warning and "LimitNOFILE=65536" in warning
    assert open_files_warning(65536) is None


def test_replicas_need_their_ranks_devices(tiny_models, monkeypatch):
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    with pytest.raises(ConfigError, match=r"--dp 3 x --tp 1 on cpu needs 3 CPU cores but 2 are available"):
        EngineConfig(model=tiny_models["tiny-llama"], device="cpu", dp=3).resolve()
    with pytest.raises(ConfigError, match="--tp, --pp and --dp must be at least 1"):
        EngineConfig(model=tiny_models["tiny-llama"], device="cpu", dp=0).resolve()
    cfg = EngineConfig(model=tiny_models["tiny-llama"], device="cpu", dp=2, tp=1).resolve()
    second = cfg.for_replica(1)
    assert second.first_gpu == 1 and second.process_name("rank0") == "replica1.rank0"
    # pipeline stages take turns on a step: --pp 2 --dp 2 runs on two cores (four rank processes)
    cfg = EngineConfig(model=tiny_models["tiny-llama"], device="cpu", dp=2, pp=2).resolve()
    assert cfg.ranks == 2 and cfg.for_replica(1).first_gpu == 2 and cfg.steps_in_flight == cfg.steps_ahead + 1
    assert second.endpoint("plans") != cfg.endpoint("plans") and second.endpoint("control") == cfg.endpoint("control")


def test_pipeline_stages_need_layers(tiny_models):
    layers = json.load(open(os.path.join(tiny_models["tiny-llama"], "config.json")))["num_hidden_layers"]
    with pytest.raises(ConfigError, match=f"--pp {layers + 1} is more stages than the model's {layers} layers"):
        EngineConfig(model=tiny_models["tiny-llama"], device="cpu", pp=layers + 1).resolve()


def test_hydragen_is_on_where_the_prefix_cache_is_unless_forced(tiny_models):
    model = tiny_models["tiny-llama"]
    assert parse_args(["--model", model, "--device", "cpu"]).resolve().hydragen_groups == (16, 16)
    assert parse_args(["--model", model, "--device", "cpu", "--no-prefix-caching"]).resolve().hydragen is False
    assert parse_args(["--model", model, "--device", "cpu", "--no-hydragen"]).resolve().hydragen_groups is None
    with pytest.raises(ConfigError, match="it needs --prefix-caching"):
        parse_args(["--model", model, "--device", "cpu", "--hydragen", "--no-prefix-caching"]).resolve()


def test_fp8_options_are_refused_where_they_cannot_run(tiny_models, monkeypatch):
    model = tiny_models["tiny-llama"]
    for flags, says in ((["--kv-cache-dtype", "fp8"], "--kv-cache-dtype fp8_e4m3 needs a CUDA GPU"),
                        (["--quantization", "fp8"], "--quantization fp8 needs a CUDA GPU"),
                        (["--kv-cache-dtype", "int8"], "--kv-cache-dtype must be auto or fp8_e4m3"),
                        (["--quantization", "awq"], "--quantization must be fp8")):
        with pytest.raises(ConfigError, match=re.escape(says)):
            parse_args(["--model", model, "--device", "cpu", *flags]).resolve()
    cfg = parse_args(["--model", model, "--device", "cpu"]).resolve()
    assert cfg.kv_cache_dtype == "auto" and cfg.quantization is None and cfg.kv_dtype == torch.float32
    # on CUDA: the launcher checks the dtype; each rank checks its GPU's compute capability
    pretend_cuda(monkeypatch)
    with pytest.raises(ConfigError, match="runs with --dtype bfloat16 or float16, not float32"):
        parse_args(["--model", model, "--kv-cache-dtype", "fp8", "--dtype", "float32"]).resolve()
    cfg = parse_args(["--model", model, "--kv-cache-dtype", "fp8", "--quantization", "fp8"]).resolve()
    assert cfg.kv_cache_dtype == "fp8_e4m3" and cfg.kv_dtype == torch.float8_e4m3fn
    from workers import rank

    pretend_capability(monkeypatch, (8, 0))
    with pytest.raises(RuntimeError, match=re.escape("--kv-cache-dtype fp8_e4m3 and --quantization fp8 need FP8 "
                                                     "tensor cores (compute capability 8.9 or later); NVIDIA A100")):
        rank.check_capability(cfg, torch.device("cuda:0"))
    pretend_capability(monkeypatch, (9, 0))
    rank.check_capability(cfg, torch.device("cuda:0"))


def test_xqa_decode_is_refused_where_it_cannot_run(tiny_models, monkeypatch):
    from workers import rank

    model = tiny_models["tiny-llama"]
    with pytest.raises(ConfigError, match="--decode-attention xqa is a CUDA kernel: it needs --device cuda"):
        parse_args(["--model", model, "--device", "cpu", "--decode-attention", "xqa"]).resolve()
    pretend_cuda(monkeypatch)
    cfg = parse_args(["--model", model, "--dtype", "bfloat16", "--decode-attention", "xqa"]).resolve()
    pretend_capability(monkeypatch, (8, 0))
    with pytest.raises(RuntimeError, match=re.escape("--decode-attention xqa runs on sm90, sm100 and sm120 GPUs; "
                                                     "NVIDIA A100 on cuda:0 has 8.0")):
        rank.check_capability(cfg, torch.device("cuda:0"))
    pretend_capability(monkeypatch, (9, 0))
    rank.check_capability(cfg, torch.device("cuda:0"))


def test_triton_decode_is_chosen_where_it_builds_and_refused_elsewhere(tiny_models, monkeypatch):
    """auto takes toka's Triton decode kernel for shapes of powers of two over a 16-bit cache,
    FlashInfer's CUDA-core kernel for others, over FP8 pages, or without Triton; asked for by name,
    it names what it lacks."""
    from workers import rank
    from workers.attention import triton_decode

    model = tiny_models["tiny-llama"]
    with pytest.raises(ConfigError, match="--decode-attention triton is a CUDA kernel: it needs --device cuda"):
        parse_args(["--model", model, "--device", "cpu", "--decode-attention", "triton"]).resolve()
    pretend_cuda(monkeypatch)
    auto = parse_args(["--model", model, "--dtype", "bfloat16"]).resolve()
    asked = parse_args(["--model", model, "--dtype", "bfloat16", "--decode-attention", "triton"]).resolve()
    monkeypatch.setattr(triton_decode, "triton", object())  # as if installed
    assert rank.decode_kernel(auto, 8, 64) == "triton"
    assert rank.decode_kernel(auto, 8, 80) == "cuda-cores"
    assert rank.decode_kernel(asked, 8, 128) == "triton"
    with pytest.raises(RuntimeError, match=re.escape("this rank has 5 kv heads of size 64 on pages of 16 tokens in "
                                                     "bfloat16: choose --decode-attention cuda-cores")):
        rank.decode_kernel(asked, 5, 64)
    float32 = parse_args(["--model", model, "--dtype", "float32"]).resolve()
    assert rank.decode_kernel(float32, 8, 64) == "cuda-cores"
    fp8 = parse_args(["--model", model, "--dtype", "bfloat16", "--kv-cache-dtype", "fp8"]).resolve()
    assert rank.decode_kernel(fp8, 8, 64) == "triton"  # float16 products over FP8 pages keep the logprob bar
    assert rank.decode_kernel(fp8, 8, 80) == "cuda-cores"
    monkeypatch.setattr(triton_decode, "triton", None)
    assert rank.decode_kernel(auto, 8, 64) == "cuda-cores"


def test_pieces_are_captured_on_one_cuda_stage_in_sizes_of_128_tokens(tiny_models, monkeypatch):
    from workers import rank

    assert rank.piece_sizes(8192) == list(range(128, 8193, 128))
    assert rank.piece_sizes(1000)[-2:] == [896, 1000]
    model = tiny_models["tiny-llama"]
    assert not rank.pieces_wanted(parse_args(["--model", model, "--device", "cpu", "--piecewise-graphs"]).resolve())
    pretend_cuda(monkeypatch, gpus=2)
    on = ["--model", model, "--dtype", "bfloat16", "--piecewise-graphs"]
    assert rank.pieces_wanted(parse_args(on).resolve())
    assert not rank.pieces_wanted(parse_args(on + ["--pp", "2"]).resolve())
    assert not rank.pieces_wanted(parse_args(on + ["--no-cuda-graphs"]).resolve())
    assert not rank.pieces_wanted(parse_args(on[:-1]).resolve())  # off by default
