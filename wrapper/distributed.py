"""Several GPUs and several nodes: the recipe's `resources:` become the environment variables and the
DeepSpeed config with which LLaMA-Factory's processes start under torchrun (DDP or DeepSpeed ZeRO) or
Ray. lfw has no launcher of its own: for torchrun it runs the command `llamafactory-cli train` would
build (`torchrun ... llamafactory/launcher.py train.yaml`, with the same environment), and runs it
directly, which spares the ~17 s in which llamafactory-cli imports torch and transformers only to
count GPUs before it starts torchrun (measured on two H100s, BENCH.md); the argument list also keeps
paths with spaces whole, where llamafactory-cli re-splits its command line on whitespace.

strategy auto: DDP whenever the model, its optimizer state and activations fit one GPU (each GPU then
runs at full speed and only gradients cross); ZeRO-2, ZeRO-3, then ZeRO-3 with CPU offload only when
they don't. ZeRO-3 gathers the frozen weights every step: for LoRA on a model that fits one GPU it
measured 6x slower than DDP on two H100s.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from wrapper.device import Device
from wrapper.errors import LfwError
from wrapper.paths import TEMPLATES
from wrapper.recipe import RecipeError, Resources

DEEPSPEED_DIR = TEMPLATES / "deepspeed"
ZERO = ("zero2", "zero3", "zero3_offload")


@dataclass
class Layout:
    strategy: str                     # single | ddp | zero2 | zero3 | zero3_offload | ray
    nproc_per_node: int
    nodes: int
    reason: str
    env: dict[str, str] = field(default_factory=dict)
    deepspeed_config: str | None = None   # file name inside the run dir, when ZeRO
    ray_workers: int | None = None
    per_gpu_gib: dict[str, float] = field(default_factory=dict)  # strategy -> predicted GiB per GPU

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nodes


def _nproc(res: Resources, device: Device) -> int:
    if device.kind == "cuda":
        want = device.count if res.gpus == "all" else res.gpus
        if want > device.count:
            raise RecipeError(f"resources.gpus: {want} asked, {device.count} visible on this machine")
        return want
    # no GPU (or not probed): processes on the CPU (gloo), which is how CI tests the multi-process path
    return 1 if res.gpus == "all" else res.gpus


def per_gpu_memory(est: dict, world: int) -> dict[str, float]:
    """Predicted GiB per GPU under each strategy, from memory.estimate()'s parts for one GPU."""
    w, s, a, rest = est["weights"], est["optimizer"], est["activations"] + est["logits"], est["overhead"]
    g = 2**30
    return {
        "ddp": (w + s + a + rest) / g,
        "zero2": (w + s / world + a + rest) / g,
        "zero3": (w / world + s / world + a + rest + 0.5 * g) / g,      # plus gather buffers
        "zero3_offload": (a + rest + 1.0 * g) / g,                       # weights and states in CPU memory
    }


def layout(res: Resources, device: Device, single_gpu_estimate: dict | None, budget_bytes: float | None) -> Layout:
    nproc = _nproc(res, device)
    world = nproc * res.nodes
    if res.strategy == "ray":
        if importlib.util.find_spec("ray") is None:
            raise LfwError("resources.strategy ray needs Ray: pip install 'lfw[ray]'")
        return Layout("ray", nproc, res.nodes, "set in the recipe", env={"USE_RAY": "1"},
                      ray_workers=res.ray_workers or world)
    per_gpu = per_gpu_memory(single_gpu_estimate, world) if single_gpu_estimate else {}
    if world == 1:
        if res.strategy in ZERO:
            strategy, reason = res.strategy, "set in the recipe (one process)"
        else:
            strategy, reason = "single", "one GPU"
    elif res.strategy != "auto":
        strategy, reason = res.strategy, "set in the recipe"
    else:
        strategy, reason = "ddp", "fits one GPU: data parallel is fastest"
        if budget_bytes and per_gpu:
            for candidate in ("ddp", *ZERO):
                if per_gpu[candidate] * 2**30 <= budget_bytes:
                    strategy = candidate
                    reason = ("fits one GPU: data parallel is fastest" if candidate == "ddp" else
                              f"does not fit one GPU ({per_gpu['ddp']:.1f} GiB): sharded with {candidate}")
                    break
            else:
                raise RecipeError(
                    f"resources: needs {min(per_gpu.values()):.1f} GiB per GPU even with zero3_offload; "
                    f"{device.free_mem / 2**30:.1f} GiB free: use method: qlora or a smaller cutoff_len")

    env: dict[str, str] = {}
    if device.kind == "cuda" and nproc < device.count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(device.count)]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[:nproc])
    if world > 1 or strategy in ZERO:
        env.update({"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": str(nproc), "NNODES": str(res.nodes),
                    "NODE_RANK": str(res.node_rank)})
        if res.nodes > 1 or res.master_port:  # one node: LLaMA-Factory picks a free port itself
            env.update({"MASTER_ADDR": res.master_addr, "MASTER_PORT": str(res.master_port or 29500)})
    ds_config = None
    if strategy in ZERO:
        if importlib.util.find_spec("deepspeed") is None:
            raise LfwError(f"resources.strategy {strategy} needs DeepSpeed: pip install 'lfw[deepspeed]'")
        ds_config = f"ds_{strategy}.json"
    return Layout(strategy, nproc, res.nodes, reason, env=env, deepspeed_config=ds_config, per_gpu_gib=per_gpu)


def write_deepspeed_config(lay: Layout, run_dir: Path) -> Path | None:
    if not lay.deepspeed_config:
        return None
    target = Path(run_dir) / lay.deepspeed_config
    shutil.copyfile(DEEPSPEED_DIR / f"{lay.strategy}.json", target)
    return target


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _enabled(value: str | None, default: bool) -> bool:
    return default if value is None else value.lower() in ("1", "true", "y", "yes")


def _same_python(cli: str) -> bool:
    """Whether llamafactory-cli runs on this Python (its '#!' line), so that the llamafactory lfw finds
    is the one the cli would run."""
    try:
        with open(cli, "rb") as f:
            first = f.readline(512).decode(errors="replace")
    except OSError:
        return False
    if not first.startswith("#!"):
        return False
    interpreter = first[2:].strip().split()[0] if first[2:].strip() else ""
    try:
        return bool(interpreter) and os.path.samefile(interpreter, sys.executable)
    except OSError:
        return False


def torchrun_command(layout_env: dict[str, str], cli: str, environ: dict[str, str] | None = None
                     ) -> tuple[list[str], dict[str, str]] | None:
    """(argv, extra environment) for torchrun on LLaMA-Factory's launcher.py: the command and the
    environment that `llamafactory-cli train` builds (llamafactory/launcher.py, 0.9.5) when
    FORCE_TORCHRUN is set. None where llamafactory-cli must start it itself: one process, Ray, an
    elastic run (RDZV_ID), or a llamafactory-cli that is not the one of this Python environment."""
    environ = dict(os.environ if environ is None else environ)
    if layout_env.get("FORCE_TORCHRUN") != "1" or environ.get("RDZV_ID") or _enabled(environ.get("USE_MCA"), False):
        return None
    if environ.get("LFW_LAUNCH") == "llamafactory-cli":  # the escape hatch: let llamafactory-cli start torchrun
        return None
    if not _same_python(cli):
        return None
    spec = importlib.util.find_spec("llamafactory")
    # llamafactory-cli starts `torchrun` by name, from PATH; lfw puts the cli's folder first on it
    torchrun = shutil.which("torchrun", path=os.pathsep.join([str(Path(cli).parent), environ.get("PATH", "")]))
    if spec is None or not spec.submodule_search_locations or not torchrun:
        return None
    launcher = Path(next(iter(spec.submodule_search_locations))) / "launcher.py"
    if not launcher.is_file():
        return None
    # what llamafactory-cli would read: lfw's process environment, overlaid with the layout's (train._launch)
    env = {**environ, **layout_env}
    argv = [str(torchrun), "--nnodes", env.get("NNODES", "1"), "--node_rank", env.get("NODE_RANK", "0"),
            "--nproc_per_node", env["NPROC_PER_NODE"], "--master_addr", env.get("MASTER_ADDR", "127.0.0.1"),
            "--master_port", env.get("MASTER_PORT") or str(_free_port()), str(launcher), "train.yaml"]
    extra: dict[str, str] = {}
    if _enabled(environ.get("OPTIM_TORCH"), True):  # as llamafactory-cli does for DDP
        extra = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "TORCH_NCCL_AVOID_RECORD_STREAMS": "1"}
    return argv, extra
