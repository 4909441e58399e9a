"""`make bench-scale`: one GPU against two, through `lfw train`, on a random-init Qwen2.5-7B
architecture with the real tokenizer. Appends the rows to BENCH.md ("More than one GPU").

    python -m wrapper.bench_scale [--samples 2000] [--epochs 3] [--zero3-samples 400] [--out BENCH.md]

Runs, each `lfw train` in its own process: 1 GPU; 2 GPUs with `strategy: auto` (DDP here); 2 GPUs with
`strategy: zero3` (needs deepspeed). Wall time is the process's; peak VRAM per GPU is nvidia-smi's
memory.used above the idle value, polled every 100 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _poll_vram(stop: threading.Event, peaks: dict[int, int], base: dict[int, int]) -> None:
    while not stop.is_set():
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True).stdout
        for line in out.strip().splitlines():
            i, used = (int(x) for x in line.split(","))
            peaks[i] = max(peaks.get(i, 0), used - base.get(i, 0))
        stop.wait(0.1)


def _idle() -> dict[int, int]:
    out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout
    return {int(a): int(b) for a, b in (line.split(",") for line in out.strip().splitlines())}


def dataset(work: Path, n: int) -> Path:
    """n alpaca samples: the identity set, repeated with numbered variations (identity-length samples)."""
    from wrapper.render import render_identity

    rows = render_identity({"name": "LFW-Assistant", "author": "the lfw team"})
    out = [dict(r, instruction=f"{r['instruction']} ({i // len(rows)})") for i, r in
           zip(range(n), (rows[j % len(rows)] for j in range(n)))]
    path = work / f"data{n}.json"
    path.write_text(json.dumps(out, ensure_ascii=False))
    return path


def _seconds(hms: str) -> float:
    parts = [float(x) for x in str(hms).split(":")]
    return sum(v * 60 ** i for i, v in enumerate(reversed(parts)))


def steady_tokens_per_s(trainer_log: Path) -> float | None:
    """Tokens/s between the first and the last logged step: training without the first step's set-up."""
    try:
        recs = [json.loads(x) for x in trainer_log.read_text().splitlines() if x.strip()]
    except OSError:
        return None
    recs = [r for r in recs if "loss" in r and r.get("total_tokens")]
    if len(recs) < 2:
        return None
    dt = _seconds(recs[-1]["elapsed_time"]) - _seconds(recs[0]["elapsed_time"])
    return round((recs[-1]["total_tokens"] - recs[0]["total_tokens"]) / dt, 1) if dt > 0 else None


def run(name: str, model: Path, data: Path, work: Path, resources: dict, epochs: float,
        env_extra: dict | None = None) -> dict:
    recipe = work / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": name, "model": str(model), "datasets": [data.name], "epochs": epochs,
        "resources": resources, "save_steps": 100000, "logging_steps": 5,
    }))
    base = _idle()
    peaks: dict[int, int] = {}
    stop = threading.Event()
    poller = threading.Thread(target=_poll_vram, args=(stop, peaks, base), daemon=True)
    poller.start()
    t0 = time.monotonic()
    env = {**os.environ, "LFW_RUNS": str(work / "runs"), **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-m", "wrapper.cli", "train", str(recipe)], env=env,
                          capture_output=True, text=True)
    wall = time.monotonic() - t0
    stop.set()
    poller.join()
    run_dir = (work / "runs" / name / "latest").resolve()
    manifest = json.loads((run_dir / "manifest.json").read_text()) if (run_dir / "manifest.json").is_file() else {}
    results = json.loads((run_dir / "all_results.json").read_text()) if (run_dir / "all_results.json").is_file() else {}
    row = {
        "run": name, "ok": proc.returncode == 0 and manifest.get("status") == "succeeded",
        "strategy": (manifest.get("plan") or {}).get("layout", {}).get("strategy"),
        "wall_s": round(wall, 1), "train_runtime_s": results.get("train_runtime"),
        "tokens_per_s": manifest.get("tokens_per_second"), "samples_per_s": results.get("train_samples_per_second"),
        "steady_tokens_per_s": steady_tokens_per_s(run_dir / "adapter" / "trainer_log.jsonl"),
        "launch": "torchrun (direct)" if "torchrun" in " ".join(manifest.get("child") or []) else "llamafactory-cli",
        "timings": manifest.get("timings"),
        "steps": (manifest.get("steps") or {}).get("done"),
        "peak_vram_gb": {i: round(v / 1024, 1) for i, v in sorted(peaks.items())},
        "adapters": len(list((run_dir / "adapter").glob("adapter_model.safetensors"))) if run_dir.is_dir() else 0,
    }
    if not row["ok"]:
        row["error"] = (proc.stderr or "")[-1500:]
    print(json.dumps(row), flush=True)
    return row


def markdown(rows: list[dict], gpu: str, samples: int, epochs: float = 1.0) -> str:
    one = next((r for r in rows if r["run"] == "gpu1" and r["ok"]), None)
    lines = [f"## More than one GPU ({gpu}, {samples} identity-length samples, {epochs:g} epoch(s), "
             "random-init Qwen2.5-7B)", "",
             "| run | strategy | started by | wall | train_runtime | tokens/s | tokens/s after the first log | "
             "peak VRAM per GPU (GB) | wall vs 1 GPU | tokens/s vs 1 GPU |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["ok"]:
            lines.append(f"| {r['run']} | failed | | | | | | | | |")
            continue
        ratio_w = f"{one['wall_s'] / r['wall_s']:.2f}x" if one else ""
        ratio_t = (f"{r['tokens_per_s'] / one['tokens_per_s']:.2f}x" if one and one["tokens_per_s"] and
                   r["tokens_per_s"] else "")
        vram = ", ".join(str(v) for v in r["peak_vram_gb"].values())
        lines.append(f"| {r['run']} | {r['strategy']} | {r.get('launch', '')} | {r['wall_s']} s | "
                     f"{r['train_runtime_s']:.1f} s | {r['tokens_per_s']} | {r.get('steady_tokens_per_s')} | {vram} | "
                     f"{ratio_w} | {ratio_t} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--zero3-samples", type=int, default=400, help="ZeRO-3 is slow: a smaller set shows it works")
    ap.add_argument("--work", default=str(ROOT / ".cache" / "bench-scale"))
    ap.add_argument("--model", default=None, help="an existing 7B model directory (default: build one)")
    ap.add_argument("--out", default=None, help="append the markdown table here (e.g. BENCH.md)")
    ap.add_argument("--runs", default="gpu1,gpu2,zero3", help="of gpu1, gpu2, gpu2cli (llamafactory-cli starts "
                    "torchrun, as before), zero3")
    ap.add_argument("--epochs", type=float, default=3.0, help="lfw's default for an identity set")
    ap.add_argument("--zero3-epochs", type=float, default=1.0)
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    model = Path(a.model) if a.model else work / "qwen2.5-7b-random"
    if not (model / "config.json").is_file():
        from wrapper.synthetic import build_model

        build_model(model, "7b", dtype="bfloat16", device="cuda")
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                         text=True).stdout.strip().splitlines()[0]
    data = dataset(work, a.samples)
    small = dataset(work, a.zero3_samples)
    plan = {"gpu1": ({"gpus": 1}, data, None, a.epochs), "gpu2": ({"gpus": 2}, data, None, a.epochs),
            "gpu2cli": ({"gpus": 2}, data, {"LFW_LAUNCH": "llamafactory-cli"}, a.epochs),
            "zero3": ({"gpus": 2, "strategy": "zero3"}, small, None, a.zero3_epochs)}
    rows = [run(name, model, plan[name][1], work, plan[name][0], plan[name][3], plan[name][2])
            for name in a.runs.split(",")]
    md = markdown(rows, gpu, a.samples, a.epochs) + (
        f"\nzero3 ran on {a.zero3_samples} samples, {a.zero3_epochs:g} epoch(s): it shows the ZeRO-3 path trains one "
        "adapter, not a speed to compare.\n" if "zero3" in a.runs else "")
    print(md)
    if a.out:
        with open(a.out, "a", encoding="utf-8") as f:
            f.write("\n" + md)


if __name__ == "__main__":
    main()
