"""What the training will run on. `detect()` imports torch, so only train/plan/doctor call it."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass


@dataclass
class Device:
    kind: str          # "cuda", "cpu", or "unprobed" (render: assume a GPU, know nothing about it)
    name: str
    count: int         # GPUs visible (0 on CPU)
    total_mem: int     # bytes per GPU
    free_mem: int      # bytes free on the first GPU
    bf16: bool
    world_size: int = 1  # training processes (set by the resources stage)

    @classmethod
    def unprobed(cls) -> "Device":
        return cls("unprobed", "not probed", 1, 0, 0, True)

    @classmethod
    def cpu(cls) -> "Device":
        return cls("cpu", f"CPU ({os.cpu_count()} cores)", 0, 0, 0, False)

    @classmethod
    def detect(cls) -> "Device":
        if os.environ.get("LFW_DEVICE") == "cpu":
            return cls.cpu()
        import torch

        if not torch.cuda.is_available():
            return cls.cpu()
        free, total = torch.cuda.mem_get_info(0)
        return cls(
            "cuda",
            torch.cuda.get_device_name(0),
            torch.cuda.device_count(),
            total,
            free,
            bool(torch.cuda.is_bf16_supported()),
        )

    def describe(self) -> dict:
        d = asdict(self)
        d["total_gb"] = round(self.total_mem / 2**30, 1)
        d["free_gb"] = round(self.free_mem / 2**30, 1)
        return d

    def __str__(self) -> str:
        if self.kind == "cuda":
            n = f"{self.count} x " if self.count > 1 else ""
            return f"{n}{self.name} ({self.total_mem / 2**30:.0f} GiB, {self.free_mem / 2**30:.0f} GiB free)"
        return self.name
