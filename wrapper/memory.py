"""The memory planner: predicted peak GPU memory for a plan, and the choices that depend on it
(method: auto, batch size, gradient accumulation, gradient checkpointing).

The model is counted from config.json (or guessed from a "7B"-style size in the id before the
download). The coefficients are calibrated against peak VRAM measured on an H100 (see BENCH.md).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from wrapper.plan import Plan
    from wrapper.recipe import Recipe

GiB = 2**30
CUDA_OVERHEAD = 0.6 * GiB      # context, cuBLAS workspace, allocator slack
MARGIN = 0.90                  # plan to use at most this share of free memory
EFFECTIVE_BATCH = 8            # the tutorial's 1 x 8, reached with as few accumulation steps as fit


def model_shape(config: dict | None, model_id: str) -> dict:
    """Parameter counts from config.json, or a guess from the id's size ("7B") when not downloaded."""
    if config and "hidden_size" in config:
        cfg = config.get("text_config", config)
        h = cfg["hidden_size"]
        layers = cfg["num_hidden_layers"]
        inter = cfg.get("intermediate_size", 4 * h)
        heads = cfg.get("num_attention_heads", max(1, h // 128))
        kv = cfg.get("num_key_value_heads", heads)
        head_dim = cfg.get("head_dim") or h // heads
        vocab = cfg.get("vocab_size", 151936)
        tied = bool(cfg.get("tie_word_embeddings", False))
        attn = h * heads * head_dim * 2 + h * kv * head_dim * 2
        mlp = 3 * h * inter
        linear = layers * (attn + mlp)
        embed = vocab * h * (1 if tied else 2)
        return {"hidden": h, "layers": layers, "inter": inter, "vocab": vocab, "linear": linear,
                "embed": embed, "params": linear + embed, "kv_dim": kv * head_dim, "q_dim": heads * head_dim}
    m = re.search(r"(\d+(?:\.\d+)?)\s*[bB](?![a-zA-Z])", model_id)
    billions = float(m.group(1)) if m else 7.0
    params = billions * 1e9
    h = int((params / 12 / 28) ** 0.5 // 128 * 128) or 896
    return {"hidden": h, "layers": 28, "inter": 4 * h, "vocab": 151936, "linear": params * 0.85,
            "embed": params * 0.15, "params": params, "kv_dim": h // 4, "q_dim": h, "guessed": True}


def lora_params(shape: dict, rank: int, target: str) -> int:
    h, inter, layers = shape["hidden"], shape["inter"], shape["layers"]
    mods = {"q_proj": (h, shape["q_dim"]), "k_proj": (h, shape["kv_dim"]), "v_proj": (h, shape["kv_dim"]),
            "o_proj": (shape["q_dim"], h), "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    names = mods if target == "all" else [t.strip() for t in target.split(",") if t.strip() in mods]
    return layers * sum(rank * (mods[n][0] + mods[n][1]) for n in names)


def estimate(shape: dict, method: str, batch: int, seq: int, grad_ckpt: bool, rank: int, target: str,
             liger: bool = False) -> dict:
    """Predicted peak bytes on one GPU, by part."""
    h, layers, inter, vocab = shape["hidden"], shape["layers"], shape["inter"], shape["vocab"]
    if method == "qlora":
        weights = shape["linear"] * 0.5 * 1.07 + shape["embed"] * 2   # nf4 + absmax/quant state; bf16 embeddings
    else:
        weights = shape["params"] * 2
    if method == "full":
        trainable = shape["params"]
        states = trainable * (2 + 4 + 4)            # bf16 grads + fp32 Adam moments
    else:
        trainable = lora_params(shape, rank, target)
        states = trainable * (4 + 4 + 4 + 4)        # fp32 params, grads, two Adam moments
    tokens = batch * seq
    if grad_ckpt:
        # checkpointed layer inputs, plus one layer recomputed in full during backward
        acts = layers * tokens * h * 2 + tokens * (18 * h + 6 * inter) * 2
    else:
        acts = layers * tokens * (18 * h + 6 * inter) * 2
    # logits in bf16, the fp32 upcast for the loss and its gradient; liger's fused loss never builds them
    logits = 0 if liger else tokens * vocab * (2 + 4 + 4)
    total = weights + states + acts + logits + CUDA_OVERHEAD
    return {"weights": weights, "optimizer": states, "activations": acts, "logits": logits,
            "overhead": CUDA_OVERHEAD, "total": total, "trainable_params": trainable}


def _seq_len(plan: "Plan") -> int:
    longest = max(d.est_tokens_max for d in plan.datasets)
    return min(plan.cutoff_len, longest)


def choose(plan: "Plan", recipe: "Recipe") -> None:
    """Fill method, batch, accumulation and checkpointing into the plan; values set in the recipe win."""
    from wrapper.recipe import RecipeError

    shape = model_shape(plan.model.config, plan.model.id)
    seq = _seq_len(plan)
    dev = plan.device
    liger = bool(plan.extra.get("enable_liger_kernel"))
    rank, target = plan.lora_rank, plan.lora_target
    budget = dev.free_mem * MARGIN if dev.kind == "cuda" else None

    def fits(method: str, batch: int, ckpt: bool) -> bool:
        return budget is None or estimate(shape, method, batch, seq, ckpt, rank, target, liger)["total"] <= budget

    methods = [recipe.method] if recipe.method != "auto" else ["lora", "qlora"]
    if dev.kind != "cuda" and recipe.method == "auto":
        methods = ["lora"]  # no GPU memory to save; bitsandbytes 4-bit is slower on CPU
    ckpt_options = [recipe.gradient_checkpointing] if recipe.gradient_checkpointing is not None else [False, True]
    batch_options = [recipe.batch_size] if recipe.batch_size else _batch_options(plan, dev)

    chosen = None
    for method in methods:
        for batch in batch_options:          # largest batch first
            for ckpt in ckpt_options:        # without checkpointing first: faster
                if fits(method, batch, ckpt):
                    chosen = (method, batch, ckpt)
                    break
            if chosen:
                break
        if chosen:
            break
    if chosen is None:
        need = estimate(shape, methods[-1], batch_options[-1], seq, True, rank, target, liger)["total"]
        raise RecipeError(
            f"method: {methods[-1]} at batch {batch_options[-1]} needs about {need / GiB:.1f} GiB but "
            f"{dev.name} has {dev.free_mem / GiB:.1f} GiB free; try method: qlora, a smaller cutoff_len, "
            "or a smaller model"
        )
    method, batch, ckpt = chosen
    if dev.kind != "cuda" and recipe.gradient_checkpointing is None:
        # CPU: memory is plentiful and recomputation costs time. Unprobed GPU: the safe choice.
        ckpt = dev.kind == "unprobed"
    plan.method = method
    plan.finetuning_type = "full" if method == "full" else "lora"
    plan.quantization_bit = recipe.quantization_bit if method == "qlora" else None
    plan.batch_size = batch
    plan.gradient_checkpointing = ckpt
    plan.gradient_accumulation = recipe.gradient_accumulation or max(1, EFFECTIVE_BATCH // batch)
    est = estimate(shape, method, batch, seq, ckpt, rank, target, liger)
    plan.memory = {k: int(v) for k, v in est.items()} | {"seq_len": seq, "budget": int(budget or 0),
                                                          "params": int(shape["params"])}
    if recipe.method == "auto":
        plan.method_reason = (
            "no CUDA GPU: LoRA on the CPU" if dev.kind == "cpu"
            else "GPU not probed: LoRA assumed" if dev.kind == "unprobed"
            else f"{method} fits {dev.free_mem / GiB:.0f} GiB free (predicted {est['total'] / GiB:.1f} GiB)"
        )
    else:
        plan.method_reason = "set in the recipe"


def _batch_options(plan: "Plan", dev) -> list[int]:
    if dev.kind == "cpu":
        return [min(4, plan.n_samples)]
    cap = max(1, min(EFFECTIVE_BATCH, plan.n_samples))
    return [b for b in (8, 4, 2, 1) if b <= cap] or [1]
