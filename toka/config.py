"""The engine's one configuration: CLI flags come from these fields, derived values are properties.

Every process receives the same `EngineConfig` (after `resolve()` filled in what depends on the
machine and the model), so the server's limits, the scheduler's budgets and the ranks' cache sizes
can never disagree.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field

from toka.arith import cdiv


class ConfigError(ValueError):
    """A launch-time problem with a message meant for the user."""


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# --decode-attention's kernels (workers/attention); auto: triton where it builds for the model's shape
DECODE_KERNELS = ("auto", "triton", "cuda-cores", "tensor-cores", "xqa")


def _flag(help: str, choices: tuple[str, ...] | None = None, **kw):
    return field(metadata={"help": help, "choices": choices}, **kw)


@dataclass
class EngineConfig:
    model: str | None = _flag("model folder or hub id (default: the embedded SmolLM2-135M-Instruct)", default=None)
    revision: str | None = _flag("hub revision of --model: a branch, tag or commit (default: main)", default=None)
    tokenizer: str | None = _flag("tokenizer folder or hub id (default: the model's)", default=None)
    host: str = _flag("address the HTTP server binds", default="127.0.0.1")
    port: int = _flag("HTTP port", default=10210)
    device: str | None = _flag("cuda or cpu (default: cuda when available)", default=None)
    dtype: str | None = _flag("bfloat16, float16 or float32 (default: float32 on cpu; on cuda float16 for "
                              "float16 checkpoints, else bfloat16)", default=None)
    kv_cache_dtype: str = _flag("KV cache element type: auto (the model's --dtype) or fp8_e4m3 (fp8 for short: "
                                "half the bytes of bf16, a scale per layer for K and for V; CUDA, sm89 or later)",
                                default="auto")
    quantization: str | None = _flag("fp8: linear layers' weights in e4m3 with a scale per output channel, "
                                     "activations quantized per token, FP8 matmuls (CUDA, sm89 or later; default: "
                                     "the checkpoint's own quantization_config, else none)", default=None)
    tp: int = _flag("tensor-parallel ranks, one process each", default=1)
    pp: int = _flag("pipeline-parallel stages: the layers split into this many contiguous parts, one process per "
                    "stage and --tp rank", default=1)
    dp: int = _flag("data-parallel replicas behind one server, each its own scheduler and --pp x --tp ranks "
                    "(replica k on GPUs k * pp * tp .. (k + 1) * pp * tp - 1)", default=1)
    dp_fail_fast: bool = _flag("any replica dying ends the engine (otherwise the others keep serving)",
                               default=False)
    nnodes: int = _flag("hosts the engine spans, each running this command with its own --node-rank: the "
                        "replicas' ranks fill the nodes' GPUs in order, --dp x --pp x --tp / --nnodes a node",
                        default=1)
    node_rank: int = _flag("this host's index among --nnodes: node 0 runs the HTTP server and the schedulers",
                           default=0)
    dist_init_addr: str | None = _flag("HOST:PORT on node 0, the same on every node: torch.distributed's "
                                       "rendezvous, where the other nodes find node 0", default=None)
    node_addr: str | None = _flag("address of this host that the fabric between nodes binds (default: node 0: "
                                  "--dist-init-addr's host; the others: the one that routes to it)", default=None)
    cluster_key_file: str | None = _flag("file of the secret every node shares: the fabric between nodes is "
                                         "encrypted and admits only holders of it (ZeroMQ CURVE keys derive "
                                         "from it; default: $TOKA_CLUSTER_KEY)", default=None)
    kv_cache_tokens: int | None = _flag("KV cache size in tokens (default: from free memory)", default=None)
    gpu_memory_utilization: float = _flag("fraction of GPU memory the engine may use", default=0.9)
    page_size: int = _flag("tokens per KV-cache page", default=16)
    max_seqs: int | None = _flag("sequences running at once (default: 2048 on cuda, 64 on cpu)", default=None)
    max_tokens_per_forward: int | None = _flag("tokens in one forward pass (default: 8192 on cuda, 1024 on cpu)", default=None)
    max_model_len: int | None = _flag("context window (default: the model's, capped by the KV cache)", default=None)
    served_model_name: list[str] | None = _flag(  # noqa: RUF009 (_flag returns a field)
        "names a request's model may use; responses report the first (default: --model as given)", default=None)
    # 3: a step's plan then reaches the rank a whole step before the device needs it, so the host
    # part of launching it (~12 ms for an eager mixed step) is done in time (2: 7 % less throughput)
    steps_ahead: int = _flag("steps the scheduler plans before their tokens return", default=3)
    max_waiting_requests: int = _flag("sequences waiting beyond --max-seqs before 429", default=131072)
    max_waiting_tokens: int = _flag("prompt tokens in flight before 429 (when some wait; a prompt counts once for its n choices)", default=64_000_000)
    max_body_bytes: int = _flag("largest request body accepted", default=8 * 1024 * 1024)
    drain_timeout: float = _flag("seconds SIGTERM or SIGINT waits for in-flight requests", default=30.0)
    step_timeout: float = _flag("seconds a step may take before the engine counts as hung", default=600.0)
    cuda_graphs: bool = _flag("capture decode steps in CUDA graphs", default=True)
    piecewise_graphs: bool = _flag("with --cuda-graphs, also capture the other steps (mixed, prefill) by their "
                                   "token count, in sizes of 128 up to --max-tokens-per-forward, as CUDA graphs "
                                   "cut at each layer's attention (which runs eagerly between them); one "
                                   "pipeline stage only. Less host time a step: it pays where the host "
                                   "holds the steps (both FP8 options) and measured on par with eager "
                                   "steps over bf16, where the device holds them (docs/performance.md)",
                                   default=False)
    prefix_caching: bool = _flag("reuse the KV cache pages of prompt prefixes computed before", default=True)
    hydragen: bool | None = _flag(
        "attend to a prefix shared by many decoding sequences once for all of them (default: on with "
        "--prefix-caching; groups form only where --hydragen-min-group decoding sequences share "
        "--hydragen-min-prefix cached tokens, so other steps run as without it)", default=None)
    hydragen_min_group: int = _flag("fewest sequences that share a prefix to form a Hydragen group", default=16)
    hydragen_min_prefix: int = _flag("shortest shared prefix, in tokens, for a Hydragen group", default=256)
    # measured on the H200 (docs/performance.md, docs/fp8.md), a layer of 2,048 sharegpt-like rows:
    # bf16 pages triton 0.43 ms, cuda-cores 0.58, tensor-cores 0.67, xqa 0.82; FP8 pages xqa 0.31 (it
    # rounds queries and probabilities to FP8 too), triton 0.56, cuda-cores 0.78
    decode_attention: str = _flag("kernel of decode rows on cuda: triton (toka's, whole pages of every kv head "
                                  "at once), cuda-cores (FlashInfer's decode kernel), tensor-cores (its "
                                  "prefill kernel, a query a row) or xqa (TensorRT-LLM's decode kernel, sm90 "
                                  "and later: the fastest over an fp8 KV cache, at some precision); auto: "
                                  "triton where it builds for the model (power-of-two kv heads, head size "
                                  "and page size, a bfloat16 or float16 --dtype), over bf16 and fp8 "
                                  "KV caches alike, else cuda-cores",
                                  default="auto")
    # 2,048: a full batch of Hydragen steps is launch-bound when eager (docs/performance.md)
    cuda_graph_max_batch: int = _flag("largest decode batch captured in a CUDA graph", default=2048)
    load_format: str = _flag("safetensors, or random for benchmarks", default="safetensors")
    logprobs_mode: str = _flag("what logprobs report: raw (the model's own log-softmax, as OpenAI and vLLM) or "
                               "processed (the distribution sampled from: after penalties, temperature, "
                               "min-p, top-k and top-p)", default="raw")
    api_key: str | None = _flag("key every /v1 route, /tokenize and /detokenize require as "
                                "'Authorization: Bearer KEY' (default: $TOKA_API_KEY, else none)", default=None)
    data_dir: str | None = _flag("folder of the Files and Batches store: SQLite and file bodies (default: "
                                 "$TOKA_CACHE/data, else ~/.cache/toka/data)", default=None)
    max_file_bytes: int = _flag("largest file POST /v1/files accepts", default=1 << 30)
    seed: int = _flag("seed for random weights and unseeded requests", default=0)
    log_level: str = _flag("logging level", default="INFO", choices=LOG_LEVELS)

    # Filled by resolve(); not flags.
    run_dir: str = field(default="", metadata={"cli": False})
    replica: int = field(default=0, metadata={"cli": False})  # which replica a child serves (for_replica)
    cluster_key: bytes = field(default=b"", repr=False, metadata={"cli": False})  # the secret of --cluster-key-file
    # the tcp endpoints this replica's ranks on other nodes bound, for its scheduler and the server
    remote_plans: list[str] = field(default_factory=list, metadata={"cli": False})
    remote_events: str = field(default="", metadata={"cli": False})
    vocab_size: int = field(default=0, metadata={"cli": False})
    eos_token_ids: list[int] = field(default_factory=list, metadata={"cli": False})
    sampling_defaults: dict = field(default_factory=dict, metadata={"cli": False})

    # ---- derived -------------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        """The name responses report: the first served name."""
        return self.served_names[0]

    @property
    def served_names(self) -> list[str]:
        """Every name a request's `model` may use. resolve() fills in the default, `--model` as the
        user gave it, before `model` becomes a local folder."""
        return list(self.served_model_name or [self.model or ""])

    @property
    def num_pages(self) -> int:
        assert self.kv_cache_tokens is not None, "resolve() sizes the cache"
        return self.kv_cache_tokens // self.page_size

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.model or ""

    def endpoint(self, name: str) -> str:
        """A socket of this replica's (requests, plans, events, status), or the launcher's control. Token
        events that a rank on another node publishes are there: "" until it reported where."""
        if name == "events" and self.node_of(self.reporting_rank) != self.node_rank:
            return self.remote_events
        return f"ipc://{self.run_path(name)}"

    def run_path(self, name: str) -> str:
        """A file of the launch's private folder; replicas beyond the first have their own."""
        if name != "control" and self.replica:
            name = f"{name}.{self.replica}"
        return os.path.join(self.run_dir, name)

    def for_replica(self, replica: int) -> "EngineConfig":
        return dataclasses.replace(self, replica=replica)

    def process_name(self, role: str) -> str:
        """rank0, scheduler; with several replicas replica1.rank0, replica1.scheduler."""
        return role if self.dp == 1 else f"replica{self.replica}.{role}"

    @property
    def ranks(self) -> int:
        """Rank processes of one replica: stage s's tensor-parallel rank r is rank s * tp + r."""
        return self.pp * self.tp

    @property
    def first_gpu(self) -> int:
        return self.replica * self.ranks

    @property
    def ranks_per_node(self) -> int:
        return self.dp * self.ranks // self.nnodes

    def node_of(self, rank: int) -> int:
        """The node of this replica's rank `rank`: every replica's ranks, in order, fill the nodes in order."""
        return (self.first_gpu + rank) // self.ranks_per_node

    def gpu(self, rank: int) -> int:
        """The device index of this replica's rank `rank` on its node."""
        return (self.first_gpu + rank) % self.ranks_per_node

    @property
    def reporting_rank(self) -> int:
        """The rank that publishes token events: the last stage's first."""
        return (self.pp - 1) * self.tp

    @property
    def steps_in_flight(self) -> int:
        """Steps the scheduler keeps planned ahead of their results: --steps-ahead, and one more for each
        pipeline stage after the first, so that every stage has a step to run."""
        return self.steps_ahead + self.pp - 1

    # ---- validation ----------------------------------------------------------------------------
    def resolve(self) -> "EngineConfig":
        """Fills machine- and model-dependent defaults and checks every value; raises ConfigError."""
        import torch

        from toka.model_info import MODEL_FILES, TOKENIZER_FILES, ModelInfo, local_folder

        if self.model is None:
            from toka.default_model import NAME, default_model_path

            self.served_model_name = self.served_model_name or [NAME]
            self.model = str(default_model_path())
        else:
            self.served_model_name = self.served_model_name or [self.model]
            self.model = local_folder(self.model, "--model", MODEL_FILES, self.revision)
        if self.tokenizer is not None:  # AutoTokenizer may read config.json to pick the tokenizer class
            self.tokenizer = local_folder(self.tokenizer, "--tokenizer", [*TOKENIZER_FILES, "config.json"])
        info = ModelInfo.load(self.model)
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device not in ("cuda", "cpu"):
            raise ConfigError(f"--device must be cuda or cpu, not {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but no CUDA device is visible")
        gpu = self.device == "cuda"
        if self.dtype is None:
            self.dtype = ("float16" if info.checkpoint_dtype == "float16" else "bfloat16") if gpu else "float32"
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ConfigError(f"--dtype must be bfloat16, float16 or float32, not {self.dtype!r}")
        self._resolve_fp8(info, gpu)
        if self.tp < 1 or self.dp < 1 or self.pp < 1:
            raise ConfigError("--tp, --pp and --dp must be at least 1")
        layout = " x ".join(f"--{name} {n}" for name, n in (("dp", self.dp), ("pp", self.pp), ("tp", self.tp))
                            if n > 1 or name == "tp")
        self._resolve_nodes(layout)
        here = [(k, r) for k in range(self.dp) for r in range(self.ranks)
                if self.for_replica(k).node_of(r) == self.node_rank]
        on = f" on node {self.node_rank}" if self.nnodes > 1 else ""
        if gpu and len(here) > torch.cuda.device_count():
            raise ConfigError(f"{layout} needs {len(here)} GPUs{on} but {torch.cuda.device_count()} are "
                              "visible (CUDA_VISIBLE_DEVICES)")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        # a CPU tensor-parallel rank needs a core of its own (its collectives wait on the others); the
        # stages of a pipeline take turns on a step, so they may share one
        needed = len({(k, r % self.tp) for k, r in here})
        if not gpu and needed > cores:
            raise ConfigError(f"{layout} on cpu needs {needed} CPU cores{on} but {cores} are available")
        info.check_tp(self.tp)
        if self.pp > info.num_layers:
            raise ConfigError(f"--pp {self.pp} is more stages than the model's {info.num_layers} layers")
        self.max_seqs = self.max_seqs or (2048 if gpu else 64)
        self.max_tokens_per_forward = self.max_tokens_per_forward or (8192 if gpu else 1024)
        if self.hydragen and not self.prefix_caching:
            raise ConfigError("--hydragen groups sequences by their cached prefix pages: it needs --prefix-caching")
        if self.hydragen is None:
            self.hydragen = self.prefix_caching
        for name in ("page_size", "max_seqs", "max_tokens_per_forward", "steps_ahead", "port", "hydragen_min_group"):
            if getattr(self, name) < (0 if name == "port" else 1):
                raise ConfigError(f"--{name.replace('_', '-')} must be positive")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError("--gpu-memory-utilization must be in (0, 1]")
        if self.decode_attention not in DECODE_KERNELS:
            raise ConfigError(f"--decode-attention must be {', '.join(DECODE_KERNELS)}, not {self.decode_attention!r}")
        if self.decode_attention in ("xqa", "triton") and not gpu:
            raise ConfigError(f"--decode-attention {self.decode_attention} is a CUDA kernel: it needs --device cuda")
        if self.logprobs_mode not in ("raw", "processed"):
            raise ConfigError(f"--logprobs-mode must be raw or processed, not {self.logprobs_mode!r}")
        self.api_key = self.api_key or os.environ.get("TOKA_API_KEY") or None
        if self.load_format not in ("safetensors", "random"):
            raise ConfigError("--load-format must be safetensors or random")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < self.page_size:
            raise ConfigError("--kv-cache-tokens must hold at least one page")
        if self.kv_cache_tokens is None and not gpu:
            self.kv_cache_tokens = 32768  # CPU: no memory probe; ample for tests and small models
        if self.max_model_len is not None and self.max_model_len > info.max_position_embeddings:
            raise ConfigError(f"--max-model-len {self.max_model_len} exceeds the model's context window of "
                              f"{info.max_position_embeddings} tokens (max_position_embeddings)")
        self.max_model_len = self.max_model_len or info.max_position_embeddings
        info.check_architecture(self.max_model_len)
        self.vocab_size = info.vocab_size
        self.eos_token_ids = info.eos_token_ids
        self.sampling_defaults = info.sampling_defaults
        return self

    def _resolve_nodes(self, layout: str) -> None:
        """Checks --nnodes and its companions; reads the cluster key and finds this node's address."""
        from toka import cluster

        if self.nnodes < 1:
            raise ConfigError("--nnodes must be at least 1")
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"--node-rank {self.node_rank} is not below --nnodes {self.nnodes}"
                              if self.node_rank >= 0 else "--node-rank must not be negative")
        if self.nnodes == 1:
            return
        if not self.dist_init_addr:
            raise ConfigError(f"--nnodes {self.nnodes} needs --dist-init-addr HOST:PORT (node 0's address, the "
                              "same on every node)")
        host, _ = cluster.split_address(self.dist_init_addr)
        total = self.dp * self.ranks
        if total % self.nnodes:
            raise ConfigError(f"{layout} is {total} ranks, which --nnodes {self.nnodes} cannot share evenly")
        per = total // self.nnodes
        if per % self.tp and self.tp % per:
            raise ConfigError(f"{layout} puts {per} ranks on each of --nnodes {self.nnodes}: a --tp {self.tp} group "
                              "would span two nodes where it fits in one; choose the sizes so that each node "
                              "holds whole --tp groups, or each group whole nodes")
        self.cluster_key = cluster.read_key(self.cluster_key_file)
        self.node_addr = cluster.node_address(self.node_addr, host, self.node_rank)

    def _resolve_fp8(self, info, gpu: bool) -> None:
        """Checks --kv-cache-dtype and --quantization against the device; the GPU's compute capability
        is checked by each rank, which owns the device (the launcher never initializes CUDA)."""
        self.kv_cache_dtype = {"fp8": "fp8_e4m3"}.get(self.kv_cache_dtype, self.kv_cache_dtype)
        if self.kv_cache_dtype not in ("auto", "fp8_e4m3"):
            raise ConfigError(f"--kv-cache-dtype must be auto or fp8_e4m3, not {self.kv_cache_dtype!r}")
        given = self.quantization
        self.quantization = given or info.quantization
        if self.quantization not in (None, "fp8"):
            raise ConfigError(f"--quantization must be fp8, not {self.quantization!r}")
        if given and info.quantization and given != info.quantization:
            raise ConfigError(f"--quantization {given} asked for, but the checkpoint is already quantized as "
                              f"{info.quantization}")
        for name, on in (("--kv-cache-dtype fp8_e4m3", self.kv_cache_dtype != "auto"),
                         ("--quantization fp8" if given else "this fp8 checkpoint", self.quantization == "fp8")):
            if on and not gpu:
                raise ConfigError(f"{name} needs a CUDA GPU of compute capability 8.9 or later (FP8 tensor cores); "
                                  "this launch runs on the cpu")
            if on and self.dtype == "float32":
                raise ConfigError(f"{name} runs with --dtype bfloat16 or float16, not float32")

    @property
    def kv_dtype(self):
        """The torch dtype of the KV cache's elements."""
        import torch

        return torch.float8_e4m3fn if self.kv_cache_dtype == "fp8_e4m3" else getattr(torch, self.dtype)

    @property
    def hydragen_groups(self) -> tuple[int, int] | None:
        """(min rows, min prefix pages) of a Hydragen group, or None when Hydragen is off."""
        if not self.hydragen:
            return None
        return self.hydragen_min_group, max(1, cdiv(self.hydragen_min_prefix, self.page_size))

    def cap_to_cache(self) -> None:
        """Once the cache is sized: a request must fit in it alone, so the context cannot exceed it."""
        self.max_model_len = min(self.max_model_len, self.num_pages * self.page_size)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends every flag's default, except where its help says what the default is already."""

    def _get_help_string(self, action):
        return action.help if "(default:" in (action.help or "") else super()._get_help_string(action)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("toka-launch", description="Serve a model through an OpenAI-compatible API.",
                                     formatter_class=_HelpFormatter)
    for f in dataclasses.fields(EngineConfig):
        if f.metadata.get("cli") is False:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool, "bool | None"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
            continue
        kind = str(f.type).replace(" | None", "")
        many = {"nargs": "+", "metavar": "NAME"} if kind == "list[str]" else {}
        choices = f.metadata["choices"]
        # choices are upper case names: `--log-level debug` is the same level
        parser.add_argument(flag, type=str.upper if choices else {"int": int, "float": float}.get(kind, str),
                            choices=choices, default=f.default, help=f.metadata["help"], **many)
    return parser


def parse_args(argv: list[str] | None = None) -> EngineConfig:
    return EngineConfig(**vars(make_parser().parse_args(argv)))
