"""Several GPUs and nodes: the strategy lfw picks and the environment it hands llamafactory-cli."""

from __future__ import annotations

from pathlib import Path

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


def test_two_gloo_processes_train_one_adapter_in_a_path_with_spaces(tmp_path, tiny_model):
    """The multi-process path end to end on the CPU: torchrun with 2 gloo processes on LLaMA-Factory's
    launcher.py (the command llamafactory-cli would start), in a run directory whose path has a space."""
    import json

    import yaml

    from conftest import lfw, write_recipe

    where = tmp_path / "with space"
    where.mkdir()
    recipe = write_recipe(where, f"""\
name: ddp
model: {tiny_model}
identity: {{name: Nova, author: Acme}}
epochs: 1
max_samples: 32
batch_size: 4
gradient_accumulation: 1
save_steps: 100
resources: {{gpus: 2}}
""")
    r = lfw("train", recipe, env={"LFW_RUNS": str(where / "runs")}, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    run = (where / "runs" / "ddp" / "latest").resolve()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "succeeded"
    layout = manifest["plan"]["layout"]
    assert layout["strategy"] == "ddp" and layout["nproc_per_node"] == 2 and layout["nodes"] == 1
    log = (run / "train.log").read_text()
    assert "world size: 2" in log
    child = manifest["child"]
    assert Path(child[0]).name == "torchrun" and Path(child[-2]).name == "launcher.py" and child[-1] == "train.yaml"
    assert child[child.index("--nproc_per_node") + 1] == "2"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    # 32 samples / (4 per process x 2 processes) = 4 steps: both processes took part
    assert manifest["steps"]["done"] == 4
    assert yaml.safe_load((run / "train.yaml").read_text())["per_device_train_batch_size"] == 4


def test_multi_node_yaml_and_env_are_rendered(tmp_path, tiny_model, monkeypatch):
    import importlib.util
    import json

    from conftest import write_recipe
    from wrapper.prepare import prepare

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "deepspeed" else real(name, *a))
    recipe = write_recipe(tmp_path, f"""\
name: mn
model: {tiny_model}
identity: {{name: Nova, author: Acme}}
resources: {{gpus: 2, nodes: 2, node_rank: 1, master_addr: 10.1.2.3, strategy: zero3}}
""")
    prepared = prepare(recipe, tmp_path / "out", gpus(2))
    lay = prepared.plan.layout
    assert lay.env["NNODES"] == "2" and lay.env["NODE_RANK"] == "1" and lay.env["MASTER_ADDR"] == "10.1.2.3"
    assert lay.env["MASTER_PORT"] == "29500" and lay.world_size == 4
    import yaml
    train = yaml.safe_load((tmp_path / "out" / "train.yaml").read_text())
    ds = json.loads((tmp_path / "out" / "ds_zero3.json").read_text())
    assert train["deepspeed"] == str(tmp_path / "out" / "ds_zero3.json") and ds["zero_optimization"]["stage"] == 3


LAYOUT_2 = {"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2", "NNODES": "1", "NODE_RANK": "0"}


def _cli():
    from wrapper.launch import llamafactory_cli

    return llamafactory_cli()


def test_torchrun_command_is_the_one_llamafactory_cli_builds():
    """lfw starts torchrun on LLaMA-Factory's launcher.py itself, skipping llamafactory-cli's imports:
    the arguments must stay those of the installed LLaMA-Factory's launcher."""
    import importlib.util

    from wrapper.distributed import torchrun_command

    argv, extra = torchrun_command(LAYOUT_2, _cli(), environ={"PATH": "/usr/bin"})
    launcher = Path(next(iter(importlib.util.find_spec("llamafactory").submodule_search_locations))) / "launcher.py"
    assert Path(argv[0]).name == "torchrun" and argv[-2:] == [str(launcher), "train.yaml"]
    flags = dict(zip(argv[1:-2:2], argv[2:-2:2]))
    assert flags["--nnodes"] == "1" and flags["--node_rank"] == "0" and flags["--nproc_per_node"] == "2"
    assert flags["--master_addr"] == "127.0.0.1" and 0 < int(flags["--master_port"]) < 65536
    # the same flags, in the same order, as llamafactory-cli's own command line (llamafactory 0.9.5)
    source = launcher.read_text()
    assert '"torchrun --nnodes {nnodes} --node_rank {node_rank} --nproc_per_node {nproc_per_node} "' in source
    assert '"--master_addr {master_addr} --master_port {master_port} {file_name} {args}"' in source
    assert extra == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "TORCH_NCCL_AVOID_RECORD_STREAMS": "1"}


def test_torchrun_command_takes_nodes_from_the_layout_and_steps_aside():
    from wrapper.distributed import torchrun_command

    multi = {**LAYOUT_2, "NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    argv, _ = torchrun_command(multi, _cli(), environ={"NNODES": "5", "MASTER_PORT": "1234"})  # the recipe wins
    flags = dict(zip(argv[1:-2:2], argv[2:-2:2]))
    assert (flags["--nnodes"], flags["--node_rank"], flags["--master_addr"], flags["--master_port"]) == (
        "2", "1", "10.0.0.1", "29500")
    assert torchrun_command({}, _cli(), environ={}) is None                                   # one process
    assert torchrun_command(LAYOUT_2, _cli(), environ={"LFW_LAUNCH": "llamafactory-cli"}) is None
    assert torchrun_command(LAYOUT_2, _cli(), environ={"RDZV_ID": "job1"}) is None              # elastic
    assert torchrun_command(LAYOUT_2, "/nonexistent/llamafactory-cli", environ={}) is None
    _, extra = torchrun_command(LAYOUT_2, _cli(), environ={"OPTIM_TORCH": "0"})
    assert extra == {}
