"""recipe -> plan -> rendered files, the part every command that starts from a recipe shares."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from wrapper.device import Device
from wrapper.plan import Plan, make_plan
from wrapper.recipe import Recipe, RecipeError, load_recipe, read_recipe_text
from wrapper.render import render_files


@dataclass
class Prepared:
    recipe: Recipe
    recipe_path: Path
    plan: Plan
    files: dict[str, Path]


def plan_recipe(recipe_path: str | Path, out_dir: str | Path, device: Device | None = None) -> tuple[Recipe, Plan]:
    path = Path(recipe_path)
    recipe = load_recipe(path)
    try:
        return recipe, make_plan(recipe, path, Path(out_dir), device)
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from None


def prepare(recipe_path: str | Path, out_dir: str | Path, device: Device | None = None) -> Prepared:
    path = Path(recipe_path)
    recipe, plan = plan_recipe(path, out_dir, device)
    files = render_files(plan, read_recipe_text(path))
    return Prepared(recipe, path, plan, files)


def describe(plan: Plan) -> list[str]:
    """The few lines a user reads before a run starts (`lfw plan`, `lfw train`)."""
    m = plan.memory or {}
    prec = "bf16" if plan.bf16 else "fp16" if plan.fp16 else "fp32"
    q = f" {plan.quantization_bit}-bit" if plan.quantization_bit else ""
    lines = [
        f"model     {plan.model.id}" + ("" if plan.model.local or plan.model.on_disk else f"  (to download from {plan.model.hub})"),
        f"template  {plan.template}",
        f"method    {plan.method}{q}, {prec} ({plan.method_reason})",
        f"data      {', '.join(d.name for d in plan.datasets)}: {plan.n_samples} samples",
        f"train     {plan.epochs:g} epochs x {plan.steps_per_epoch} steps, batch {plan.batch_size} x accumulation "
        f"{plan.gradient_accumulation}, lr {plan.learning_rate:g}, cutoff {plan.cutoff_len}",
    ]
    if plan.device.kind != "cpu":
        lines.append(f"speed     gradient checkpointing {'on' if plan.gradient_checkpointing else 'off'}, "
                     f"liger kernel {'on' if plan.liger_kernel else 'off'}, sdpa attention"
                     + (", packing" if m.get("packing") else ""))
    if m and plan.device.kind != "cpu":
        gib = 2**30
        free = (f" of {plan.device.free_mem / gib:.1f} GiB free" if plan.device.kind == "cuda"
                else " (GPU not probed)")
        lines.append(
            f"memory    predicted peak {m['total'] / gib:.1f} GiB{free}: weights {m['weights'] / gib:.1f}, "
            f"optimizer {m['optimizer'] / gib:.1f}, activations {m['activations'] / gib:.1f}, logits "
            f"{m['logits'] / gib:.1f}, CUDA + allocator {m['overhead'] / gib:.1f} (longest sample ~{m['seq_len']} tokens)")
    t = m.get("time")
    if t:
        lines.append(f"time      ~{t['train_s']:.0f} s training, ~{t['total_s']:.0f} s in all (a rough estimate for "
                     f"this GPU, scaled from an H100)")
    lines.append(f"device    {plan.device}")
    if plan.identity:
        lines.insert(1, f"identity  {plan.identity['name']} by {plan.identity['author']}")
    return lines + [f"note      {n}" for n in plan.notes]
