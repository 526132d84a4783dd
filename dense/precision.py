"""Whether this CPU computes bfloat16 natively: bf16 autocast (dense training and encoding, ``cpu_bf16``) and the
QL scorer's bf16 weights are 2.3-2.6x faster than float32 on such a CPU (EXPERIMENTS E27, E29) and several times
slower on one that emulates bf16 (E10)."""

from __future__ import annotations

# the precisions a scorer or encoder setting may name; "auto" is bfloat16 where cpu_has_native_bf16(), else float32
PRECISIONS = ("float32", "bfloat16", "auto")


def cpu_has_native_bf16() -> bool:
    """True when torch reports AVX512-BF16 or AMX tiles on this CPU."""
    import torch

    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    try:
        return any(bool(check()) for check in checks if check is not None)
    except RuntimeError:  # pragma: no cover - a torch build without the CPU probes
        return False


__all__ = ["PRECISIONS", "cpu_has_native_bf16"]
