"""Several GPUs and nodes: the strategy lfw picks and the environment it hands llamafactory-cli."""

from __future__ import annotations

import pytest

from wrapper.device import Device
from wrapper.distributed import layout, per_gpu_memory
from wrapper.recipe import RecipeError, Resources

GiB = 2**30


def gpus(n: int, free_gib: float = 78) -> Device:
    return Device("cuda", "NVIDIA H100 80GB HBM3", n, int(80 * GiB), int(free_gib * GiB), True)


# a 7B LoRA in bf16 on one GPU, by part (the shape of memory.estimate's answer)
LORA_7B = {"weights": 15.2 * GiB, "optimizer": 0.3 * GiB, "activations": 3 * GiB, "logits": 1 * GiB,
           "overhead": 0.6 * GiB}
FULL_7B = {"weights": 15.2 * GiB, "optimizer": 76 * GiB, "activations": 3 * GiB, "logits": 1 * GiB,
           "overhead": 0.6 * GiB}


def test_one_gpu_is_plain():
    lay = layout(Resources(), gpus(1), LORA_7B, 70 * GiB)
    assert lay.strategy == "single" and lay.world_size == 1 and "FORCE_TORCHRUN" not in lay.env


def test_one_of_two_gpus_hides_the_other(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    lay = layout(Resources(gpus=1), gpus(2), LORA_7B, 70 * GiB)
    assert lay.env == {"CUDA_VISIBLE_DEVICES": "0"}  # else LLaMA-Factory would start torchrun on both


def test_auto_picks_ddp_when_the_model_fits_one_gpu():
    lay = layout(Resources(gpus=2), gpus(2), LORA_7B, 70 * GiB)
    assert lay.strategy == "ddp" and lay.world_size == 2
    assert lay.env["FORCE_TORCHRUN"] == "1" and lay.env["NPROC_PER_NODE"] == "2"
    assert lay.deepspeed_config is None
    assert lay.per_gpu_gib["ddp"] < 21 and lay.per_gpu_gib["zero3"] < lay.per_gpu_gib["ddp"]


def test_auto_shards_only_when_one_gpu_is_too_small(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec  # deepspeed is an optional extra: pretend it is installed
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "deepspeed" else real(name, *a))
    lay = layout(Resources(gpus="all"), gpus(2), FULL_7B, 70 * GiB)
    assert lay.strategy in ("zero2", "zero3") and "does not fit one GPU" in lay.reason


def test_zero_without_deepspeed_is_a_clear_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(Exception, match=r"pip install 'lfw\[deepspeed\]'"):
        layout(Resources(gpus=2, strategy="zero3"), gpus(2), LORA_7B, 70 * GiB)


def test_too_many_gpus_asked():
    with pytest.raises(RecipeError, match="2 visible"):
        layout(Resources(gpus=4), gpus(2), LORA_7B, 70 * GiB)


def test_multi_node_environment():
    res = Resources(gpus=2, nodes=2, node_rank=1, master_addr="10.0.0.5", master_port=29555)
    lay = layout(res, gpus(2), LORA_7B, 70 * GiB)
    assert lay.world_size == 4
    assert {k: lay.env[k] for k in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")} == \
        {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29555"}


def test_cpu_processes_use_torchrun_with_gloo():
    lay = layout(Resources(gpus=2), Device.cpu(), None, None)
    assert lay.strategy == "ddp" and lay.env["NPROC_PER_NODE"] == "2" and lay.env["FORCE_TORCHRUN"] == "1"


def test_per_gpu_memory_orders_strategies():
    m = per_gpu_memory(FULL_7B, 2)
    assert m["ddp"] > m["zero2"] > m["zero3"]
