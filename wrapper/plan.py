"""Stage 2: the plan. A recipe plus what lfw knows about the model, the data and the machine
becomes every concrete value the templates need: model path, chat template, method, batch sizes,
precision, workers, paths. Nothing here imports torch or llamafactory; the device is passed in.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from wrapper import datasets as ds
from wrapper.device import Device
from wrapper.paths import cache_root
from wrapper.recipe import Recipe, RecipeError, did_you_mean

# Model families whose LLaMA-Factory chat template can be told from the model id or config.
# Order matters: the first pattern that matches the id (lower case) wins.
_FAMILY_TEMPLATES: list[tuple[str, str]] = [
    (r"qwen3.*(instruct-2507|nothink)", "qwen3_nothink"),
    (r"qwen3", "qwen3"),
    (r"qwq", "qwen"),
    (r"qwen2\.5-vl|qwen2-vl", "qwen2_vl"),
    (r"qwen", "qwen"),
    (r"deepseek-r1", "deepseekr1"),
    (r"deepseek", "deepseek3"),
    (r"llama-?3", "llama3"),
    (r"llama-?2", "llama2"),
    (r"glm-?4", "glm4"),
    (r"gemma-?3", "gemma3"),
    (r"gemma", "gemma"),
    (r"mistral|mixtral", "mistral"),
    (r"phi-?4", "phi4"),
    (r"yi-", "yi"),
]
_MODEL_TYPE_TEMPLATES = {"qwen2": "qwen", "qwen3": "qwen3", "llama": "llama3", "gemma": "gemma", "gemma3": "gemma3",
                         "mistral": "mistral", "glm4": "glm4", "phi3": "phi"}


def derive_template(model: str, config: dict | None) -> str | None:
    lowered = model.lower().rstrip("/")
    for pattern, template in _FAMILY_TEMPLATES:
        if re.search(pattern, Path(lowered).name) or re.search(pattern, lowered):
            return template
    if config:
        return _MODEL_TYPE_TEMPLATES.get(str(config.get("model_type", "")))
    return None


@dataclass
class ModelRef:
    id: str                    # as written in the recipe
    path: str                  # local directory (existing, or where the download will land)
    local: bool                # the recipe named a local directory
    hub: str
    config: dict | None        # config.json when already on disk

    @property
    def on_disk(self) -> bool:
        return (Path(self.path) / "config.json").is_file()


def resolve_model(recipe: Recipe, recipe_dir: Path) -> ModelRef:
    raw = os.path.expanduser(recipe.model)
    candidate = Path(raw) if os.path.isabs(raw) else recipe_dir / raw
    looks_local = raw.startswith((".", "/", "~")) or candidate.is_dir()
    if looks_local:
        if not candidate.is_dir():
            raise RecipeError(f"model: local directory {str(candidate)!r} does not exist")
        cfg = candidate / "config.json"
        if not cfg.is_file():
            raise RecipeError(f"model: {str(candidate)!r} has no config.json: is it a model directory?")
        return ModelRef(recipe.model, str(candidate.resolve()), True, recipe.hub, _read_config(cfg))
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", recipe.model):
        raise RecipeError(f"model: {recipe.model!r} is neither a local directory nor a hub id like Qwen/Qwen2.5-7B-Instruct")
    from wrapper.hub import cached_model_dir  # light: no network, no hub client import

    path = cached_model_dir(recipe.hub, recipe.model, cache_root())
    cfg = path / "config.json"
    return ModelRef(recipe.model, str(path), False, recipe.hub, _read_config(cfg) if cfg.is_file() else None)


def _read_config(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise RecipeError(f"model: {str(path)!r} is not valid JSON: the model directory is broken") from None


def known_templates() -> frozenset[str]:
    from wrapper.paths import LF_KEYS_FILE

    return frozenset(json.loads(LF_KEYS_FILE.read_text())["templates"])


@dataclass
class Plan:
    name: str
    model: ModelRef
    template: str
    method: str                       # lora | qlora | full (auto resolved)
    method_reason: str
    finetuning_type: str
    quantization_bit: int | None
    bf16: bool
    fp16: bool
    precision_note: str | None
    batch_size: int
    gradient_accumulation: int
    gradient_checkpointing: bool
    preprocessing_workers: int | None
    dataloader_workers: int
    epochs: float
    learning_rate: float
    cutoff_len: int
    lr_scheduler: str
    warmup_ratio: float
    lora_rank: int
    lora_alpha: int
    lora_dropout: float
    lora_target: str
    max_samples: int | None
    val_size: float
    seed: int
    logging_steps: int
    save_steps: int
    datasets: list[ds.DatasetSpec]
    n_samples: int
    identity: dict | None
    system_prompt: str | None
    extra: dict[str, Any]
    device: Device
    out_dir: str                      # where train/infer/export yaml and data/ go
    memory: dict | None = None        # predicted peak memory, see wrapper.memory
    liger_kernel: bool = False        # enable_liger_kernel (wrapper.memory decides)
    layout: Any = None                # wrapper.distributed.Layout: processes, strategy, launch environment
    notes: list[str] = field(default_factory=list)

    @property
    def data_dir(self) -> str:
        return str(Path(self.out_dir) / "data")

    @property
    def adapter_dir(self) -> str:
        return str(Path(self.out_dir) / "adapter")

    @property
    def export_dir(self) -> str:
        return str(Path(self.out_dir) / "export")

    @property
    def steps_per_epoch(self) -> int:
        n_train = self.n_samples - (int(self.n_samples * self.val_size) if self.val_size else 0)
        per_step = self.batch_size * self.gradient_accumulation * max(1, self.device.world_size)
        return max(1, -(-n_train // per_step))

    @property
    def eval_steps(self) -> int:
        """Evaluate about five times a run (at least every save), so the eval-loss curve has points."""
        return max(1, min(self.save_steps, self.total_steps // 5 or 1))

    @property
    def total_steps(self) -> int:
        # Trainer: ceil(batches / accumulation) per epoch, times epochs (rounded up).
        return max(1, int(-(-self.steps_per_epoch * self.epochs // 1)))

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d["model"] = {"id": self.model.id, "path": self.model.path, "hub": self.model.hub, "local": self.model.local}
        d["datasets"] = [x.name for x in self.datasets]
        d["device"] = self.device.describe()
        return d


def default_system_prompt(identity: dict | None) -> str | None:
    if not identity:
        return None
    return f"You are {identity['name']}, an AI assistant developed by {identity['author']}."


def make_plan(recipe: Recipe, recipe_path: Path, out_dir: Path, device: Device | None = None) -> Plan:
    """Resolve everything. `device=None` means 'not probed' (render): GPU assumptions, no memory check."""
    from wrapper import memory

    device = device or Device.unprobed()
    recipe_dir = recipe_path.parent.resolve()
    model = resolve_model(recipe, recipe_dir)

    template = recipe.template or derive_template(recipe.model, model.config)
    if template is None:
        raise RecipeError(
            f"template: cannot tell the chat template of {recipe.model!r}; set template: (for example qwen, llama3)"
        )
    templates = known_templates()
    if template not in templates:
        raise RecipeError(f"template: unknown LLaMA-Factory template {template!r}{did_you_mean(template, templates)}")

    datasets = ds.resolve_datasets(recipe.datasets, recipe_dir)
    n_samples = sum(d.n_samples for d in datasets)
    if recipe.max_samples:
        n_samples = sum(min(d.n_samples, recipe.max_samples) for d in datasets)

    notes: list[str] = []
    bf16, fp16, precision_note = _precision(recipe.precision, device)
    if precision_note:
        notes.append(precision_note)

    identity = recipe.identity.model_dump() if recipe.identity else None
    system_prompt = recipe.system_prompt or default_system_prompt(identity)

    plan = Plan(
        name=recipe.name, model=model, template=template,
        method="lora", method_reason="", finetuning_type="lora", quantization_bit=None,
        bf16=bf16, fp16=fp16, precision_note=precision_note,
        batch_size=1, gradient_accumulation=1, gradient_checkpointing=True,
        preprocessing_workers=_preprocessing_workers(n_samples),
        dataloader_workers=0 if n_samples < 2000 else min(4, os.cpu_count() or 1),
        epochs=recipe.epochs, learning_rate=recipe.learning_rate, cutoff_len=recipe.cutoff_len,
        lr_scheduler=recipe.lr_scheduler, warmup_ratio=recipe.warmup_ratio,
        lora_rank=recipe.lora.rank, lora_alpha=recipe.lora.alpha or 2 * recipe.lora.rank,
        lora_dropout=recipe.lora.dropout, lora_target=recipe.lora.target,
        max_samples=recipe.max_samples, val_size=recipe.val_size, seed=recipe.seed,
        logging_steps=recipe.logging_steps, save_steps=recipe.save_steps,
        datasets=datasets, n_samples=n_samples, identity=identity, system_prompt=system_prompt,
        extra=dict(recipe.llamafactory), device=device, out_dir=str(out_dir.absolute()), notes=notes,
    )
    memory.choose(plan, recipe)
    from wrapper import distributed

    budget = device.free_mem * memory.MARGIN if device.kind == "cuda" else None
    plan.layout = distributed.layout(recipe.resources, device, plan.memory, budget)
    device.world_size = plan.layout.world_size
    if plan.layout.world_size > 1:
        plan.notes.append(f"{plan.layout.world_size} processes, {plan.layout.strategy} ({plan.layout.reason})")
    return plan


def _precision(choice: str, device: Device) -> tuple[bool, bool, str | None]:
    if choice == "fp32":
        return False, False, None
    if choice == "fp16":
        if device.kind == "cpu":
            return False, False, "no CUDA GPU: fp16 switched off, training in fp32"
        return False, True, None
    # bf16 or auto
    if device.kind == "cpu":
        note = "no CUDA GPU: bf16 switched off, training in fp32" if choice == "bf16" else None
        return False, False, note
    if device.kind == "cuda" and not device.bf16:
        if choice == "bf16":
            return False, True, f"{device.name} has no bf16: using fp16"
        return False, True, None
    return True, False, None


def _preprocessing_workers(n_samples: int) -> int | None:
    # Each worker is a process that re-imports the tokenizer: ~5 s apiece. Below a few thousand
    # samples, one process tokenizes faster than any pool (78 s for 91 samples with 16 workers).
    if n_samples < 5000:
        return None
    return max(1, min(os.cpu_count() or 1, 16, n_samples // 5000))
