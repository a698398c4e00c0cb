"""Device resolution and capability probes (CUDA, FAISS GPU; NVML in :mod:`dreampool_gpu.memory`).

Each probe runs once and never raises: a missing driver or library reads as
"unavailable".
"""

from __future__ import annotations

import functools

import torch

from dreampool_gpu.errors import DeviceUnavailableError, InvalidConfigurationError


@functools.cache
def cuda_available() -> bool:
    """True when torch sees at least one CUDA device."""
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # a broken driver must read as "no GPU", not crash import
        return False


@functools.cache
def faiss_available() -> bool:
    """True when FAISS imports (``faiss-cpu`` or a GPU build); the ``auto`` engine uses torch alone without it."""
    try:
        import faiss  # noqa: F401

        return True
    except ImportError:
        return False


@functools.cache
def faiss_gpu_available() -> bool:
    """True when the installed faiss was built with GPU support and sees a GPU."""
    try:
        import faiss

        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except Exception:
        return False


def host_to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``; to CUDA through pinned memory, so the copy does not wait for the GPU."""
    if device.type == "cuda":
        return values.pin_memory().to(device, non_blocking=True)
    return values.to(device)


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """Resolve ``"auto" | "cpu" | "cuda" | "cuda:N"`` to a concrete device.

    ``"auto"`` picks ``cuda:<current>`` when CUDA is present, else CPU. A bare
    ``"cuda"`` becomes ``"cuda:N"`` so device comparisons hold.

    Raises:
        DeviceUnavailableError: CUDA was asked for explicitly and is absent.
        InvalidConfigurationError: the string names no device.
    """
    if isinstance(spec, str) and spec == "auto":
        if cuda_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise InvalidConfigurationError("device", spec, '"auto", "cpu", "cuda" or "cuda:N"') from exc
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise InvalidConfigurationError("device", spec, '"auto", "cpu", "cuda" or "cuda:N"')
    if not cuda_available():
        raise DeviceUnavailableError(f"device {spec!r} requested but CUDA is not available")
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise DeviceUnavailableError(
            f"device {spec!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
        )
    return torch.device("cuda", index)
