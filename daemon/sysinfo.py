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


def memory_bound(cgroups: str | None = None, root: str = "/sys/fs/cgroup") -> tuple[int, str]:
    """(bytes, where) this process may use at most: the machine's memory, or less where its
    cgroup says so (systemd's MemoryMax=, a container's --memory), which psutil does not see.
    `cgroups`: /proc/self/cgroup's text (read here when None); `root`: where cgroupfs is."""
    bound, where = psutil.virtual_memory().total, "this machine's memory"
    if cgroups is None:
        try:
            with open("/proc/self/cgroup") as f:
                cgroups = f.read()
        except OSError:
            return bound, where
    for line in cgroups.splitlines():
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # cgroup v2: the least memory.max of the group and those above it
            bases, name = [f"{root}{path}".rstrip("/")], "memory.max"
        elif "memory" in controllers.split(","):  # v1; in a container its own group is the mount
            bases, name = [f"{root}/memory{path}".rstrip("/"), f"{root}/memory"], "memory.limit_in_bytes"
        else:
            continue
        for base in bases:
            while base.startswith(root) and len(base) >= len(root):
                try:
                    with open(f"{base}/{name}") as f:
                        value = f.read().strip()
                except OSError:
                    value = ""
                if value.isdigit() and int(value) < min(bound, 1 << 60):
                    bound, where = int(value), f"the memory its cgroup allows ({base}/{name})"
                base = base.rsplit("/", 1)[0]
    return bound, where


LIMIT = "the job's limits.memory_mb"


def memory_excess(per_process: int, processes: int, limit_mb: int | None) -> tuple[int, int, str] | None:
    """(need, room, where) when `processes` processes needing `per_process` bytes each outgrow
    limits.memory_mb (which bounds each process) or `memory_bound` (which bounds them all);
    None when they fit."""
    if limit_mb and per_process > limit_mb * 2**20:
        return per_process, limit_mb * 2**20, LIMIT
    bound, where = memory_bound()
    return (per_process * processes, bound, where) if per_process * processes > bound else None


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
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(physical_index(device_index))
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


def assigned_gpus() -> tuple[int, ...]:
    """The GPUs the daemon gave this worker (CUDA_VISIBLE_DEVICES, in nvidia-smi's numbers:
    the daemon also sets CUDA_DEVICE_ORDER=PCI_BUS_ID); () when it named none or gave UUIDs."""
    ids = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return tuple(int(v) for v in ids) if all(v.isdigit() for v in ids) else ()


def physical_index(visible_index: int) -> int:
    """CUDA_VISIBLE_DEVICES renumbers GPUs for CUDA from 0; NVML counts the physical ones."""
    ids = assigned_gpus()
    return ids[visible_index] if visible_index < len(ids) else visible_index


def gpu_count() -> int:
    """GPUs NVML sees (0 without a driver). The daemon schedules with this; it never imports a
    training framework to find out. The scheduling tests set EPOCHD_TEST_GPUS to a count, for a
    daemon that believes it has that many (its workers then see no GPU at all)."""
    if os.environ.get("EPOCHD_TEST_GPUS"):
        return int(os.environ["EPOCHD_TEST_GPUS"])
    try:
        import pynvml
        pynvml.nvmlInit()
        try:
            return pynvml.nvmlDeviceGetCount()
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # pynvml raises NVMLError subclasses (and OSError) without a driver
        return 0
