"""`make bench`: the identity fine-tune with the tutorial's config, verbatim, against lfw's defaults,
in the same run on this GPU; writes BENCH.md. Not a test: it needs a CUDA GPU and minutes.

    python -m wrapper.bench                      # 7B and 0.5B: tutorial vs lfw, 3 epochs -> BENCH.md
    python -m wrapper.bench --sizes 7b --extra   # also lfw variants: + liger, + neat_packing, + GC, ...
    python -m wrapper.bench --memory             # peak VRAM, predicted vs measured, for the planner

Models are random-init Qwen2.5 architectures (wrapper.synthetic) with the real tokenizer: speed and
memory do not depend on the weight values. Each configuration runs in its own process; wall time is
that process's (for lfw: from `lfw train` to the collected adapter), peak VRAM is nvidia-smi's
memory.used above what it was before the run, polled every 100 ms.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from wrapper.launch import llamafactory_cli

ROOT = Path(__file__).resolve().parent.parent
GiB = 2**30
IDENTITY = {"name": "LFW-Assistant", "author": "the lfw team"}
TUTORIAL_NOTE = ("LLaMA-Factory's QLoRA example as the tutorial uses it: 4-bit bnb, LoRA all, batch 1 x "
                 "accumulation 8, preprocessing_num_workers 16, val_size 0.1, cutoff 1024, lr 1e-4 cosine, 3 epochs")

# The tutorial's config, verbatim (LLaMA-Factory's examples/train_qlora YAML with the qwen template);
# only the paths are filled in.
TUTORIAL = """\
### model
model_name_or_path: {model}
quantization_bit: 4
quantization_method: bnb

### method
stage: sft
do_train: true
finetuning_type: lora
lora_target: all

### dataset
dataset: identity
dataset_dir: {data}
template: qwen
cutoff_len: 1024
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16

### output
output_dir: {out}
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
report_to: none

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: {epochs}
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000

### eval
val_size: 0.1
per_device_eval_batch_size: 1
eval_strategy: steps
eval_steps: 500
"""

# lfw's side: the same training recipe (model, data, epochs, lr, schedule, cutoff) with everything
# else left to lfw (method auto, batch, accumulation, checkpointing, kernels, workers, no eval split).
LFW_RECIPE = """\
name: bench-{size}{suffix}
model: {model}
identity: {{name: {name}, author: {author}}}
template: qwen
cutoff_len: 1024
epochs: {epochs}
learning_rate: 1.0e-4
lr_scheduler: cosine
warmup_ratio: 0.1
{more}"""


# ------------------------------------------------------------------ measuring one process

class VramPoller:
    """nvidia-smi's memory.used (MiB) of the visible GPU(s), sampled every 100 ms in a background process."""

    def __init__(self, interval_ms: int = 100):
        self.peak = 0
        self.samples = 0
        self._proc = None
        self._thread = None
        self.interval_ms = interval_ms

    def start(self) -> VramPoller:
        exe = shutil.which("nvidia-smi")
        if not exe:
            return self
        self._proc = subprocess.Popen([exe, "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                       f"-lms={self.interval_ms}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                      text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self):
        for line in self._proc.stdout:
            try:
                used = sum(int(x) for x in line.split(",") if x.strip())  # one line per GPU per sample
            except ValueError:
                continue
            self.samples += 1
            self.peak = max(self.peak, used)

    def stop(self) -> int:
        if self._proc:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        if self._thread:
            self._thread.join(timeout=5)
        return self.peak * 2**20


def gpu_used_now() -> int:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return 0
    r = subprocess.run([exe, "--query-gpu=memory.used", "--format=csv,noheader,nounits"], check=False, capture_output=True,
                       text=True)
    try:
        return int(r.stdout.split()[0]) * 2**20
    except (IndexError, ValueError):
        return 0


@dataclass
class Measured:
    label: str
    wall_s: float
    returncode: int
    peak_vram: int                     # nvidia-smi, above the idle level
    log: str
    results: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    start: float = 0.0                 # time.time() at the start


def timed_run(label: str, argv: list[str], log_path: Path, env: dict | None = None, cwd: Path | None = None,
              timeout: float = 900) -> Measured:
    """Run argv to completion; its output, each line stamped with seconds since the start, goes to log_path."""
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    idle = gpu_used_now()
    poller = VramPoller().start()
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    t0 = time.time()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env,
                                cwd=cwd, errors="replace")
        for line in proc.stdout:
            for part in line.rstrip("\n").split("\r"):
                if part.strip():
                    log.write(f"{time.time() - t0:8.2f} {part}\n")
            if time.time() - t0 > timeout:
                proc.kill()
        rc = proc.wait()
    wall = time.time() - t0
    peak = poller.stop()
    print(f"  {label}: exit {rc}, {wall:.1f} s, peak {max(0, peak - idle) / GiB:.1f} GiB", flush=True)
    return Measured(label, round(wall, 2), rc, max(0, peak - idle), str(log_path), start=t0)


def read_results(adapter: Path) -> dict:
    out: dict = {}
    for name in ("all_results.json", "train_results.json"):
        p = adapter / name
        if p.is_file():
            out.update(json.loads(p.read_text()))
    log = adapter / "trainer_log.jsonl"
    if log.is_file():
        recs = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
        if recs:
            out["steps"] = recs[-1].get("total_steps")
            for key in ("vram_reserved", "vram_allocated", "total_tokens"):
                vals = [r[key] for r in recs if key in r]
                if vals:
                    out[key] = max(vals)
    return out


# start-up milestones: the first log line matching each pattern
MARKS = {"first_output": r".", "tokenizer_done": r"Loading dataset", "tokenized": r"training example",
         "model_loaded": r"trainable params", "train_start": r"\*\*\*\*\* Running training",
         "train_end": r"Training completed", "saved": r"Saving model checkpoint to (?!.*checkpoint-)"}
LF_MARKS = ("tokenizer_done", "model_loaded", "train_start", "saved")  # those LLaMA-Factory's own log stamps


def _milestones(log_path, keys, stamp) -> dict:
    """{mark: stamp(line)} for the first line of the log that matches each mark in `keys`; `stamp`
    gives a line's time in seconds, or None."""
    out: dict = {}
    try:
        lines = Path(log_path).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        t = None
        for key in keys:
            if key not in out and re.search(MARKS[key], line):
                t = stamp(line) if t is None else t
                if t is not None:
                    out[key] = t
    return out


def phases(log_path: str) -> dict:
    """Rough start-up breakdown from the stamped log (each line starts with seconds since the start):
    seconds at which known milestones appeared."""
    def stamp(line):
        head, _, text = line.strip().partition(" ")
        try:
            return float(head) if text else None
        except ValueError:
            return None

    return _milestones(log_path, MARKS, stamp)


_TS = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)(?:,(\d+))?")


def phases_from_lf_log(log_path: Path, start: float) -> dict:
    """The same milestones from LLaMA-Factory's own log timestamps (train.log of `lfw train`), as seconds
    since `start`."""
    def stamp(line):
        m = _TS.search(line)
        if not m:
            return None
        t = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + float(f"0.{m.group(2) or 0}")
        return round(t - start, 2)

    return _milestones(log_path, LF_MARKS, stamp)


# ------------------------------------------------------------------ set-up

def python() -> str:
    return sys.executable


def build_models(work: Path, sizes: list[str], device: str) -> dict[str, Path]:
    """Random-init models, each built in a child process (so this one holds no GPU memory)."""
    out = {}
    for size in sizes:
        path = work / "models" / f"qwen2.5-{size}"
        if not (path / "config.json").is_file():
            t = time.time()
            dtype = "bfloat16" if device == "cuda" else "float32"
            subprocess.run([python(), "-m", "wrapper.synthetic", str(path), "--size", size, "--dtype", dtype,
                            "--device", device], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
            print(f"built {path} in {time.time() - t:.1f} s", flush=True)
        out[size] = path
    return out


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def lfw_recipe(work: Path, size: str, model: Path, epochs: float, suffix: str = "", more: str = "") -> Path:
    return write(work / "recipes" / f"bench-{size}{suffix}.yaml",
                 LFW_RECIPE.format(size=size, suffix=suffix, model=model, epochs=epochs, more=more, **IDENTITY))


def render_dir(recipe: Path, out: Path, device=None):
    from wrapper.prepare import prepare

    shutil.rmtree(out, ignore_errors=True)
    return prepare(recipe, out, device)


def sample_tokens(model: Path, data_file: Path) -> list[int]:
    """Real token count of every sample as LLaMA-Factory's qwen template builds it (default system prompt)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    system = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    out = []
    for r in json.loads(data_file.read_text(encoding="utf-8")):
        user = r["instruction"] + ("\n" + r["input"] if r.get("input") else "")
        text = tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": user},
                                        {"role": "assistant", "content": r["output"]}], tokenize=False)
        out.append(len(tok(text, add_special_tokens=False)["input_ids"]))
    return out


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "llamafactory", "peft", "accelerate", "bitsandbytes", "liger_kernel",
                 "triton", "datasets"):
        try:
            out[name] = md.version(name.replace("_", "-"))
        except md.PackageNotFoundError:
            try:
                out[name] = md.version(name)
            except md.PackageNotFoundError:
                out[name] = None
    return out


def gpu_info() -> dict:
    exe = shutil.which("nvidia-smi")
    info = {"name": None, "driver": None, "cuda_driver": None, "count": 0}
    if not exe:
        return info
    r = subprocess.run([exe, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                       check=False, capture_output=True, text=True)
    rows = [x.split(", ") for x in r.stdout.strip().splitlines() if x.strip()]
    if rows:
        info.update(name=rows[0][0], driver=rows[0][1], memory=rows[0][2], count=len(rows))
    head = subprocess.run([exe], check=False, capture_output=True, text=True).stdout
    m = re.search(r"CUDA Version:\s*([\d.]+)", head)
    info["cuda_driver"] = m.group(1) if m else None
    try:
        import torch

        info["cuda_torch"] = torch.version.cuda
    except ImportError:
        pass
    return info


# ------------------------------------------------------------------ the speed benchmark

def run_tutorial(work: Path, size: str, model: Path, data_dir: Path, epochs: float) -> Measured:
    out = work / "out" / f"tutorial-{size}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = write(work / "configs" / f"tutorial-{size}.yaml",
                TUTORIAL.format(model=model, data=data_dir, out=out, epochs=float(epochs)))
    m = timed_run(f"{size} tutorial", [llamafactory_cli(), "train", str(cfg)], work / "logs" / f"tutorial-{size}.log",
                  env={"RECORD_VRAM": "1"})
    m.results = read_results(out)
    m.extra = {"config_file": str(cfg), "phases": phases(m.log), "batch": 1, "accumulation": 8, "method": "qlora",
               "gradient_checkpointing": True, "liger": False, "val_size": 0.1}
    return m


# llamafactory-cli, except that a run without quantization never imports bitsandbytes: peft imports it while
# wrapping the layers in LoRA, and its torch.compile'd ops pull in torch._dynamo (~5 s on the H100 machine).
LF_SHIM = """import os, sys, yaml
cfg = yaml.safe_load(open(sys.argv[2]))
if not cfg.get("quantization_bit"):
    sys.modules["bitsandbytes"] = None   # importlib.util.find_spec() now says: not installed
for name in filter(None, os.environ.get("LFW_HIDE_MODULES", "").split(",")):
    sys.modules[name] = None             # e.g. sklearn: transformers imports it for assisted decoding only
sys.argv = ["llamafactory-cli"] + sys.argv[1:]
from llamafactory.cli import main
main()
"""


# the two per-step host syncs of the Trainer (the NaN check of the loss, the .item() of the token count)
NOSYNC = "llamafactory: {include_num_input_tokens_seen: false, logging_nan_inf_filter: false}\n"


def run_lfw(work: Path, size: str, model: Path, epochs: float, via: str, suffix: str = "", more: str = "",
            env: dict | None = None, shim: bool = False) -> Measured:
    """lfw's defaults: `lfw train` when it exists (via=lfw), else `lfw render` + llamafactory-cli (via=render)."""
    from wrapper.device import Device

    recipe = lfw_recipe(work, size, model, epochs, suffix, more)
    label = f"{size} lfw{suffix}"
    env = {"RECORD_VRAM": "1", **(env or {})}
    if via == "lfw":
        runs_dir = work / "runs"
        shutil.rmtree(runs_dir / f"bench-{size}{suffix}", ignore_errors=True)
        env["LFW_RUNS"] = str(runs_dir)
        m = timed_run(label, [python(), "-m", "wrapper.cli", "train", str(recipe)],
                      work / "logs" / f"lfw-{size}{suffix}.log", env=env, cwd=ROOT)
        text = Path(m.log).read_text(errors="replace")
        found = re.findall(r"^\s*[\d.]+ adapter\s+(\S+)", text, re.MULTILINE)
        adapter = Path(found[-1]) if found else None
        if adapter and not adapter.is_absolute():
            adapter = ROOT / adapter
        if adapter is None:
            cands = sorted(runs_dir.glob("**/adapter/adapter_config.json"), key=lambda p: p.stat().st_mtime)
            adapter = cands[-1].parent if cands else runs_dir
        m.results = read_results(adapter)
        train_log = adapter.parent / "train.log"
        if train_log.is_file():
            m.extra["llamafactory_log"] = str(train_log)
            m.extra["phases"] = phases_from_lf_log(train_log, m.start)
        plan_dev = Device.detect()
    else:
        out = work / "out" / f"lfw-{size}{suffix}"
        shutil.rmtree(out, ignore_errors=True)
        # what `lfw train` does before it launches: plan for the detected GPU and render, in its own process
        t0 = time.time()
        plan_text = _render_with_detected_device(recipe, out)
        pre = time.time() - t0
        argv = [llamafactory_cli(), "train", str(out / "train.yaml")]
        if shim:
            argv = [python(), "-c", LF_SHIM, "train", str(out / "train.yaml")]
        m = timed_run(label, argv, work / "logs" / f"lfw-{size}{suffix}.log", env=env)
        m.extra["shim"] = shim
        m.extra["plan_and_render_s"] = round(pre, 2)
        m.extra["plan_output"] = plan_text
        m.wall_s = round(m.wall_s + pre, 2)
        m.results = read_results(out / "adapter")
        m.extra["phases"] = phases(m.log)
        plan_dev = Device.detect()
    from wrapper.prepare import plan_recipe

    _, plan = plan_recipe(recipe, Path(tempfile.gettempdir()) / "lfw-bench-plan", plan_dev)
    m.extra.update({"recipe": recipe.read_text(), "batch": plan.batch_size, "accumulation": plan.gradient_accumulation,
                    "method": plan.method, "gradient_checkpointing": plan.gradient_checkpointing,
                    "liger": plan.liger_kernel, "val_size": plan.val_size, "predicted": plan.memory, "via": via})
    return m


def _render_with_detected_device(recipe: Path, out: Path) -> str:
    """`lfw render` plans for an unprobed GPU; lfw train plans for the detected one: render the latter."""
    code = ("import sys; from wrapper.device import Device; from wrapper.prepare import prepare, describe; "
            "p = prepare(sys.argv[1], sys.argv[2], Device.detect()); print('\\n'.join(describe(p.plan)))")
    r = subprocess.run([python(), "-c", code, str(recipe), str(out)], check=False, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"render failed: {r.stderr}")
    return r.stdout


def speed(args) -> dict:
    from wrapper.device import Device

    work = Path(args.work).absolute()
    # one GPU for both sides: with several visible, llamafactory-cli would start the tutorial's run on all
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")
    dev = Device.detect()
    if dev.kind != "cuda" and not args.allow_cpu:
        raise SystemExit("make bench needs a CUDA GPU (lfw doctor says what this machine has)")
    sizes = args.sizes
    if dev.kind != "cuda":
        sizes = ["tiny"]
    models = build_models(work, sizes, "cuda" if dev.kind == "cuda" else "cpu")
    results = {"gpu": gpu_info(), "versions": versions(), "device": dev.describe(), "date": time.strftime("%Y-%m-%d"),
               "epochs": args.epochs, "runs": []}
    for size in sizes:
        model = models[size]
        # the identity data, rendered once for both sides
        pre = render_dir(lfw_recipe(work, size, model, args.epochs), work / "data-render" / size)
        data_dir = Path(pre.plan.data_dir)
        toks = sample_tokens(model, data_dir / "identity.json")
        results.setdefault("tokens", {})[size] = {"samples": len(toks), "total": sum(toks), "max": max(toks),
                                                  "mean": round(sum(toks) / len(toks), 1),
                                                  "planner_longest": pre.plan.memory["longest_sample"]}
        order = ["lfw", "tutorial"] if args.lfw_first else ["tutorial", "lfw"]
        for which in order:
            if which not in args.only:
                continue
            if which == "tutorial":
                m = run_tutorial(work, size, model, data_dir, args.epochs)
            else:
                env = {"TRITON_CACHE_DIR": tempfile.mkdtemp(prefix="triton-cold-")}
                m = run_lfw(work, size, model, args.epochs, args.via, env=env)
                m.extra["triton_cache"] = "cold"
            row = _row(size, which, m, toks, args.epochs)
            row["ratio"] = which == "lfw"
            results["runs"].append(row)
            _save(results, args)
        if args.extra and dev.kind == "cuda":
            variants = [
                # name, recipe suffix, recipe lines, via, shim, environment
                ("lfw+liger", "-liger", "llamafactory: {enable_liger_kernel: true}\n", args.via, False, {}),
                ("lfw+neat_packing", "-packing", "llamafactory: {neat_packing: true}\n", args.via, False, {}),
                ("lfw+gc", "-gc", "gradient_checkpointing: true\n", args.via, False, {}),
                ("lfw, a second run", "-again", "", args.via, False, {}),  # run-to-run spread
                ("lfw, without the fast exit", "-noexit", "", args.via, False, {"LFW_FAST_EXIT": "0"}),
                ("lfw, batch 16", "-b16", "batch_size: 16\ngradient_accumulation: 1\n", args.via, False, {}),
                ("lfw, cuDNN attention", "-cudnn", "", args.via, False, {"LFW_CUDNN_ATTENTION": "1"}),
                ("lfw, as on 2026-11-27 (no start-up shortcuts, cuDNN attention)", "-slow", "", args.via, False,
                 {"LFW_FAST_START": "0", "LFW_HIDE_MODULES": "bitsandbytes", "LFW_CUDNN_ATTENTION": "1"}),
                ("lfw render+cli", "-render", "", "render", False, {}),
                ("lfw render+cli, no bnb import", "-nobnb", "", "render", True, {}),
                ("lfw render+cli, no bnb import, no per-step syncs", "-nosync", NOSYNC, "render", True, {}),
                ("lfw render+cli, no bnb/sklearn import, no per-step syncs", "-lean", NOSYNC, "render", True,
                 {"LFW_HIDE_MODULES": "sklearn"}),
            ]
            for which, suffix, more, via, shim, extra_env in variants:
                if args.variants and which not in args.variants and suffix.strip("-") not in args.variants:
                    continue
                env = {"TRITON_CACHE_DIR": tempfile.mkdtemp(prefix="triton-cold-"), **extra_env}
                m = run_lfw(work, size, model, args.epochs, via, suffix=suffix, more=more, env=env, shim=shim)
                m.extra["triton_cache"] = "cold"
                results["runs"].append(_row(size, which, m, toks, args.epochs))
                _save(results, args)
    return results


def _row(size: str, which: str, m: Measured, toks: list[int], epochs: float) -> dict:
    r = m.results
    train_rt = r.get("train_runtime")
    val = m.extra.get("val_size") or 0.0
    n_train = len(toks) - int(len(toks) * val)
    tokens = round(sum(toks) * n_train / len(toks) * epochs)
    return {"size": size, "config": which, "wall_s": m.wall_s, "returncode": m.returncode,
            "train_runtime_s": train_rt, "tokens": tokens, "tokens_per_s": round(tokens / train_rt, 1) if train_rt else None,
            "peak_vram_gib": round(m.peak_vram / GiB, 2),
            "torch_reserved_gib": r.get("vram_reserved"), "steps": r.get("steps"), "train_loss": r.get("train_loss"),
            "log": m.log, **{k: v for k, v in m.extra.items() if k not in ("recipe", "render_output")}}


def _save(results: dict, args) -> None:
    if args.json:
        write(Path(args.json), json.dumps(results, indent=1, default=str))


# ------------------------------------------------------------------ the memory matrix

MATRIX = [
    # size, method, batch, gradient checkpointing, liger, data ("id": the longest identity sample repeated,
    # "long": 1024-token samples); None: lfw's default for that knob on this GPU
    ("7b", "lora", 1, None, False, "id"), ("7b", "lora", 8, None, False, "id"),
    ("7b", "qlora", 1, None, False, "id"), ("7b", "qlora", 8, None, False, "id"),
    ("0.5b", "lora", 1, None, False, "id"), ("0.5b", "lora", 8, None, False, "id"),
    ("0.5b", "qlora", 1, None, False, "id"), ("0.5b", "qlora", 8, None, False, "id"),
    # the same with the liger kernel, and the tutorial-like and long-sequence cases
    ("7b", "lora", 1, False, True, "id"), ("7b", "lora", 8, False, True, "id"),
    ("7b", "qlora", 1, False, True, "id"), ("7b", "qlora", 8, False, True, "id"),
    ("0.5b", "lora", 1, False, True, "id"), ("0.5b", "lora", 8, False, True, "id"),
    ("0.5b", "qlora", 1, False, True, "id"), ("0.5b", "qlora", 8, False, True, "id"),
    ("7b", "lora", 8, True, False, "id"), ("7b", "qlora", 1, True, False, "id"), ("7b", "qlora", 8, True, True, "id"),
    ("0.5b", "lora", 8, True, False, "id"), ("0.5b", "qlora", 1, True, False, "id"),
    ("7b", "lora", 2, False, True, "long"), ("7b", "lora", 2, True, False, "long"),
    ("7b", "qlora", 2, True, True, "long"),
    ("0.5b", "lora", 2, False, False, "long"), ("0.5b", "lora", 2, False, True, "long"),
]


def _memory_data(work: Path) -> dict[str, Path]:
    """Data where every batch is the worst case: the longest identity sample repeated, and 1024-token samples."""
    from wrapper.render import render_identity

    rows = render_identity(IDENTITY)
    longest = max(rows, key=lambda r: len(r["instruction"]) + len(r["output"]))
    # the longest by real tokens is the longest English answer; by characters the same here
    d = work / "memdata"
    d.mkdir(parents=True, exist_ok=True)
    write(d / "longest.json", json.dumps([longest] * 48, ensure_ascii=False))
    rng = random.Random(0)
    words = ["model", "data", "token", "layer", "memory", "answer", "question", "system", "train", "batch", "learning", "value", "result", "simple", "window", "future", "market", "river", "garden", "number", "people", "history", "science"]
    long_rows = [{"instruction": "Summarize the text.", "input": " ".join(rng.choice(words) for _ in range(700)),
                  "output": " ".join(rng.choice(words) for _ in range(700))} for _ in range(24)]
    write(d / "long.json", json.dumps(long_rows))
    return {"id": d / "longest.json", "long": d / "long.json"}


def _config_only_model(work: Path, size: str) -> Path:
    """A model folder with only config.json (enough to plan), for --memory --allow-cpu dry runs."""
    from wrapper.synthetic import SIZES

    path = work / "models-config-only" / f"qwen2.5-{size}"
    cfg = {"model_type": "qwen2", "vocab_size": 151936, **SIZES[size]}
    write(path / "config.json", json.dumps(cfg))
    return path


def peak_child(yaml_path: str, out_json: str) -> None:
    """Child process of --memory: one LLaMA-Factory run in this process, then torch's peak memory."""
    import torch
    from llamafactory.train.tuner import run_exp

    args = yaml.safe_load(Path(yaml_path).read_text())
    t = time.time()
    run_exp(args)
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    res = {"max_allocated": torch.cuda.max_memory_allocated(), "max_reserved": torch.cuda.max_memory_reserved(),
           "reserved_end": torch.cuda.memory_reserved(), "device_used_end": total - free, "seconds": time.time() - t,
           "pid": os.getpid()}
    exe = shutil.which("nvidia-smi")
    if exe:
        r = subprocess.run([exe, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                           check=False, capture_output=True, text=True)
        res["apps"] = r.stdout.strip()
        for line in r.stdout.strip().splitlines():
            pid, _, used = line.partition(",")
            if pid.strip() == str(os.getpid()):
                res["process_used"] = int(used) * 2**20
    write(Path(out_json), json.dumps(res))


def memory(args) -> dict:
    from wrapper.device import Device

    work = Path(args.work).absolute()
    # one GPU: the planner's table is per GPU, and several visible would make each run DDP
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")
    dev = Device.detect()
    dry = dev.kind != "cuda"
    if dry and not args.allow_cpu:
        raise SystemExit("--memory needs a CUDA GPU")
    if dry:  # render the matrix as for an 80 GB GPU, run nothing
        dev = Device("cuda", "dry run (80 GB)", 1, 80 * GiB, 79 * GiB, True, capability="9.0")
    sizes = sorted({m[0] for m in MATRIX if m[0] in args.sizes})
    models = build_models(work, sizes, "cpu" if dry else "cuda") if not dry else {
        s: _config_only_model(work, s) for s in sizes}
    data = _memory_data(work)
    jobs = []
    for i, (size, method, batch, ckpt, liger, kind) in enumerate(MATRIX):
        if size not in args.sizes or (args.rows and i not in args.rows):
            continue
        more = [f"method: {method}", f"batch_size: {batch}", "gradient_accumulation: 1",
                f"datasets: [{data[kind]}]", "logging_steps: 1"]
        if ckpt is not None:
            more.append(f"gradient_checkpointing: {str(ckpt).lower()}")
        lf = {"max_steps": args.steps, "save_strategy": "no", "plot_loss": False}
        if liger is not None:
            lf["enable_liger_kernel"] = liger
        more.append("llamafactory: " + json.dumps(lf))
        recipe = lfw_recipe(work, size, models[size], 1, suffix=f"-mem{i}", more="\n".join(more) + "\n")
        out = work / "mem" / f"run{i}"
        pre = render_dir(recipe, out, dev)
        p = pre.plan
        jobs.append({"i": i, "size": size, "method": method, "batch": batch, "ckpt": p.gradient_checkpointing,
                     "liger": p.liger_kernel, "data": kind, "seq": p.memory["seq_len"],
                     "predicted": p.memory["total"], "parts": p.memory, "yaml": str(out / "train.yaml"),
                     "result": str(out / "peak.json"), "log": str(work / "logs" / f"mem{i}.log")})
    (work / "logs").mkdir(parents=True, exist_ok=True)
    # lanes run side by side (torch's peak counters are per process); keep their sum well under the GPU
    lanes: dict[str, list] = {}
    for j in jobs:
        key = f"{j['size']}-{j['method']}"
        lanes.setdefault(key, []).append(j)
    if args.serial:
        lanes = {"all": jobs}

    def lane(items):
        for j in items:
            t = time.time()
            with open(j["log"], "w") as log:
                rc = subprocess.run([python(), "-m", "wrapper.bench", "_peak", j["yaml"], j["result"]], check=False, stdout=log,
                                    stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=ROOT).returncode
            j["rc"] = rc
            j["wall_s"] = round(time.time() - t, 1)
            if rc == 0 and Path(j["result"]).is_file():
                j["measured"] = json.loads(Path(j["result"]).read_text())
            print(f"  mem{j['i']} {j['size']} {j['method']} b{j['batch']} gc={j['ckpt']} liger={j['liger']} "
                  f"{j['data']}: rc {rc}, {j['wall_s']} s, predicted {j['predicted'] / GiB:.2f} GiB, measured "
                  f"{(j.get('measured') or {}).get('max_reserved', 0) / GiB:.2f} GiB reserved", flush=True)

    if dry:
        lanes = {}
        for j in jobs:
            print(f"  mem{j['i']} {j['size']} {j['method']} b{j['batch']} gc={j['ckpt']} liger={j['liger']} "
                  f"{j['data']} seq {j['seq']}: predicted {j['predicted'] / GiB:.2f} GiB", flush=True)
    threads = [threading.Thread(target=lane, args=(items,)) for items in lanes.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    res = {"gpu": gpu_info(), "versions": versions(), "date": time.strftime("%Y-%m-%d"), "jobs": jobs}
    if args.json:
        write(Path(args.json), json.dumps(res, indent=1, default=str))
    return res


# ------------------------------------------------------------------ BENCH.md

def _fmt(v, unit="", nd=1):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}{unit}"
    return f"{v}{unit}"


def _samples(res: dict) -> str:
    counts = sorted({t.get("samples") for t in (res.get("tokens") or {}).values() if t.get("samples")})
    return "/".join(str(c) for c in counts) or "?"


def speed_markdown(res: dict) -> str:
    g, v = res["gpu"], res["versions"]
    sessions = res.get("sessions") or {}
    col = bool(sessions)
    lines = [(f"Measured {res['date']} on 1 x {g.get('name')} (driver {g.get('driver')}, CUDA "
              f"{g.get('cuda_driver')}; torch {v.get('torch')} CUDA {g.get('cuda_torch')}), transformers "
              f"{v.get('transformers')}, llamafactory {v.get('llamafactory')}, peft {v.get('peft')}, bitsandbytes "
              f"{v.get('bitsandbytes')}, liger-kernel {v.get('liger_kernel')}, Python {v.get('python')}."), "",
             (f"Identity fine-tune ({_samples(res)} samples), {res['epochs']:g} epochs, random-init Qwen2.5 "
              "architectures with "
              "the real tokenizer. Wall: the whole process, for lfw from `lfw train` to the collected adapter "
              "(render+cli rows: planning and rendering, then `llamafactory-cli train`)."), "",
             ("| " + ("run | " if col else "") + "model | config | method | batch x accum | grad ckpt | liger | wall | "
              "train_runtime | steps | tokens/s | peak VRAM |"),
             "|" + "---|" * (12 if col else 11)]
    for r in res["runs"]:
        lines.append(
            "| " + (f"{r.get('session', '')} | " if col else "") +
            f"{r['size']} | {r['config']}{'' if r['returncode'] == 0 else ' (FAILED)'} | {r.get('method')} | "
            f"{r.get('batch')} x {r.get('accumulation')} | {'on' if r.get('gradient_checkpointing') else 'off'} | "
            f"{'on' if r.get('liger') else 'off'} | {r['wall_s']:.1f} s | {_fmt(r['train_runtime_s'], ' s')} | "
            f"{_fmt(r.get('steps'))} | {_fmt(r['tokens_per_s'], '', 0)} | {r['peak_vram_gib']:.1f} GiB |")
    if sessions:
        lines += [""] + [f"Run {k}: {text}" for k, text in sessions.items()]
    lines.append("")
    for size in dict.fromkeys(r["size"] for r in res["runs"]):
        t = next((r for r in res["runs"] if r["size"] == size and r["config"] == "tutorial"), None)
        for lf in (r for r in res["runs"] if r["size"] == size and r.get("ratio")):
            if t and lf["wall_s"] and lf.get("train_runtime_s") and t.get("train_runtime_s"):
                lines.append(f"- {size}, {lf['config']} vs the tutorial's config: **{t['wall_s'] / lf['wall_s']:.1f}x** "
                             f"in wall time ({t['wall_s']:.0f} s -> {lf['wall_s']:.0f} s), "
                             f"{t['train_runtime_s'] / lf['train_runtime_s']:.1f}x in train_runtime, "
                             f"{lf['tokens_per_s'] / t['tokens_per_s']:.1f}x in tokens/s; peak VRAM "
                             f"{t['peak_vram_gib']:.1f} -> {lf['peak_vram_gib']:.1f} GiB.")
    tk = res.get("tokens", {})
    if tk:
        lines += ["", "Tokens/s counts the real (non-padding) tokens of the training samples x epochs over "
                  "train_runtime; the tutorial trains on 90% of the samples (val_size 0.1). " + "; ".join(
                      f"{s}: {t['samples']} samples, {t['mean']} tokens on average, longest {t['max']} "
                      f"(planner's estimate {t['planner_longest']})" for s, t in tk.items()) + "."]
    return "\n".join(lines)


def _shape(size: str) -> dict:
    from wrapper.memory import model_shape
    from wrapper.synthetic import SIZES

    return model_shape({"model_type": "qwen2", "vocab_size": 151936, **SIZES[size]}, f"Qwen2.5-{size}")


def memory_markdown(res: dict) -> str:
    """Predicted (by the planner as it is now) vs measured peak VRAM."""
    from wrapper.memory import estimate

    g = res["gpu"]
    lines = [(f"Measured {res['date']} on {g.get('name')} with `python -m wrapper.bench --memory`: nvidia-smi's "
              "memory of the training process (torch's peak reservation + the CUDA context, 0.74 GiB here), a "
              "few steps on the worst-case batch: the longest identity sample repeated (the planner estimates it "
              "at 88 tokens padded, really 80) or, for `long`, 1024-token samples. Predicted: wrapper.memory as "
              "committed. LoRA rank 8 on all linear layers; no checkpointing and no liger are lfw's defaults on "
              "this GPU."), "",
             "| model | method | batch | grad ckpt | liger | seq | predicted | measured | error |",
             "|---|---|---|---|---|---|---|---|---|"]
    worst = 0.0
    for j in res["jobs"]:
        meas = _measured_total(j)
        pred = estimate(_shape(j["size"]), j["method"], j["batch"], j["seq"], j["ckpt"], 8, "all", j["liger"])["total"]
        if not meas:
            lines.append(f"| {j['size']} | {j['method']} | {j['batch']} | - | - | {j['seq']} | "
                         f"{pred / GiB:.2f} GiB | failed (rc {j.get('rc')}) | - |")
            continue
        err = (pred - meas) / meas * 100
        worst = max(worst, abs(err))
        lines.append(f"| {j['size']} | {j['method']} | {j['batch']} | {'on' if j['ckpt'] else 'off'} | "
                     f"{'on' if j['liger'] else 'off'} | {j['seq']}{' (long)' if j['data'] == 'long' else ''} | "
                     f"{pred / GiB:.2f} GiB | {meas / GiB:.2f} GiB | {err:+.0f}% |")
    lines += ["", f"Largest error: {worst:.0f}%."]
    return "\n".join(lines)


def _measured_total(j: dict) -> int:
    m = j.get("measured")
    if not m:
        return 0
    if m.get("process_used"):
        # nvidia-smi per process at the end (reserved still held) + the peak's extra reservation
        return m["process_used"] + (m["max_reserved"] - m["reserved_end"])
    from wrapper.memory import CONTEXT

    return int(m["max_reserved"] + CONTEXT)


def update_bench_md(path: Path, section: str, body: str) -> None:
    start, end = f"<!-- bench:{section} -->", f"<!-- /bench:{section} -->"
    text = path.read_text(encoding="utf-8") if path.is_file() else "# BENCH\n"
    block = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + f"\n\n## {section}\n\n{block}\n"
    path.write_text(text, encoding="utf-8")


def main(argv=None) -> None:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "_peak":
        return peak_child(argv[1], argv[2])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="7b,0.5b", help="comma list of 7b, 0.5b")
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--only", default="tutorial,lfw", help="which of tutorial,lfw to run")
    ap.add_argument("--extra", action="store_true", help="also lfw variants: + liger, + neat_packing, + GC, render + llamafactory-cli (with/without bnb)")
    ap.add_argument("--variants", default="", help="comma list limiting --extra")
    ap.add_argument("--via", choices=["auto", "lfw", "render"], default="auto",
                    help="lfw side: `lfw train` (lfw), or `lfw render` + llamafactory-cli (render)")
    ap.add_argument("--lfw-first", action="store_true")
    ap.add_argument("--memory", action="store_true", help="the peak-memory matrix instead of the speed benchmark")
    ap.add_argument("--steps", type=int, default=3, help="--memory: optimizer steps per run")
    ap.add_argument("--serial", action="store_true", help="--memory: one run at a time")
    ap.add_argument("--rows", default="", help="--memory: comma list of MATRIX rows to run (default all)")
    ap.add_argument("--work", default=os.environ.get("LFW_BENCH_WORK", str(ROOT / ".cache" / "bench")))
    ap.add_argument("--out", default=str(ROOT / "BENCH.md"), help="the markdown file to update")
    ap.add_argument("--json", default=None, help="also write the raw results here")
    ap.add_argument("--allow-cpu", action="store_true", help="dry run on the CPU with the tiny model")
    ap.add_argument("--md-from", nargs="+", metavar="JSON", help="only rewrite BENCH.md's tables from saved --json "
                    "results (speed and/or memory)")
    a = ap.parse_args(argv)
    a.sizes = [s.strip() for s in a.sizes.split(",") if s.strip()]
    a.only = [s.strip() for s in a.only.split(",") if s.strip()]
    a.variants = [s.strip() for s in a.variants.split(",") if s.strip()]
    a.rows = [int(x) for x in a.rows.split(",") if x.strip()]
    if a.via == "auto":
        a.via = "lfw" if (ROOT / "wrapper" / "commands" / "train.py").is_file() else "render"
    if a.md_from:
        for f in a.md_from:
            res = json.loads(Path(f).read_text())
            if "jobs" in res:
                update_bench_md(Path(a.out), "memory", memory_markdown(res))
            else:
                update_bench_md(Path(a.out), "speed", speed_markdown(res))
        print(f"wrote {a.out}")
        return
    Path(a.work).mkdir(parents=True, exist_ok=True)
    if a.memory:
        res = memory(a)
        update_bench_md(Path(a.out), "memory", memory_markdown(res))
    else:
        res = speed(a)
        update_bench_md(Path(a.out), "speed", speed_markdown(res))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
