"""What one request to `tinyldm serve` may ask for (params.serve): checked before any
sampling, refused with one line naming the limit and its key."""

from __future__ import annotations

from typing import Any

from components.contracts import UserError


def check_limits(n_prompts: int, steps: int | None, cfg: Any) -> None:
    if n_prompts > cfg.max_prompts:
        raise UserError(f"{n_prompts} prompts in one request, over serve.max_prompts="
                        f"{cfg.max_prompts}; split the request")
    if steps is not None and not 1 <= steps <= cfg.max_steps:
        raise UserError(f"steps={steps}: must be 1..{cfg.max_steps} (serve.max_steps)")
