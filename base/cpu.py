"""What this CPU can do that changes how we compute: machines differ (AVX2-only EPYCs,
AVX512-BF16 EPYCs, Xeons with AMX), so precision is chosen at run time."""

from __future__ import annotations

from pathlib import Path


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); on others (AVX2
    only) torch emulates it, slower than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
