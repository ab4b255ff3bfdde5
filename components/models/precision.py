"""bf16 on the CPU, decided one way for training (training/runtime.py), sampling
(models/generator.py) and caption encoding (models/text_encoders.py)."""

from __future__ import annotations

import torch


def bf16_enabled(setting: bool | str) -> bool:
    """`auto`: bf16 autocast only where the CPU computes bf16 natively (AVX512-BF16 or
    AMX): 1.6-1.8x faster training steps there, 2-3x slower where it is emulated."""
    if setting != "auto":
        return bool(setting)
    return any(getattr(torch.cpu, f, lambda: False)()
               for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def cpu_autocast(setting: bool | str) -> torch.autocast:
    """bf16 autocast on the CPU where `setting` (true, false or auto) enables it."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_enabled(setting))
