"""`lfw doctor`: what this machine can do for lfw, one line per check, with what to do when one fails.

    ok    gpu       1 x NVIDIA H100 80GB HBM3: 79.1 GiB, 78.6 GiB free, compute 9.0
    ok    cuda      driver 580.65 (CUDA 13.0); torch 2.11.0 built for CUDA 13.0; torch sees 1 GPU
    ok    versions  torch 2.11.0, transformers 5.6.0, llamafactory 0.9.5, peft 0.18.1, ...
    ok    bf16      a bf16 matmul and backward ran on the GPU
    ok    qlora     a 4-bit (nf4) layer ran forward and backward (bitsandbytes 0.50.2)
    ok    liger     the liger kernel's RMSNorm and fused linear-cross-entropy ran (liger-kernel 0.8.5)
    ok    plan      Qwen2.5-7B here: lora, batch 8 x 1, no gradient checkpointing, ~20 GiB
    ok    disk      412 GiB free for models in ~/.cache/lfw

The GPU checks run real kernels in a child process (a crash or hang there is reported as a
failure, not a crash of lfw), so this takes a few seconds to a minute (triton compiles liger's
kernels on first use).
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

GiB = 2**30
PINNED = {"llamafactory": "0.9.5"}
SHOWN = ("torch", "transformers", "llamafactory", "peft", "accelerate", "bitsandbytes", "liger-kernel", "triton")
PROBE_TIMEOUT = 300


@dataclass
class Check:
    name: str
    status: str        # ok | warn | fail | info
    detail: str
    fix: str | None = None

    def line(self) -> str:
        tag = {"ok": "ok", "warn": "warn", "fail": "FAIL", "info": "info"}[self.status]
        text = f"{tag:<5} {self.name:<9} {self.detail}"
        return text + (f" -> {self.fix}" if self.fix else "")


def version(name: str) -> str | None:
    for candidate in (name, name.replace("-", "_"), name.replace("_", "-")):
        try:
            return md.version(candidate)
        except md.PackageNotFoundError:
            continue
    return None


def _cuda_of_driver() -> str | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        head = subprocess.run([exe], check=False, capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"CUDA Version:\s*([\d.]+)", head)
    return m.group(1) if m else None


def _driver_version() -> str | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        r = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"], check=False, capture_output=True,
                           text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None


def _vkey(v: str | None) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", v or "")[:2]) or (0,)


# ------------------------------------------------------------------ checks that need no torch

def check_gpu() -> Check:
    from wrapper.device import _visible, query_nvidia_smi

    gpus = query_nvidia_smi()
    if gpus is None:
        return Check("gpu", "warn", "no NVIDIA GPU found (nvidia-smi is missing or fails)",
                     "lfw trains on the CPU: fine for the 0.5B demo, slow beyond; on a GPU machine install the "
                     "NVIDIA driver (nvidia-smi must work)")
    visible = _visible(gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
    if visible is not None:
        gpus = visible
    if not gpus:
        return Check("gpu", "warn", "nvidia-smi lists no usable GPU (CUDA_VISIBLE_DEVICES="
                     f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r})", "unset CUDA_VISIBLE_DEVICES or name a GPU")
    parts = []
    for g in gpus:
        cap = f", compute {g['capability']}" if g["capability"] else ""
        parts.append(f"{g['name']}: {g['total'] / GiB:.1f} GiB, {g['free'] / GiB:.1f} GiB free{cap}")
    text = f"{len(gpus)} x " + ("; ".join(parts) if len(set(parts)) > 1 else parts[0])
    low = min(g["free"] for g in gpus)
    if low < 4 * GiB:
        return Check("gpu", "warn", text, "another process holds most of the GPU memory: stop it (nvidia-smi "
                     "lists it) or lfw will plan QLoRA or refuse")
    return Check("gpu", "ok", text)


def check_versions() -> Check:
    vs = {n: version(n) for n in SHOWN}
    text = ", ".join(f"{n} {v}" for n, v in vs.items() if v) + (
        "; missing: " + ", ".join(n for n, v in vs.items() if not v) if not all(vs.values()) else "")
    if not vs["torch"]:
        return Check("versions", "fail", text, "install torch (make setup)")
    if not vs["llamafactory"]:
        return Check("versions", "fail", text, "pip install llamafactory==0.9.5 (make setup)")
    for name, want in PINNED.items():
        if vs.get(name) and vs[name] != want:
            return Check("versions", "warn", text, f"lfw is tested with {name}=={want}: pip install {name}=={want}")
    return Check("versions", "ok", text)


def check_disk() -> Check:
    from wrapper.paths import cache_root

    root = cache_root()
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError as e:
        return Check("disk", "warn", f"cannot read free space at {root}: {e}")
    text = f"{free / GiB:.0f} GiB free for models in {root}"
    if free < 20 * GiB:
        return Check("disk", "warn", text, "a 7B model takes 15 GiB: free space or set LFW_CACHE to a larger disk")
    return Check("disk", "ok", text)


# ------------------------------------------------------------------ checks that run on the GPU (child process)

def probe() -> None:
    """Child: one JSON line per check. Imports torch; each check catches its own errors."""
    def emit(name, ok, detail, **kw):
        print(json.dumps({"name": name, "ok": ok, "detail": detail, **kw}), flush=True)

    try:
        import torch
    except Exception as e:  # noqa: BLE001 - any import failure is the answer
        emit("torch", False, f"import torch failed: {e}")
        return
    cuda = torch.cuda.is_available()
    emit("torch", True, "", cuda=cuda, cuda_build=torch.version.cuda, count=torch.cuda.device_count() if cuda else 0,
         capability=".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None,
         gpu_name=torch.cuda.get_device_name(0) if cuda else None)
    if not cuda:
        return
    dev = torch.device("cuda", 0)
    try:
        a = torch.randn(64, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
        b = torch.randn(64, 64, device=dev, dtype=torch.bfloat16)
        (a @ b).float().pow(2).mean().backward()
        torch.cuda.synchronize()
        ok = bool(torch.isfinite(a.grad.float()).all())
        emit("bf16", ok and torch.cuda.is_bf16_supported(), "a bf16 matmul and backward ran on the GPU"
             if ok else "a bf16 matmul gave non-finite values", supported=bool(torch.cuda.is_bf16_supported()))
    except Exception as e:  # noqa: BLE001
        emit("bf16", False, _one_line(e))
    try:
        import bitsandbytes as bnb

        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        layer = bnb.nn.Linear4bit(256, 256, bias=False, compute_dtype=dtype, quant_type="nf4").to(dev)
        x = torch.randn(4, 256, device=dev, dtype=dtype, requires_grad=True)
        layer(x).float().pow(2).mean().backward()
        torch.cuda.synchronize()
        ok = bool(torch.isfinite(x.grad.float()).all()) and layer.weight.dtype == torch.uint8
        emit("qlora", ok, f"a 4-bit (nf4) layer ran forward and backward (bitsandbytes {bnb.__version__})"
             if ok else "a 4-bit layer gave non-finite values")
    except ImportError as e:
        emit("qlora", False, f"bitsandbytes is not installed ({e})", missing=True)
    except Exception as e:  # noqa: BLE001
        emit("qlora", False, _one_line(e))
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss, LigerRMSNorm

        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        norm = LigerRMSNorm(128).to(dev, dtype)
        h = torch.randn(16, 128, device=dev, dtype=dtype, requires_grad=True)
        w = torch.randn(1000, 128, device=dev, dtype=dtype)
        y = torch.randint(0, 1000, (16,), device=dev)
        LigerFusedLinearCrossEntropyLoss()(w, norm(h), y).backward()
        torch.cuda.synchronize()
        ok = bool(torch.isfinite(h.grad.float()).all())
        emit("liger", ok, f"the liger kernel's RMSNorm and fused linear-cross-entropy ran (liger-kernel "
             f"{version('liger-kernel')}, triton {version('triton')})" if ok else "liger gave non-finite values")
    except ImportError as e:
        emit("liger", False, f"liger-kernel is not installed ({e})", missing=True)
    except Exception as e:  # noqa: BLE001
        emit("liger", False, _one_line(e))


def _one_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    return (text[0] if text else type(e).__name__)[:240]


def run_probe(timeout: float = PROBE_TIMEOUT) -> tuple[dict[str, dict], str | None]:
    """The probe's results by name, and why it stopped early (crash, timeout) if it did."""
    try:
        r = subprocess.run([sys.executable, "-m", "wrapper.doctor", "--probe"], check=False, capture_output=True, text=True,
                           timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        out, err, rc = r.stdout, r.stderr, r.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err, rc = f"timed out after {timeout:.0f} s", None
    found = {}
    for line in out.splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if isinstance(d, dict) and "name" in d:
            found[d["name"]] = d
    stopped = None
    if rc not in (0, None):
        tail = [x for x in (err or "").strip().splitlines() if x.strip()]
        stopped = f"the check process died (exit {rc}){': ' + tail[-1][:200] if tail else ''}"
    elif rc is None:
        stopped = err
    return found, stopped


def gpu_checks(has_gpu: bool) -> list[Check]:
    found, stopped = run_probe()
    t = found.get("torch")
    out: list[Check] = []
    driver, driver_cuda = _driver_version(), _cuda_of_driver()
    drv = f"driver {driver} (CUDA {driver_cuda})" if driver else "no NVIDIA driver"
    if t is None or not t["ok"]:
        why = t["detail"] if t else (stopped or "the check process printed nothing")
        out.append(Check("cuda", "fail", f"{drv}; {why}", "install torch (make setup)"))
        return out + [Check(n, "fail", "not checked: torch does not load") for n in ("bf16", "qlora", "liger")]
    build = t.get("cuda_build")
    if t["cuda"]:
        text = f"{drv}; torch {version('torch')} built for CUDA {build}; torch sees {t['count']} GPU(s)"
        if driver_cuda and build and _vkey(driver_cuda) < _vkey(build):
            out.append(Check("cuda", "warn", text, f"the driver supports CUDA {driver_cuda} < {build}: if kernels "
                             "fail, update the driver or install torch built for your CUDA"))
        else:
            out.append(Check("cuda", "ok", text))
    else:
        text = f"{drv}; torch {version('torch')} " + (f"built for CUDA {build} " if build else "(CPU-only build) ") + \
            "sees no GPU"
        if has_gpu:
            fix = ("install a CUDA build of torch: pip install torch --index-url https://download.pytorch.org/whl/cu128"
                   if not build else "torch cannot reach the GPU: check the driver (nvidia-smi) and "
                   "CUDA_VISIBLE_DEVICES, or install torch built for the driver's CUDA")
            out.append(Check("cuda", "fail", text, fix))
        else:
            out.append(Check("cuda", "info", text))
        out += [Check("bf16", "info", "no GPU: lfw trains in fp32 on the CPU"),
                Check("qlora", "info", "no GPU: 4-bit QLoRA needs a CUDA GPU; lfw uses LoRA on the CPU"),
                Check("liger", "info", "no GPU: the liger kernel needs a CUDA GPU (triton); lfw leaves it off")]
        return out
    name, cap = t.get("gpu_name"), t.get("capability")
    b = found.get("bf16")
    if b is None:
        out.append(Check("bf16", "fail", f"not checked: {stopped or 'no answer'}", "run lfw doctor again; if it "
                         "repeats, the GPU or driver is broken (nvidia-smi -q)"))
    elif b["ok"]:
        out.append(Check("bf16", "ok", f"{b['detail']} ({name}, compute {cap})"))
    elif not b.get("supported", True):
        out.append(Check("bf16", "warn", f"{name} (compute {cap}) has no bf16",
                         "lfw trains in fp16 on this GPU (precision: auto); bf16 needs compute 8.0+ (A100, RTX 30xx, "
                         "L4, H100)"))
    else:
        out.append(Check("bf16", "fail", b["detail"], "check the driver and torch's CUDA build (lfw doctor's cuda line)"))
    out.append(_probe_check("qlora", found.get("qlora"), stopped,
                            "bitsandbytes may have crashed the process: pip install -U bitsandbytes",
                            "pip install bitsandbytes (only needed when a model does not fit in bf16; lfw then uses "
                            "4-bit QLoRA)",
                            "pip install -U bitsandbytes matching torch's CUDA; until then set method: lora in the "
                            "recipe"))
    out.append(_probe_check("liger", found.get("liger"), stopped,
                            "set llamafactory: {enable_liger_kernel: false} in the recipe",
                            "pip install liger-kernel: lfw turns it on when a plan needs the memory it saves",
                            "lfw may turn it on when memory is short: set llamafactory: {enable_liger_kernel: false} "
                            "in the recipe, or pip install -U liger-kernel triton"))
    return out


def _probe_check(name: str, result: dict | None, stopped: str | None, if_silent: str, if_missing: str,
                 if_broken: str) -> Check:
    """One line for an optional feature the GPU probe tried: ok, not installed (warn), or broken (fail)."""
    if result is None:
        return Check(name, "fail", f"not checked: {stopped or 'no answer'}", if_silent)
    if result["ok"]:
        return Check(name, "ok", result["detail"])
    if result.get("missing"):
        return Check(name, "warn", result["detail"], if_missing)
    return Check(name, "fail", result["detail"], if_broken)


def check_plan() -> Check:
    """What the planner would choose here for a Qwen2.5-7B identity fine-tune (its config only, no download)."""
    import tempfile
    from pathlib import Path

    from wrapper.device import Device
    from wrapper.plan import make_plan
    from wrapper.recipe import parse_recipe
    from wrapper.synthetic import SIZES

    dev = Device.detect()
    if dev.kind != "cuda":
        return Check("plan", "info", f"{dev}: lfw trains LoRA in fp32 on the CPU (a 0.5B model: minutes per epoch)")
    config = {"model_type": "qwen2", "vocab_size": 151936, **SIZES["7b"]}
    with tempfile.TemporaryDirectory(prefix="lfw-doctor-") as tmp:
        mdir = Path(tmp) / "Qwen2.5-7B"
        mdir.mkdir()
        (mdir / "config.json").write_text(json.dumps(config))
        recipe = parse_recipe({"name": "doctor", "model": str(mdir), "identity": {"name": "A", "author": "B"}})
        try:
            plan = make_plan(recipe, Path(tmp) / "recipe.yaml", Path(tmp) / "out", dev)
        except Exception as e:  # noqa: BLE001 - the RecipeError says what would fit
            return Check("plan", "warn", f"Qwen2.5-7B: {e}")
    m = plan.memory or {}
    return Check("plan", "ok", f"Qwen2.5-7B identity fine-tune here: {plan.method}, batch {plan.batch_size} x "
                 f"{plan.gradient_accumulation}, gradient checkpointing {'on' if plan.gradient_checkpointing else 'off'}, "
                 f"liger {'on' if plan.liger_kernel else 'off'}, predicted peak {m.get('total', 0) / GiB:.1f} GiB")


def run_checks(gpu_probe: bool = True) -> list[Check]:
    """gpu, cuda, versions, bf16, qlora, liger, plan, disk: in that order."""
    checks = [check_gpu()]
    has_gpu = "no NVIDIA GPU" not in checks[0].detail
    probed = gpu_checks(has_gpu) if gpu_probe else []
    checks += probed[:1]
    checks.append(check_versions())
    checks += probed[1:]
    for fn in (check_plan, check_disk):
        try:
            checks.append(fn())
        except Exception as e:  # noqa: BLE001 - a broken check is a line, not a crash
            checks.append(Check(fn.__name__.removeprefix("check_"), "warn", f"could not check: {_one_line(e)}"))
    return checks


if __name__ == "__main__":
    if sys.argv[1:] == ["--probe"]:
        probe()
    else:
        for c in run_checks():
            print(c.line())
