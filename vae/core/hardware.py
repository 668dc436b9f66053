"""What the CPU offers for reduced precision, read from `/proc/cpuinfo` (standard library only).

bf16 autocast on a CPU is fast only where the cores have bf16 units: AMX (`amx_bf16`, Intel Sapphire Rapids and
later) or AVX512-BF16 (`avx512_bf16`, Intel Cooper Lake, AMD Zen 4 and later). Elsewhere every bf16 operation is
emulated through float32 conversions and training runs slower than in plain float32.
"""

from __future__ import annotations

BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def read_cpuinfo(path: str = "/proc/cpuinfo") -> str:
    """The text of /proc/cpuinfo, or "" where there is none (macOS, Windows) or it cannot be read."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _first(cpuinfo: str, field: str) -> str | None:
    for line in cpuinfo.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() == field:
            return value.strip()
    return None


def cpu_flags(cpuinfo: str) -> set[str] | None:
    """The first core's x86 `flags`, or None where the text has no flags line (not x86, or not readable)."""
    flags = _first(cpuinfo, "flags")
    return None if flags is None else set(flags.split())


def cpu_bf16_units(cpuinfo: str) -> list[str] | None:
    """Which of `BF16_FLAGS` the CPU has (possibly none), or None when that is unknown (no x86 flags line)."""
    flags = cpu_flags(cpuinfo)
    return None if flags is None else [f for f in BF16_FLAGS if f in flags]


def cpu_model_name(cpuinfo: str) -> str | None:
    """The CPU's model name (`model name` on x86), or None."""
    return _first(cpuinfo, "model name")
