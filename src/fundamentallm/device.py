"""Device, precision and compilation: chosen once per command, applied to a built model.

Everything that trains, evaluates or generates picks its device here, so `evaluate` and `generate` need nothing
from the training loop.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from fundamentallm.config import TrainingConfig
from fundamentallm.console import warn
from fundamentallm.errors import UserError

# Corpora whose tokens take up to this much GPU memory live there; larger ones stay memory-mapped on the host.
DEVICE_RESIDENT_MAX_BYTES = 2 << 30
PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}


def select_device(name: str = "auto") -> torch.device:
    """auto -> the first CUDA GPU, else Apple's MPS, else the CPU. Asking for a missing device is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: PyTorch sees no CUDA GPU on this machine (a CPU-only build, or no "
                            f"driver); use --device cpu, or --device auto to take whatever is there")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s) "
                            f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: Apple's MPS backend is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name}: unsupported device type; use auto, cpu, cuda, cuda:N or mps")
    return device


def autocast_dtype(device: torch.device, setting: bool | str) -> torch.dtype | None:
    """The autocast dtype for training, or None for full fp32.

    GPUs: bf16 where supported, else fp16 (with a gradient scaler), unless the setting is false. CPUs: bf16 where
    the CPU has native bf16 instructions (AVX512-BF16 or AMX), unless the setting is false; elsewhere fp32 (with
    a warning when bf16 was asked for explicitly)."""
    if setting is False:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        if _cpu_has_native_bf16():
            return torch.bfloat16
        if setting is True:
            warn("use_mixed_precision: this CPU has no native bf16 instructions; training in fp32")
    return None


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 arithmetic is fast here: a CPU without bf16 instructions emulates it, several times slower than
    float32."""
    if device.type == "cpu":
        return _cpu_has_native_bf16()
    if device.type != "cuda":
        return True
    try:  # a GPU before Ampere (V100, T4) emulates bf16
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # PyTorch before the argument existed
        return torch.cuda.is_bf16_supported()


def _cpu_has_native_bf16() -> bool:
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # private API: absent in some versions
    return bool(probe()) if probe is not None else False


def set_threads(threads: int | None, spare_cores: int = 0) -> None:
    """CPU threads for PyTorch: as asked, else the cores this process may use (its CPU affinity, which on a
    shared or containerised machine can be fewer than the machine has) less `spare_cores` (at least one).
    OMP_NUM_THREADS, when set, is the default instead: PyTorch already follows it."""
    if threads is None:
        if os.environ.get("OMP_NUM_THREADS"):
            return
        threads = max(1, _cores() - spare_cores)
    torch.set_num_threads(threads)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads_text() -> str:
    """'4 threads', and when that is more than the cores this process may use, says so: threads beyond the
    cores only wait for each other."""
    threads, cores = torch.get_num_threads(), _cores()
    over = f", more than the {cores} core{'s' if cores > 1 else ''} this process may use: expect it to be " \
        f"slower than --threads {cores}" if threads > cores else ""
    return f"{threads} threads{over}"


def machine_load_note() -> str:
    """' (busy: load 7.9 on 2 cores)' when other work competes for the CPU, else ''."""
    if not hasattr(os, "getloadavg"):
        return ""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    load = os.getloadavg()[0]
    return f"; the machine is busy (load {load:.1f} on {cores} cores): expect it to train slower" \
        if load > cores + 0.5 else ""


def enable_tf32(device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 tensor cores for fp32 matmuls
        torch.backends.cudnn.allow_tf32 = True


def fits_on_device(num_tokens: int, dtype: np.dtype, device: torch.device) -> bool:
    """Whether a corpus of `num_tokens` should live in device memory (as data.as_tensor stores it)."""
    on_device_bytes = num_tokens * (1 if dtype == np.uint8 else 4)
    return device.type != "cpu" and on_device_bytes <= DEVICE_RESIDENT_MAX_BYTES


def compile_model(model: torch.nn.Module, cfg: TrainingConfig, device: torch.device) -> torch.nn.Module:
    """torch.compile where the config asks for it (auto: on CUDA); the model itself when not, or when it fails."""
    wanted = cfg.compile if cfg.compile != "auto" else device.type == "cuda"
    if not wanted:
        return model
    try:
        import torch._dynamo

        torch._dynamo.config.suppress_errors = True  # a graph that fails to compile runs eagerly instead
        return torch.compile(model)
    except Exception as exc:  # compile is an optimisation: never fail a run for it
        warn(f"torch.compile is unavailable here ({exc}); training without it")
        return model


def memory_stats(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20}


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def oom_message(cfg: TrainingConfig, device: torch.device) -> str:
    return (f"out of memory on {device} with batch_size {cfg.batch_size} and sequence_length "
            f"{cfg.sequence_length}. {oom_remedies(cfg)}")


def oom_remedies(cfg: TrainingConfig) -> str:
    half = max(1, cfg.batch_size // 2)
    return (f"In order: 1) a smaller batch with gradient accumulation, e.g. --batch-size {half} --set "
            f"training.gradient_accumulation_steps={cfg.gradient_accumulation_steps * 2}; 2) a smaller model, e.g. "
            f"--config small; 3) a shorter context, e.g. --sequence-length {max(1, cfg.sequence_length // 2)}")


# ----------------------------------------------------------------------------------------------------------
# Will it fit? Checked before anything is allocated.


def available_memory(device: torch.device) -> int | None:
    """Bytes that `device` can still give: free GPU memory, or the RAM the kernel reports as available (what the
    OOM killer would otherwise settle). None where it cannot be told (MPS, non-Linux CPUs)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def model_memory(model_on_meta: torch.nn.Module, batch_size: int, context: int, training: bool,
                 optimizer: str = "adamw") -> int:
    """Bytes a model needs, estimated from a copy built on the meta device (which allocates nothing).

    Weights and buffers, plus for training the gradients and optimizer state (AdamW: two moments; Muon: one
    momentum for the matrices) and the activations kept for the backward pass; for inference the KV cache and
    one batch of logits. Activations are estimated per layer from the residual width and the MLP width, in fp32:
    a rough figure, meant to tell a model that cannot fit from one that can, not to predict the peak."""
    cfg = model_on_meta.cfg
    params = sum(p.numel() for p in model_on_meta.parameters())
    buffers = sum(b.numel() for b in model_on_meta.buffers())
    tokens = batch_size * context
    logits = tokens * model_on_meta.vocab_size
    if not training:
        kv_cache = 2 * cfg.num_layers * tokens * cfg.d_model
        return 4 * (params + buffers + kv_cache + 2 * logits)
    state = 2 * params if optimizer == "adamw" else params
    activations = tokens * cfg.num_layers * (16 * cfg.d_model + 3 * cfg.d_ff) + 3 * logits
    return 4 * (params + buffers + params + state + activations)


def check_memory(needed: int, device: torch.device, what: str, remedy: str) -> None:
    """Refuse, before allocating, what the device cannot hold."""
    available = available_memory(device)
    if available is not None and needed > available:
        raise UserError(f"{what} needs about {_gigabytes(needed)} of memory, but {device} has "
                        f"{_gigabytes(available)} available. {remedy}")


def _gigabytes(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB" if n < 2**60 else f"{n:.2e} bytes"
