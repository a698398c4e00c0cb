"""Device memory probes: one reading of used and total memory, with its source.

On CUDA through NVML (``nvidia-ml-py``), the GPU found by its PCI bus id so
``CUDA_VISIBLE_DEVICES`` cannot mix GPUs up; without NVML through
``torch.cuda.mem_get_info``; on CPU the process's RSS and the host's RAM through
psutil; without psutil the pool's own bytes. Nothing here raises for a missing
driver or library. :func:`nvml_available` is the one NVML probe of the library.
"""

from __future__ import annotations

import functools
import importlib
import os
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch


@functools.cache
def nvml_available() -> bool:
    """True when NVML (nvidia-ml-py) imports and initialises."""
    try:
        probe = importlib.import_module("pynvml")
        probe.nvmlInit()
        probe.nvmlShutdown()
        return True
    except Exception:
        return False


@dataclass(frozen=True)
class MemoryReading:
    """Memory of the pool's device at one moment.

    Attributes:
        used_bytes: bytes in use on the device (CUDA), or the process's RSS (CPU);
            None when unknown.
        total_bytes: the device's memory (CUDA) or the host's RAM (CPU); None when unknown.
        source: ``"nvml"``, ``"torch.cuda.mem_get_info"``, ``"psutil-rss"`` or ``"pool-bytes"``.
        note: why a fallback source was used ("" for the preferred source).
    """

    used_bytes: int | None
    total_bytes: int | None
    source: str
    note: str = ""


class MemoryProbe(ABC):
    """Reads a device's used and total memory; :meth:`close` releases what it holds."""

    @abstractmethod
    def read(self) -> MemoryReading:
        """The current reading (never raises)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release library handles (idempotent)."""


def pci_bus_id(device: torch.device) -> str:
    """``"dddddddd:bb:dd.0"`` PCI bus id of CUDA ``device``, the form NVML looks GPUs up by.

    torch's device index counts only the GPUs ``CUDA_VISIBLE_DEVICES`` shows, NVML's
    counts all of them; the bus id names the same GPU in both.
    """
    props: Any = torch.cuda.get_device_properties(device)  # torch's stubs omit the pci_* fields
    return f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"


class NvmlMemory(MemoryProbe):
    """Used and total memory of one GPU through NVML.

    Initialises NVML once per probe and shuts it down on :meth:`close`, when the
    probe is garbage-collected, or at interpreter exit, whichever comes first
    (NVML counts initialisations, so probes do not disturb each other).

    Args:
        bus_id: the GPU's PCI bus id (:func:`pci_bus_id`).

    Keyword Args:
        nvml: the NVML binding (default: ``pynvml`` from nvidia-ml-py); tests pass a fake.

    Raises:
        Exception: whatever the binding raises when NVML or the GPU is missing
            (:func:`open_probe` turns that into a fallback).
    """

    source = "nvml"

    def __init__(self, bus_id: str, *, nvml: Any = None) -> None:
        self.nvml = nvml if nvml is not None else importlib.import_module("pynvml")
        self.bus_id = bus_id
        self.nvml.nvmlInit()
        try:
            self._handle = self.nvml.nvmlDeviceGetHandleByPciBusId(bus_id)
        except Exception:
            self.nvml.nvmlShutdown()
            raise
        self._finalizer = weakref.finalize(self, self.nvml.nvmlShutdown)

    def read(self) -> MemoryReading:
        """Used and total bytes of the GPU; a reading of Nones with the reason if NVML fails."""
        if not self._finalizer.alive:
            return MemoryReading(None, None, self.source, "NVML probe closed")
        try:
            info = self.nvml.nvmlDeviceGetMemoryInfo(self._handle)
        except Exception as exc:  # a lost GPU or driver reads as "unknown", not a crash
            return MemoryReading(None, None, self.source, f"NVML read failed: {exc}")
        return MemoryReading(int(info.used), int(info.total), self.source)

    def close(self) -> None:
        """Shut NVML down (once)."""
        self._finalizer()


class CudaMemory(MemoryProbe):
    """Used and total memory of a CUDA device through ``torch.cuda.mem_get_info``.

    Args:
        device: the CUDA device.

    Keyword Args:
        note: why NVML is not used.
    """

    source = "torch.cuda.mem_get_info"

    def __init__(self, device: torch.device, *, note: str = "") -> None:
        self.device = device
        self.note = note

    def read(self) -> MemoryReading:
        """Used (total - free) and total bytes of the device."""
        try:
            free, total = torch.cuda.mem_get_info(self.device)
        except Exception as exc:
            return MemoryReading(None, None, self.source, f"{self.note}; mem_get_info failed: {exc}")
        return MemoryReading(int(total - free), int(total), self.source, self.note)


class ProcessMemory(MemoryProbe):
    """The process's RSS and the host's RAM, for a pool on CPU.

    Uses psutil; without it ``used_bytes`` is None (the budget reports the pool's own
    bytes instead) and the total comes from ``os.sysconf``.

    Keyword Args:
        note: why this probe is used.
    """

    def __init__(self, *, note: str = "") -> None:
        self.note = note
        try:
            self._psutil: Any = importlib.import_module("psutil")
        except ImportError:
            self._psutil = None

    def read(self) -> MemoryReading:
        """RSS and host RAM (psutil), or host RAM alone."""
        if self._psutil is not None:
            try:
                rss = self._psutil.Process().memory_info().rss
                total = self._psutil.virtual_memory().total
                return MemoryReading(int(rss), int(total), "psutil-rss", self.note)
            except Exception as exc:
                note = f"psutil failed: {exc}"
        else:
            note = "psutil missing"
        try:
            ram: int | None = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # sysconf names are platform-specific
            ram = None
        return MemoryReading(None, ram, "pool-bytes", "; ".join(filter(None, (self.note, note))))


def open_probe(device: torch.device, *, nvml: Any = None) -> MemoryProbe:
    """The best memory probe for ``device``: NVML on CUDA, else the fallbacks.

    Never raises: a missing NVML library, driver or GPU falls back to
    ``torch.cuda.mem_get_info`` (CUDA) or process accounting (CPU), and the
    reading's ``note`` says why.

    Keyword Args:
        nvml: the NVML binding to use (default ``pynvml``).
    """
    if device.type != "cuda":
        return ProcessMemory(note="CPU pool: process accounting")
    try:
        return NvmlMemory(pci_bus_id(device), nvml=nvml)
    except Exception as exc:
        return CudaMemory(device, note=f"NVML unavailable ({type(exc).__name__}: {exc})")


# ------------------------------------------------------------- host limits
CGROUP_ROOT = "/sys/fs/cgroup"  # where the process's memory cgroup is mounted (v2, or v1 under memory/)
_UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a page-rounded LLONG_MAX


@dataclass(frozen=True)
class HostRoom:
    """Bytes this process can still allocate on the host, by each limit that applies.

    Attributes:
        available: the host's available RAM (psutil; ``os.sysconf`` without it).
        rlimit_as: ``RLIMIT_AS`` (soft) minus the process's address space now; None without a limit.
        cgroup: the memory cgroup's limit (v2 ``memory.max``, v1 ``memory.limit_in_bytes``)
            minus its usage; None without a limit.
    """

    available: int | None
    rlimit_as: int | None
    cgroup: int | None

    @property
    def smallest(self) -> tuple[int, str] | None:
        """``(bytes, name)`` of the tightest limit, or None when none could be read."""
        known = [(v, k) for k, v in vars(self).items() if v is not None]
        return min(known) if known else None


def host_room() -> HostRoom:
    """Read :class:`HostRoom` now (never raises: an unreadable limit is None)."""
    return HostRoom(_available_ram(), _rlimit_as_room(), _cgroup_room())


def _available_ram() -> int | None:
    try:
        return int(importlib.import_module("psutil").virtual_memory().available)
    except Exception:  # no psutil: the kernel's count of free pages
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None


def _rlimit_as_room() -> int | None:
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft == resource.RLIM_INFINITY:
            return None
        with open("/proc/self/statm") as f:  # first field: the address space, in pages
            size = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (ImportError, OSError, ValueError, IndexError, AttributeError):  # not Linux: no reading
        return None
    return max(0, soft - size)


def _cgroup_room() -> int | None:
    for limit_file, usage_file in (
        ("memory.max", "memory.current"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"),
    ):
        try:
            with open(os.path.join(CGROUP_ROOT, limit_file)) as f:
                limit = f.read().strip()
            if limit == "max" or int(limit) >= _UNLIMITED:
                return None
            with open(os.path.join(CGROUP_ROOT, usage_file)) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        return max(0, int(limit) - usage)
    return None
