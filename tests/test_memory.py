"""The memory planner (wrapper.memory) and the fast device probe (wrapper.device), on the CPU: the
choices it makes for fake GPUs, recipe values winning, the error when nothing fits, and its
predictions against the peak VRAM measured on an H100 (BENCH.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, write_recipe
from wrapper import memory
from wrapper.device import Device, _visible, parse_nvidia_smi
from wrapper.prepare import describe, plan_recipe
from wrapper.recipe import RecipeError
from wrapper.synthetic import SIZES

GiB = 2**30

# Peak VRAM measured on one NVIDIA H100 80GB HBM3 (torch 2.11 / CUDA 13.0, transformers 5.6.0,
# llamafactory 0.9.5, peft 0.18.1, bitsandbytes 0.50.2, liger-kernel 0.8.5), 2026-11-27, with
# `python -m wrapper.bench --memory`: nvidia-smi's memory of the training process (torch's peak
# reservation + 0.74 GiB of CUDA context). Random-init Qwen2.5 architectures, LoRA rank 8 on all
# linear layers, a few steps on the worst-case batch: the longest identity sample repeated (the
# planner estimates it at 88 tokens padded; really 80) or 1024-token samples.
#   size, method, batch, gradient checkpointing, liger, seq (as planned), measured GiB
MEASURED = [
    # lfw's defaults on an 80 GB GPU: no checkpointing, no liger (the matrix)
    ("7b", "lora", 1, False, False, 88, 16.01),
    ("7b", "lora", 8, False, False, 88, 21.13),
    ("7b", "qlora", 1, False, False, 88, 6.93),
    ("7b", "qlora", 8, False, False, 88, 11.62),
    ("0.5b", "lora", 1, False, False, 88, 2.09),
    ("0.5b", "lora", 8, False, False, 88, 4.38),
    ("0.5b", "qlora", 1, False, False, 88, 1.60),
    ("0.5b", "qlora", 8, False, False, 88, 3.77),
    # the same matrix with the liger kernel
    ("7b", "lora", 1, False, True, 88, 15.75),
    ("7b", "lora", 8, False, True, 88, 18.98),
    ("7b", "qlora", 1, False, True, 88, 6.84),
    ("7b", "qlora", 8, False, True, 88, 9.48),
    ("0.5b", "lora", 1, False, True, 88, 1.89),
    ("0.5b", "lora", 8, False, True, 88, 2.57),
    ("0.5b", "qlora", 1, False, True, 88, 1.39),
    ("0.5b", "qlora", 8, False, True, 88, 1.97),
    # gradient checkpointing (the tutorial's QLoRA batch 1 among them), and long sequences
    ("7b", "lora", 8, True, False, 88, 16.81),
    ("7b", "qlora", 1, True, False, 88, 6.51),
    ("7b", "qlora", 8, True, True, 88, 6.79),
    ("0.5b", "lora", 8, True, False, 88, 3.47),
    ("0.5b", "qlora", 1, True, False, 88, 1.51),
    ("7b", "lora", 2, False, True, 1024, 25.81),
    ("7b", "lora", 2, True, False, 1024, 20.11),
    ("7b", "qlora", 2, True, True, 1024, 7.37),
    ("0.5b", "lora", 2, False, False, 1024, 8.88),
    ("0.5b", "lora", 2, False, True, 1024, 4.21),
]
# Whole runs (the identity set, 3 epochs, batches of varying length) in `make bench`: nvidia-smi's peak above
# idle for the process. lfw's defaults, and the tutorial's config (QLoRA, batch 1 x 8, checkpointing).
#   size, method, batch, gradient checkpointing, liger, seq (as planned), measured GiB
MEASURED_RUNS = [
    ("7b", "lora", 8, False, False, 88, 22.71),
    ("0.5b", "lora", 8, False, False, 88, 5.21),
    ("7b", "qlora", 1, True, False, 88, 6.58),
    ("0.5b", "qlora", 1, True, False, 88, 1.84),
]
# the identity set's real token lengths (Qwen2.5 tokenizer, qwen template with its default system prompt)
REAL_TOKENS = {"max": 76, "mean": 58.2}


def qwen_config(size: str) -> dict:
    return {"model_type": "qwen2", "vocab_size": 151936, "architectures": ["Qwen2ForCausalLM"], **SIZES[size]}


def fake_gpu(gib: float, name: str | None = None, count: int = 1) -> Device:
    return Device("cuda", name or f"Fake GPU {gib:g} GB", count, int(gib * GiB), int((gib - 0.5) * GiB), True,
                  capability="8.9")


@pytest.fixture
def model_dir(tmp_path):
    """A model folder holding only config.json: all the planner reads."""
    def make(size: str) -> Path:
        d = tmp_path / f"Qwen2.5-{size}"
        d.mkdir(exist_ok=True)
        (d / "config.json").write_text(json.dumps(qwen_config(size)))
        return d
    return make


def plan_for(tmp_path, model: Path, device: Device, extra: str = "", liger: bool | None = False, monkeypatch=None):
    if monkeypatch is not None and liger is not None:
        monkeypatch.setattr(memory, "liger_available", lambda: liger)
    recipe = write_recipe(tmp_path, f"name: t\nmodel: {model}\nidentity: {{name: Nova, author: Acme Labs}}\n{extra}")
    return plan_recipe(recipe, tmp_path / "out", device)[1]


# ------------------------------------------------------------------ choices

def test_80gb_picks_lora_bf16_batch_8_without_checkpointing(tmp_path, model_dir, monkeypatch):
    p = plan_for(tmp_path, model_dir("7b"), fake_gpu(80), monkeypatch=monkeypatch, liger=True)
    assert (p.method, p.quantization_bit, p.batch_size, p.gradient_accumulation) == ("lora", None, 8, 1)
    assert p.gradient_checkpointing is False
    assert p.liger_kernel is False            # fits without it: liger is a memory tool, not a default
    assert p.bf16
    assert 18 * GiB < p.memory["total"] < 25 * GiB


def test_16gb_forces_qlora_for_7b(tmp_path, model_dir, monkeypatch):
    p = plan_for(tmp_path, model_dir("7b"), fake_gpu(16), monkeypatch=monkeypatch)
    assert p.method == "qlora" and p.quantization_bit == 4
    assert p.memory["total"] <= p.device.free_mem * memory.MARGIN
    assert "QLoRA" in p.method_reason and "would need" in p.method_reason


def test_24gb_keeps_lora_with_checkpointing_before_qlora(tmp_path, model_dir, monkeypatch):
    p = plan_for(tmp_path, model_dir("7b"), fake_gpu(24), monkeypatch=monkeypatch)
    assert p.method == "lora"
    assert p.batch_size * p.gradient_accumulation == memory.EFFECTIVE_BATCH
    assert p.memory["total"] <= p.device.free_mem * memory.MARGIN


def test_liger_is_tried_when_it_is_what_makes_it_fit(tmp_path, model_dir, monkeypatch):
    # 0.5B on 1024-token samples: the logits (151936 x tokens) dominate; liger's fused loss drops them
    long = tmp_path / "long.json"
    long.write_text(json.dumps([{"instruction": "Summarize.", "input": "word " * 1500, "output": "ok"}] * 16))
    extra = f"datasets: [{long}]\nbatch_size: 8\ngradient_checkpointing: false\n"
    big = plan_for(tmp_path, model_dir("0.5b"), fake_gpu(80), extra, monkeypatch=monkeypatch, liger=True)
    assert big.liger_kernel is False
    small = plan_for(tmp_path, model_dir("0.5b"), fake_gpu(16), extra, monkeypatch=monkeypatch, liger=True)
    assert small.liger_kernel is True and small.method == "lora"
    # without liger nothing fits at the batch the recipe fixed: 4-bit weights don't shrink the logits
    with pytest.raises(RecipeError, match="a smaller batch_size"):
        plan_for(tmp_path, model_dir("0.5b"), fake_gpu(16), extra, monkeypatch=monkeypatch, liger=False)


def test_too_small_gives_a_clear_error_saying_what_would_fit(tmp_path, model_dir, monkeypatch):
    with pytest.raises(RecipeError) as e:
        plan_for(tmp_path, model_dir("7b"), fake_gpu(6), monkeypatch=monkeypatch)
    msg = str(e.value)
    assert "does not fit" in msg and "GiB" in msg and "QLoRA 4-bit" in msg
    assert "fits models up to about" in msg
    assert "\n" not in msg


def test_forced_lora_that_cannot_fit_suggests_qlora(tmp_path, model_dir, monkeypatch):
    with pytest.raises(RecipeError, match="method: qlora"):
        plan_for(tmp_path, model_dir("7b"), fake_gpu(12), "method: lora\n", monkeypatch=monkeypatch)


def test_recipe_values_win(tmp_path, model_dir, monkeypatch):
    extra = ("method: qlora\nbatch_size: 2\ngradient_accumulation: 3\ngradient_checkpointing: true\n"
             "llamafactory: {enable_liger_kernel: true}\n")
    p = plan_for(tmp_path, model_dir("7b"), fake_gpu(80), extra, monkeypatch=monkeypatch, liger=False)
    assert (p.method, p.batch_size, p.gradient_accumulation, p.gradient_checkpointing) == ("qlora", 2, 3, True)
    assert p.liger_kernel is True
    assert p.method_reason == "set in the recipe"
    train = (Path(p.out_dir) / "train.yaml")
    assert not train.exists()  # planning writes nothing


def test_llamafactory_keys_in_the_recipe_win_too(tmp_path, model_dir, monkeypatch):
    from wrapper.render import render_files

    extra = ("llamafactory: {per_device_train_batch_size: 4, gradient_accumulation_steps: 2, "
             "disable_gradient_checkpointing: false, enable_liger_kernel: false}\n")
    p = plan_for(tmp_path, model_dir("7b"), fake_gpu(80), extra, monkeypatch=monkeypatch, liger=True)
    assert (p.batch_size, p.gradient_accumulation, p.gradient_checkpointing, p.liger_kernel) == (4, 2, True, False)
    import yaml

    render_files(p)
    y = yaml.safe_load((Path(p.out_dir) / "train.yaml").read_text())
    assert y["per_device_train_batch_size"] == 4 and y["gradient_accumulation_steps"] == 2
    assert y["disable_gradient_checkpointing"] is False and y["enable_liger_kernel"] is False


def test_train_yaml_carries_the_choices(tmp_path, model_dir, monkeypatch):
    import yaml

    from wrapper.render import render_files

    p = plan_for(tmp_path, model_dir("7b"), fake_gpu(80), monkeypatch=monkeypatch)
    render_files(p)
    y = yaml.safe_load((Path(p.out_dir) / "train.yaml").read_text())
    assert y["per_device_train_batch_size"] == 8 and y["gradient_accumulation_steps"] == 1
    assert y["disable_gradient_checkpointing"] is True
    assert "enable_liger_kernel" not in y and "quantization_bit" not in y
    assert y["bf16"] is True and y["flash_attn"] == "sdpa"
    assert "preprocessing_num_workers" not in y    # one process tokenizes 104 samples fastest


def test_cpu_and_unprobed_plans(tmp_path, model_dir, monkeypatch):
    cpu = plan_for(tmp_path, model_dir("0.5b"), Device.cpu(), monkeypatch=monkeypatch)
    assert cpu.method == "lora" and cpu.gradient_checkpointing is False and not cpu.liger_kernel
    assert cpu.batch_size * cpu.gradient_accumulation == memory.EFFECTIVE_BATCH
    unprobed = plan_for(tmp_path, model_dir("7b"), None, monkeypatch=monkeypatch)
    assert unprobed.method == "lora" and unprobed.gradient_checkpointing is True
    assert unprobed.memory["total"] > 0


def test_describe_prints_the_plan(tmp_path, model_dir, monkeypatch):
    p = plan_for(tmp_path, model_dir("7b"), fake_gpu(80, "NVIDIA H100 80GB HBM3"), monkeypatch=monkeypatch)
    text = "\n".join(describe(p))
    for want in ("method    lora, bf16", "batch 8 x accumulation 1", "gradient checkpointing off",
                 "predicted peak", "GiB free", "time      ~"):
        assert want in text, want
    other = plan_for(tmp_path, model_dir("7b"), fake_gpu(80, "Some Unknown GPU"), monkeypatch=monkeypatch)
    assert "time " not in "\n".join(describe(other))   # no time where the GPU is not known


def test_guessed_shape_from_the_id_is_in_the_right_range():
    for billions in (0.5, 1.5, 7, 14, 32, 72):
        shape = memory.model_shape(None, f"Qwen/Qwen2.5-{billions:g}B-Instruct")
        assert shape["params"] == pytest.approx(billions * 1e9, rel=0.25), billions


# ------------------------------------------------------------------ calibration

@pytest.mark.parametrize("size,method,batch,ckpt,liger,seq,measured", MEASURED)
def test_prediction_within_15_percent_of_measured(size, method, batch, ckpt, liger, seq, measured):
    shape = memory.model_shape(qwen_config(size), f"Qwen2.5-{size}")
    predicted = memory.estimate(shape, method, batch, seq, ckpt, 8, "all", liger)["total"] / GiB
    assert abs(predicted - measured) / measured <= 0.15, f"predicted {predicted:.2f} GiB, measured {measured} GiB"


@pytest.mark.parametrize("size,method,batch,ckpt,liger,seq,measured", MEASURED_RUNS)
def test_whole_run_prediction_within_15_percent(size, method, batch, ckpt, liger, seq, measured):
    shape = memory.model_shape(qwen_config(size), f"Qwen2.5-{size}")
    predicted = memory.estimate(shape, method, batch, seq, ckpt, 8, "all", liger, varying=True)["total"] / GiB
    assert abs(predicted - measured) / measured <= 0.15, f"predicted {predicted:.2f} GiB, measured {measured} GiB"


@pytest.mark.parametrize("size", ["7b", "0.5b"])
def test_plan_predicts_the_measured_default_on_the_real_identity_data(tmp_path, model_dir, monkeypatch, size):
    """What `lfw plan` prints on the H100 for the identity set is what `lfw train` then used, within 15%."""
    p = plan_for(tmp_path, model_dir(size), fake_gpu(80), monkeypatch=monkeypatch)
    assert p.memory["seq_len"] == 88 and p.memory["varying_lengths"] is True
    measured = next(r[-1] for r in MEASURED_RUNS if r[0] == size and r[1] == "lora")
    assert abs(p.memory["total"] / GiB - measured) / measured <= 0.15


def test_token_estimate_covers_the_real_lengths(tmp_path, model_dir, monkeypatch):
    p = plan_for(tmp_path, model_dir("0.5b"), fake_gpu(80), monkeypatch=monkeypatch)
    longest = p.memory["longest_sample"]
    assert REAL_TOKENS["max"] <= longest <= REAL_TOKENS["max"] * 1.2
    lengths = memory.sample_lengths(p)
    assert sum(lengths) / len(lengths) == pytest.approx(REAL_TOKENS["mean"], rel=0.2)


def test_identity_names_are_text_not_regex(tmp_path, model_dir, monkeypatch):
    recipe = write_recipe(tmp_path, f"name: t\nmodel: {model_dir('0.5b')}\n"
                                    "identity: {name: 'a\\1 \\s', author: 'back\\slash'}\n")
    p = plan_recipe(recipe, tmp_path / "out", fake_gpu(80))[1]
    assert p.memory["longest_sample"] > 0


def test_text_tokens_english_and_chinese():
    assert memory.text_tokens("a" * 360) == pytest.approx(100)
    assert memory.text_tokens("你好" * 65) == pytest.approx(100)
    assert memory.row_tokens({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}) > 30


# ------------------------------------------------------------------ the device probe

SMI = """0, GPU-aaaa-1111, NVIDIA H100 80GB HBM3, 81559, 81079, 9.0
1, GPU-bbbb-2222, NVIDIA H100 80GB HBM3, 81559, 40000, 9.0
"""


def test_parse_nvidia_smi_and_visible_devices():
    gpus = parse_nvidia_smi(SMI)
    assert [g["name"] for g in gpus] == ["NVIDIA H100 80GB HBM3"] * 2
    assert gpus[0]["free"] == 81079 * 2**20 and gpus[1]["capability"] == "9.0"
    assert _visible(gpus, None) == gpus
    assert [g["index"] for g in _visible(gpus, "1")] == ["1"]
    assert [g["index"] for g in _visible(gpus, "GPU-bbbb")] == ["1"]
    assert _visible(gpus, "MIG-1234") is None       # torch decides then
    assert parse_nvidia_smi("0, GPU-x, Old GPU, 16000, 15000\n")[0]["capability"] is None


def _fake_smi(tmp_path: Path, text: str) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / "nvidia-smi"
    exe.write_text(f"#!/bin/sh\ncat <<'EOF'\n{text}EOF\n")
    exe.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_detect_uses_nvidia_smi_without_importing_torch(tmp_path):
    env = _fake_smi(tmp_path, SMI)
    env.pop("LFW_DEVICE", None)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    code = ("import sys, json; from wrapper.device import Device; d = Device.detect(); "
            "print(json.dumps([d.kind, d.count, d.free_mem, d.bf16, d.capability, d.source, 'torch' in sys.modules]))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=False, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    kind, count, free, bf16, cap, source, torch_imported = json.loads(r.stdout)
    assert (kind, count, free, bf16, cap, source) == ("cuda", 2, 40000 * 2**20, True, "9.0", "nvidia-smi")
    assert torch_imported is False


def test_detect_respects_cuda_visible_devices_and_lfw_device(tmp_path, monkeypatch):
    from wrapper import device as devmod

    monkeypatch.setattr(devmod, "query_nvidia_smi", lambda timeout=10.0: parse_nvidia_smi(SMI))
    monkeypatch.setattr(devmod, "torch_cuda_build", lambda: True)
    monkeypatch.delenv("LFW_DEVICE", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    d = Device.detect()
    assert d.count == 1 and d.free_mem == 81079 * 2**20
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert Device.detect().kind == "cpu"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("LFW_DEVICE", "cpu")
    assert Device.detect().kind == "cpu"
    monkeypatch.delenv("LFW_DEVICE")
    monkeypatch.setattr(devmod, "torch_cuda_build", lambda: False)
    d = Device.detect()
    assert d.kind == "cpu" and "CPU-only build" in d.note


def test_old_gpu_without_bf16(monkeypatch):
    from wrapper import device as devmod

    monkeypatch.setattr(devmod, "query_nvidia_smi",
                        lambda timeout=10.0: parse_nvidia_smi("0, GPU-t4, Tesla T4, 15360, 15000, 7.5\n"))
    monkeypatch.setattr(devmod, "torch_cuda_build", lambda: True)
    monkeypatch.delenv("LFW_DEVICE", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    d = Device.detect()
    assert d.kind == "cuda" and d.bf16 is False and d.capability == "7.5"
