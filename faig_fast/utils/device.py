"""Device helpers shared by the engine, the benchmarks and the studies."""
from __future__ import annotations

import torch


def sync(device: torch.device | str) -> None:
    """Wait for queued work on ``device`` (a no-op on CPU), so wall-clock timings are honest."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
