"""What the training will run on.

`Device.detect()` asks `nvidia-smi` (a few tens of milliseconds) for the GPUs' names, memory and
compute capability, and checks on disk that the installed torch is a CUDA build, so `lfw plan` and
`lfw train` start without importing torch (2-5 s). Without nvidia-smi (or when it fails) it falls
back to torch. `LFW_DEVICE=cpu` forces the CPU.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

MiB = 2**20
_QUERY = "index,uuid,name,memory.total,memory.free,compute_cap"


@dataclass
class Device:
    kind: str          # "cuda", "cpu", or "unprobed" (render: assume a GPU, know nothing about it)
    name: str
    count: int         # GPUs visible (0 on CPU)
    total_mem: int     # bytes per GPU (the smallest visible GPU)
    free_mem: int      # bytes free (the least free of the visible GPUs: each must hold the model)
    bf16: bool
    world_size: int = 1  # training processes (set by the resources stage)
    capability: str | None = None   # CUDA compute capability, "9.0"
    source: str = ""                # how it was found: nvidia-smi, torch, forced, ...
    note: str | None = None         # why a GPU that is present is not used

    @classmethod
    def unprobed(cls) -> Device:
        return cls("unprobed", "not probed", 1, 0, 0, True)

    @classmethod
    def cpu(cls, note: str | None = None, source: str = "") -> Device:
        return cls("cpu", f"CPU ({os.cpu_count()} cores)", 0, 0, 0, False, source=source, note=note)

    @classmethod
    def detect(cls) -> Device:
        if os.environ.get("LFW_DEVICE") == "cpu":
            return cls.cpu(source="LFW_DEVICE=cpu")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None and visible.strip() in ("", "-1"):
            return cls.cpu(note="CUDA_VISIBLE_DEVICES hides every GPU", source="CUDA_VISIBLE_DEVICES")
        gpus = query_nvidia_smi()
        if gpus is not None:
            gpus = _visible(gpus, visible)
        if gpus is None:  # no nvidia-smi, or devices it cannot name (MIG): ask torch
            return cls._detect_torch()
        if not gpus:
            return cls.cpu(note="nvidia-smi lists no GPU", source="nvidia-smi")
        build = torch_cuda_build()
        if build is False:
            return cls.cpu(note=f"{gpus[0]['name']} found, but the installed torch is a CPU-only build: "
                                "install a CUDA build of torch", source="nvidia-smi")
        caps = [g["capability"] for g in gpus if g["capability"]]
        cap = min(caps, key=_cap_key) if caps else None
        names = {g["name"] for g in gpus}
        return cls(
            "cuda",
            gpus[0]["name"] if len(names) == 1 else " + ".join(sorted(names)),
            len(gpus),
            min(g["total"] for g in gpus),
            min(g["free"] for g in gpus),
            bool(cap) and _cap_key(cap) >= (8, 0),
            capability=cap,
            source="nvidia-smi",
        )

    @classmethod
    def _detect_torch(cls) -> Device:
        try:
            import torch
        except ImportError:
            return cls.cpu(note="torch is not installed", source="torch")
        if not torch.cuda.is_available():
            return cls.cpu(source="torch")
        n = torch.cuda.device_count()
        mems = [torch.cuda.mem_get_info(i) for i in range(n)]
        major, minor = torch.cuda.get_device_capability(0)
        return cls(
            "cuda",
            torch.cuda.get_device_name(0),
            n,
            min(t for _, t in mems),
            min(f for f, _ in mems),
            bool(torch.cuda.is_bf16_supported()),
            capability=f"{major}.{minor}",
            source="torch",
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
        return self.name + (f" ({self.note})" if self.note else "")


def _cap_key(cap: str) -> tuple[int, int]:
    try:
        major, _, minor = cap.partition(".")
        return int(major), int(minor or 0)
    except ValueError:
        return (0, 0)


def query_nvidia_smi(timeout: float = 10.0) -> list[dict] | None:
    """Every GPU nvidia-smi lists, in its order; None when nvidia-smi is missing or fails."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    for fields in (_QUERY, _QUERY.replace(",compute_cap", "")):  # drivers before 510 lack compute_cap
        try:
            r = subprocess.run([exe, f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                               check=False, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.SubprocessError):
            return None
        if r.returncode == 0:
            return parse_nvidia_smi(r.stdout)
    return None


def parse_nvidia_smi(text: str) -> list[dict]:
    gpus = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 5:
            continue
        try:
            total, free = int(float(parts[3])) * MiB, int(float(parts[4])) * MiB
        except ValueError:
            continue
        cap = parts[5] if len(parts) > 5 and parts[5] not in ("", "[N/A]", "N/A") else None
        gpus.append({"index": parts[0], "uuid": parts[1], "name": parts[2], "total": total, "free": free,
                     "capability": cap})
    return gpus


def _visible(gpus: list[dict], visible: str | None) -> list[dict] | None:
    """The GPUs CUDA_VISIBLE_DEVICES leaves, in its order; None when it names something nvidia-smi can't map."""
    if visible is None:
        return gpus
    out = []
    for item in (v.strip() for v in visible.split(",")):
        if not item:
            continue
        if item.isdigit():
            match = [g for g in gpus if g["index"] == item]
        elif item.startswith("GPU-"):
            match = [g for g in gpus if g["uuid"].startswith(item)]
        else:
            return None  # MIG-... and the like
        if not match:
            break  # CUDA stops at the first invalid entry
        out.append(match[0])
    return out


def torch_cuda_build() -> bool | None:
    """Whether the installed torch has CUDA, from its files (no import): True, False, or None (unknown)."""
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    lib = Path(next(iter(spec.submodule_search_locations))) / "lib"
    if not lib.is_dir():
        return None
    if any(lib.glob("libtorch_cuda*.so*")) or any(lib.glob("torch_cuda*.dll")):
        return True
    if any(lib.glob("libtorch_cpu*")) or any(lib.glob("torch_cpu*.dll")):
        return False
    return None
