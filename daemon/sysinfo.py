"""Readings for `epoch_completed`: process memory (psutil) and GPU use (nvidia-ml-py).

NVML is optional: without a driver (or without a GPU job) every GPU reading is None, which the
events record as null. Nothing here imports a training framework.
"""
import logging
import os
import sys

import psutil

log = logging.getLogger(__name__)

_process = psutil.Process()  # cached: memory_info() is ~20 us on a cached Process


def rss_mb() -> float:
    return _process.memory_info().rss / 2**20


def peak_rss_mb() -> float | None:
    """The most RSS this process has had so far (getrusage; kilobytes on Linux, bytes on macOS)."""
    try:
        import resource
    except ImportError:  # not on this platform
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


class GpuMonitor:
    """Samples one GPU's utilisation and this process's memory on it; means per epoch."""

    def __init__(self, device_index: int | None):
        self.handle = None
        self.samples: list[float] = []
        if device_index is None:
            return
        try:
            import pynvml
            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(_physical_index(device_index))
        except Exception as e:  # no driver, no device, or an NVML error: readings become null
            log.warning("GPU readings unavailable: %s", e)
            self.handle = None

    def sample(self) -> None:
        if self.handle is not None:
            self.samples.append(float(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu))

    def epoch_readings(self) -> tuple[float | None, float | None]:
        """(mean utilisation %, this process's GPU memory MB) since the last call."""
        if self.handle is None:
            return None, None
        util = sum(self.samples) / len(self.samples) if self.samples else None
        self.samples = []
        return util, self._process_memory_mb()

    def _process_memory_mb(self) -> float | None:
        pid = os.getpid()
        for proc in self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
            if proc.pid == pid and proc.usedGpuMemory is not None:
                return proc.usedGpuMemory / 2**20
        return self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used / 2**20


def _physical_index(visible_index: int) -> int:
    """CUDA_VISIBLE_DEVICES renumbers GPUs for CUDA; NVML counts the physical ones."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    if visible_index < len(ids) and ids[visible_index].isdigit():
        return int(ids[visible_index])
    return visible_index


def gpu_count() -> int:
    """GPUs NVML sees (0 without a driver). The daemon schedules with this; it never imports a
    training framework to find out."""
    try:
        import pynvml
        pynvml.nvmlInit()
        try:
            return pynvml.nvmlDeviceGetCount()
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # pynvml raises NVMLError subclasses (and OSError) without a driver
        return 0
