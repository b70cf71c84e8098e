"""This machine: cores, RAM, CPU features, an NVIDIA driver, and each backend's probe of its
engine. The only part of loading that looks at the real machine; `detect_facts()` gathers it
once per process for `choose()` (runtime/loading/choose.py).
"""

from __future__ import annotations

import functools
import os
import platform as _platform
import shutil
import subprocess

from pocketlm.backends import backends
from pocketlm.loading.facts import PlatformFacts


def _physical_cores() -> int:
    logical = os.cpu_count() or 1
    system = _platform.system()
    try:
        if system == "Linux":
            cores = set()
            phys = core = None
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("physical id"):
                        phys = line.split(":")[1].strip()
                    elif line.startswith("core id"):
                        core = line.split(":")[1].strip()
                    elif not line.strip():
                        if core is not None:
                            cores.add((phys, core))
                        phys = core = None
            if core is not None:
                cores.add((phys, core))
            return len(cores) or logical
        if system == "Darwin":
            for key in ("hw.perflevel0.physicalcpu", "hw.physicalcpu"):
                out = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5)
                if out.returncode == 0 and out.stdout.strip().isdigit():
                    return int(out.stdout.strip())
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    return logical


def _cpu_features() -> frozenset[str]:
    wanted = {"avx", "avx2", "avx512f", "avx512_vnni", "avx_vnni", "fma", "f16c", "neon", "asimd", "sve"}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(set(line.split(":", 1)[1].split()) & wanted)
    except OSError:
        pass
    return frozenset({"neon"}) if _platform.machine() in ("arm64", "aarch64") else frozenset()


def ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def available_ram_bytes(meminfo: str = "/proc/meminfo") -> int | None:
    """RAM that can be allocated without swapping: Linux's MemAvailable, else the RAM's size."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return ram_bytes()


def _nvidia_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None or os.path.exists("/proc/driver/nvidia/version")


@functools.lru_cache(maxsize=1)
def detect_facts() -> PlatformFacts:
    """Facts about this machine and the installed engines (each backend probes its own)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return PlatformFacts(
        system=_platform.system(),
        machine=_platform.machine(),
        physical_cores=_physical_cores(),
        usable_cpus=usable,
        ram_bytes=ram_bytes(),
        cpu_features=_cpu_features(),
        nvidia_gpu=_nvidia_gpu(),
        engines={b.name: b.probe() for b in backends()},
    )
