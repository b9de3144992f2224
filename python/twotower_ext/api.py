"""The public entry points: `load` a checkpoint directory and `generate` from it."""
from __future__ import annotations

import os
import threading

import torch

from .runtime import DecodeParams, GenerationResult, Generator
from .runtime.prefix_store import budget_bytes
from .threads import cap_threads, recommended_threads, using_threads

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}


def default_dtype(device) -> torch.dtype:
    """The dtype `load` (and the CLI's --dtype auto) uses when none is given: fp32 on the CPU, where bf16
    matmuls are widened to fp32 anyway on most CPUs and fp32 matches the parity fixture token for token;
    bf16 on CUDA (the checkpoint's own dtype, half the memory and the tensor-core kernels)."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def _dtype(dtype, device) -> torch.dtype:
    if dtype is None:
        return default_dtype(device)
    if isinstance(dtype, torch.dtype) and dtype in (torch.bfloat16, torch.float32):
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"load: dtype must be torch.bfloat16 or torch.float32 (or 'bf16' / 'fp32'), got {dtype!r}")


def check_device(device, name: str = "device") -> torch.device:
    """`device` as a torch.device when this installation can run a model there (the CPU, or a visible CUDA
    device), else a ValueError naming `name` and what is available."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{name} must be 'cpu' or 'cuda[:N]', got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "torch is a CPU-only build" if torch.version.cuda is None else "no CUDA device is visible"
            raise ValueError(f"{name} {device!r}: CUDA is not available ({why}); use 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{name} {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type != "cpu":
        raise ValueError(f"{name} must be 'cpu' or 'cuda[:N]', got {device!r} (no kernels for {dev.type!r})")
    return dev


def load_tokenizer(path: str):
    """The checkpoint's tokenizer.json through the `tokenizers` package, or None when either is absent."""
    tok_file = os.path.join(path, "tokenizer.json")
    if not os.path.exists(tok_file):
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    try:
        return Tokenizer.from_file(tok_file)
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        raise ValueError(f"load: {tok_file} is not a valid tokenizer.json ({str(e).splitlines()[0]})") from None


class TwoTowerLM:
    """A loaded two-tower model with its decode engine and (when the checkpoint has one) tokenizer."""

    def __init__(self, model, tokenizer=None, path: str | None = None, threads: int | None = None,
                 prefix_cache_gb: float = 0.0):
        self.model, self.tokenizer, self.path = model, tokenizer, path
        self.threads = threads   # torch threads during generate (None: torch's setting); see threads.py
        self.generator = Generator(model, tokenizer, budget_bytes(prefix_cache_gb, "prefix_cache_gb"))
        self._lock = threading.Lock()   # one generate at a time: the generator's pooled core is shared

    @property
    def config(self):
        return self.model.config

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer.json (or `tokenizers` is not installed): pass token ids")
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer.json (or `tokenizers` is not installed)")
        return self.tokenizer.decode(ids)

    def generate(self, input_ids, mode="diffusion", max_new_tokens=DecodeParams.max_new_tokens,
                 block_size=DecodeParams.block_size, steps_per_block=DecodeParams.steps_per_block,
                 threshold=DecodeParams.threshold, temperature=DecodeParams.temperature, seed=DecodeParams.seed,
                 eos_token_id=DecodeParams.eos_token_id, reference_compat: bool = False, *,
                 mask_token_id=DecodeParams.mask_token_id, logprobs=DecodeParams.logprobs,
                 stop_token_ids=DecodeParams.stop_token_ids, stop=DecodeParams.stop, n: int = 1, cuda_graphs: bool = True,
                 device_loop: bool = False, callback=None) -> GenerationResult:
        """Generate continuations of `input_ids` (a list of ints, a list of lists for ragged prompts, a
        LongTensor [B, L], or text / a list of texts when the checkpoint has a tokenizer).

        Every decode parameter (mode, max_new_tokens, block_size, steps_per_block, threshold, temperature,
        seed, eos_token_id, mask_token_id, logprobs, stop_token_ids) is one value for every row or a list with
        one value per prompt; each row's result is the one it gets alone. logprobs=k (0-20): each generated
        token's log-probability under the pass that committed it and its k likeliest alternatives
        (result.logprobs / top_logprobs); stop_token_ids: ids that end a row like EOS; stop: strings that end it
        (its text, result.texts, is cut before the first; needs the tokenizer); n: samples per prompt
        (rows i*n .. i*n+n-1 of the result; sample j > 0 seeded with runtime.params.derive_seed(seed, j)). mode: "diffusion"
        (block mask diffusion), "mock_ar" or
        "ar". threshold: the confidence gamma. reference_compat=True reproduces NVIDIA's reference semantics
        exactly (docs/semantics.md). callback(event: dict) is called with every committed block (diffusion)
        or token (AR modes) of a row: {"row", "block" | "token_index", "tokens", "sequences"}.
        cuda_graphs: capture the passes in CUDA graphs (on CUDA); device_loop: a whole block per graph
        (twotower_ext.runtime.runner).

        Thread-safe: concurrent calls on one TwoTowerLM run one after another (a lock serialises them);
        for concurrent requests batched together use `twotower_ext.serve.Scheduler`."""
        if isinstance(input_ids, str) or (isinstance(input_ids, (list, tuple)) and input_ids
                                          and all(isinstance(t, str) for t in input_ids)):
            texts = [input_ids] if isinstance(input_ids, str) else list(input_ids)
            input_ids = [self.encode(t) for t in texts]
        with self._lock, using_threads(self.threads):
            return self.generator.generate(
                input_ids, callback=callback, reference_compat=reference_compat, cuda_graphs=cuda_graphs, n=n,
                device_loop=device_loop, mode=mode, max_new_tokens=max_new_tokens, block_size=block_size,
                steps_per_block=steps_per_block, threshold=threshold, temperature=temperature, seed=seed,
                eos_token_id=eos_token_id, mask_token_id=mask_token_id, logprobs=logprobs,
                stop_token_ids=stop_token_ids, stop=stop)


def load(path: str, device="cpu", dtype=None, denoiser_device=None, threads: int | None = None,
         experts: str | None = None, prefix_cache_gb: float = 0.0) -> TwoTowerLM:
    """Load an NVIDIA-format two-tower checkpoint directory (config.json + safetensors, single or
    sharded; tokenizer.json optional); `twotower_ext.default_model_path()` is the small model shipped with
    the package. dtype None: `default_dtype(device)` (fp32 on the CPU, bf16 on CUDA). `denoiser_device`
    places the denoiser tower elsewhere. threads: torch's intra-op threads while generating (None: the
    per-model-size choice of `threads.recommended_threads`, 1 for small models on the CPU (docs/threads.md); 0: leave torch's
    setting alone); it is set around each generate call and restored after.

    experts: how the routed experts of both towers are stored (they are ~94% of the real model's bytes, and
    decoding reads them every pass): None or "bf16" (the default: unquantised, in the model dtype `dtype`,
    which on the CPU is fp32 unless asked otherwise), "fp8" (e4m3, one fp32 scale per output channel) or
    "int4" (symmetric, groups of 128 inputs, a bf16 scale per group); quantised while streaming the
    checkpoint, so host memory peaks near the quantised size. Everything else stays in `dtype`. Formats:
    twotower_ext.quant; memory per choice: `twotower info`.

    prefix_cache_gb: GiB of the context tower's device for a prefix cache `generate` keeps across calls
    (0, the default: none): a prompt that starts like an earlier one (a system prompt, a document asked
    several questions, a growing conversation) prefills only the rest; outputs are the same with and without
    it (docs/semantics.md, "Prefix cache")."""
    from .models import TwoTowerModel
    from .models.weights import expert_format

    dev = check_device(device)
    if denoiser_device is not None:
        check_device(denoiser_device, "denoiser_device")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 0):
        raise ValueError(f"load: threads must be None or an int >= 0 (0: torch's setting), got {threads!r}")
    if threads:   # more OpenMP threads than cores only wait on each other (and 20000 abort in libgomp)
        threads = cap_threads(threads, "load: threads")
    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path) \
            or not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"load: {path!r} is not a checkpoint directory (no config.json)")
    path = os.fspath(path)
    experts = expert_format(experts, "load: experts")   # before reading anything
    budget_bytes(prefix_cache_gb, "load: prefix_cache_gb")
    model = TwoTowerModel.from_pretrained(path, dtype=_dtype(dtype, dev), device=device,
                                          denoiser_device=denoiser_device, experts=experts)
    if threads is None:
        threads = recommended_threads(model.config, dev)
    return TwoTowerLM(model, load_tokenizer(path), path, threads or None, prefix_cache_gb)
