"""The CPU this process runs on: model name, the ISA flags that decide which kernels can be fast (AVX2,
AVX-512, VNNI, bf16, AMX), and a key naming the machine kind for results recorded per machine.

Read from ``/proc/cpuinfo`` (Linux); elsewhere the model is ``platform.processor()`` and no flags are
known. Cheap: no library is imported.

    machine_key()   # "amd-epyc-2c-4f3a91c2": model, cores and a digest of the ISA flags
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
from pathlib import Path

ISA_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_bf16",
    "amx_int8",
    "amx_tile",
)
# An int8 dot product accumulating in 32 bits without 16-bit saturation (what 8-bit weights need).
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The first processor's flags."""
    for line in (cpuinfo if cpuinfo is not None else _cpuinfo()).splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def cpu_model(cpuinfo: str | None = None) -> str:
    for line in (cpuinfo if cpuinfo is not None else _cpuinfo()).splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return platform.processor() or platform.machine()


def isa(cpuinfo: str | None = None) -> dict[str, bool]:
    flags = cpu_flags(cpuinfo)
    return {f: f in flags for f in ISA_FLAGS}


def has_vnni(cpuinfo: str | None = None) -> bool:
    flags = cpu_flags(cpuinfo)
    return any(f in flags for f in VNNI_FLAGS)


def logical_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def machine_key(cpuinfo: str | None = None) -> str:
    """A file-name-safe key for this kind of machine: CPU model, usable CPUs, and a digest of the ISA
    flags that matter for speed (two machines with the same key run the same kernels)."""
    text = cpuinfo if cpuinfo is not None else _cpuinfo()
    flags = ",".join(f for f, on in isa(text).items() if on)
    model = re.sub(r"[^a-z0-9]+", "-", cpu_model(text).lower()).strip("-") or "cpu"
    digest = hashlib.sha256(f"{cpu_model(text)}|{flags}".encode()).hexdigest()[:8]
    return f"{model[:40]}-{logical_cpus()}c-{digest}"
