"""The memory planner: predicted peak GPU memory for a plan, and the choices that depend on it
(method: auto, batch size, gradient accumulation, gradient checkpointing, the liger kernel).

Peak memory is counted part by part, from the model's config.json (or a guess from a "7B"-style
size in the id before the download) and the data's real sample lengths:

    weights      bf16 (2 bytes/param), or 4-bit nf4 linears + bf16 embeddings for QLoRA
    optimizer    LoRA params in fp32 + grads + two Adam moments (16 bytes/param)
    activations  what autograd saves per token and layer (all layers, or with gradient
                 checkpointing each layer's input plus one layer recomputed in full)
    logits       bf16 logits, fp32 log-softmax and its gradient; the liger kernel's fused
                 linear-cross-entropy never builds them
    overhead     the CUDA context, cuBLAS and kernels (outside torch's allocator), the
                 allocator's rounding, and the blocks it keeps cached when batches differ in length

The per-token coefficients follow from what Qwen2/Llama layers save for backward; they are
checked against peak VRAM measured on an H100 (BENCH.md has the table, tests/test_memory.py
keeps the predictions within 15% of it). Nothing here imports torch.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from wrapper.plan import Plan
    from wrapper.recipe import Recipe

GiB = 2**30
MARGIN = 0.90                  # plan to use at most this share of the GPU's free memory
EFFECTIVE_BATCH = 8            # the tutorial's 1 x 8: same optimizer steps, reached in as few micro-batches as fit
CONTEXT = 0.75 * GiB           # CUDA context, cuBLAS, loaded kernels: outside torch's allocator (0.74 GiB measured)
ALLOCATOR_SLACK = 1.04         # reserved / allocated at the peak (the caching allocator's rounding)
# Batches of different lengths leave the caching allocator holding blocks of many sizes: over a whole
# run it reserves ~30% more than the activations and logits of the longest batch, and never less than
# ~0.25 GiB more (four full 3-epoch runs on the H100, BENCH.md). Fixed-length batches (packing, or
# data of one length) do not pay it.
VARYING_SLACK = 0.30
VARYING_FLOOR = 0.25 * GiB
TEMPLATE_TOKENS = 32           # chat markup + a default system prompt (qwen: 31 tokens)
TURN_TOKENS = 5                # markup per extra turn
REREAD_LIMIT = 64 * 2**20      # re-read dataset files up to this size for real lengths

# Bytes that autograd keeps per token per decoder layer, as coefficients of hidden size (h),
# attention width (q: heads x head_dim) and MLP width (i). HF modules: RMSNorm keeps an fp32 copy
# of its input (4h) and its bf16 output feeds the projections (2h), twice per layer; SDPA keeps
# q, k, v (repeated to q width for grouped-query attention with padding) and its output; o_proj
# keeps a contiguous copy; SwiGLU keeps gate, silu(gate), up and their product (4 x 2i).
# Liger: RMSNorm keeps its bf16 input and output (2 x 2h), SwiGLU only gate and up + product (3 x 2i).
ACT_HF = {"h": 12.0, "q": 10.0, "i": 8.0}
ACT_LIGER = {"h": 8.0, "q": 10.0, "i": 6.0}
LOGIT_BYTES = 14.0             # per token per vocab entry without liger: bf16 logits, fp32 log-softmax, 2 fp32 grads
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)   # 4-bit weight + uint8 absmax per 64 + fp32 per 256 absmax (double quant)

# Model types whose layers LLaMA-Factory 0.9.5 patches with the liger kernel.
LIGER_MODEL_TYPES = frozenset({
    "gemma", "gemma2", "gemma3", "gemma3_text", "glm", "glm4", "granite", "llama", "mistral", "mixtral", "olmo2",
    "phi3", "qwen2", "qwen3", "qwen3_moe",
})

# Dense bf16 tensor TFLOP/s by GPU name (substring, first match), for the predicted training time.
GPU_TFLOPS = [
    ("h200", 989.0), ("h100", 989.0), ("h800", 989.0), ("gh200", 989.0), ("b200", 2250.0),
    ("a100", 312.0), ("a800", 312.0), ("l40s", 362.0), ("l40", 181.0), ("a6000", 155.0),
    ("rtx 6000 ada", 365.0), ("4090", 165.0), ("3090", 71.0), ("a10g", 70.0), ("a10", 125.0),
    ("l4", 121.0), ("v100", 125.0), ("t4", 65.0),
]


# ------------------------------------------------------------------ the model

def model_shape(config: dict | None, model_id: str) -> dict:
    """Parameter counts from config.json, or a guess from the id's size ("7B") when not downloaded."""
    cfg = (config or {}).get("text_config", config) if config else None
    if cfg and "hidden_size" in cfg:
        h = cfg["hidden_size"]
        layers = cfg["num_hidden_layers"]
        inter = cfg.get("intermediate_size") or 4 * h
        heads = cfg.get("num_attention_heads") or max(1, h // 128)
        kv = cfg.get("num_key_value_heads") or heads
        head_dim = cfg.get("head_dim") or h // heads
        vocab = cfg.get("vocab_size", 151936)
        tied = bool(cfg.get("tie_word_embeddings", (config or {}).get("tie_word_embeddings", False)))
        attn = h * heads * head_dim * 2 + h * kv * head_dim * 2
        mlp = 3 * h * inter
        linear = layers * (attn + mlp)
        embed = vocab * h * (1 if tied else 2)
        return {"hidden": h, "layers": layers, "inter": inter, "vocab": vocab, "linear": linear,
                "embed": embed, "params": linear + embed, "kv_dim": kv * head_dim, "q_dim": heads * head_dim,
                "model_type": (config or {}).get("model_type") or cfg.get("model_type")}
    m = re.search(r"(\d+(?:\.\d+)?)\s*[bB](?![a-zA-Z])", model_id)
    billions = float(m.group(1)) if m else 7.0
    params = billions * 1e9
    # a Qwen2.5-like shape of that size: 12 h^2 per layer, layers ~ 28, vocab 151936
    layers = 24 if billions < 1 else 28 if billions < 10 else 48 if billions < 20 else 64 if billions < 50 else 80
    vocab = 151936
    h = max(512, int(((params - 2 * vocab * 1024) / (12 * layers)) ** 0.5 // 128 * 128))
    embed = vocab * h * 2
    linear = max(params - embed, 12 * layers * h * h)
    return {"hidden": h, "layers": layers, "inter": int(linear / layers / h / 3 - h * 2 / 3) or 4 * h,
            "vocab": vocab, "linear": linear, "embed": embed, "params": linear + embed, "kv_dim": h // 7 or 128,
            "q_dim": h, "model_type": None, "guessed": True}


def lora_params(shape: dict, rank: int, target: str) -> int:
    h, inter, layers = shape["hidden"], shape["inter"], shape["layers"]
    mods = {"q_proj": (h, shape["q_dim"]), "k_proj": (h, shape["kv_dim"]), "v_proj": (h, shape["kv_dim"]),
            "o_proj": (shape["q_dim"], h), "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    names = mods if target == "all" else [t.strip() for t in target.split(",") if t.strip() in mods]
    return int(layers * sum(rank * (mods[n][0] + mods[n][1]) for n in names))


def estimate(shape: dict, method: str, batch: int, seq: int, grad_ckpt: bool, rank: int = 8, target: str = "all",
             liger: bool = False, quant_bits: int = 4, dtype_bytes: int = 2, varying: bool = False) -> dict:
    """Predicted peak bytes on one GPU, by part. `seq` is the padded length of the longest batch;
    `varying`: the batches have different lengths (the allocator then caches blocks of many sizes)."""
    h, layers, inter, vocab = shape["hidden"], shape["layers"], shape["inter"], shape["vocab"]
    q = shape["q_dim"]
    temp = 0
    if method == "qlora":
        per = NF4_BYTES if quant_bits == 4 else 1.0 + 4 / 4096
        weights = shape["linear"] * per + shape["embed"] * 2
        temp = h * max(inter, q) * 2        # one weight dequantized to bf16 for the matmul
    else:
        weights = shape["params"] * dtype_bytes
    if method == "full":
        trainable = shape["params"]
        states = trainable * (4 + 4 + 4 + 4) - weights   # fp32 params (replace the bf16 ones), grads, Adam
        states = max(states, trainable * 12)
    else:
        trainable = lora_params(shape, rank, target)
        states = trainable * (4 + 4 + 4 + 4)             # fp32 params, grads, two Adam moments
    tokens = batch * seq
    c = ACT_LIGER if liger else ACT_HF
    per_layer = tokens * (c["h"] * h + c["q"] * q + c["i"] * inter)
    if grad_ckpt:
        acts = layers * tokens * h * 2 + per_layer        # each layer's input, plus one layer recomputed
    else:
        acts = layers * per_layer
    logits = 0 if liger else tokens * vocab * LOGIT_BYTES
    allocated = weights + states + acts + logits + temp
    overhead = allocated * (ALLOCATOR_SLACK - 1) + CONTEXT
    if varying:
        overhead += max(VARYING_SLACK * (acts + logits + temp), VARYING_FLOOR)
    total = allocated + overhead
    return {"weights": int(weights), "optimizer": int(states), "activations": int(acts + temp),
            "logits": int(logits), "overhead": int(overhead), "total": int(total), "trainable_params": int(trainable)}


# ------------------------------------------------------------------ the data

_CJK = re.compile(r"[\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]")


def text_tokens(text: str) -> float:
    """Tokens of `text` under a Qwen/Llama-3-style BPE: ~3.6 ASCII characters or ~1.3 CJK characters a token.
    Checked on the identity set against the real Qwen2.5 tokenizer (within about 10% for the longest samples)."""
    if text.isascii():
        return len(text) / 3.6
    cjk = len(_CJK.findall(text))
    other = len(text) - cjk - sum(1 for ch in text if ord(ch) < 128)
    return (len(text) - cjk - other) / 3.6 + cjk / 1.3 + other / 2.0


def row_tokens(row) -> int:
    """Estimated tokens of one alpaca or sharegpt sample, chat markup and default system prompt included."""
    if not isinstance(row, dict):
        return TEMPLATE_TOKENS
    texts: list[str] = []
    turns = 1
    for key in ("instruction", "input", "output", "system"):
        if isinstance(row.get(key), str):
            texts.append(row[key])
    for pair in row.get("history") or []:
        if isinstance(pair, (list, tuple)):
            texts.extend(str(x) for x in pair)
            turns += 1
    for key in ("conversations", "messages"):
        for t in row.get(key) or []:
            if isinstance(t, dict):
                texts.append(str(t.get("value", t.get("content", ""))))
                turns += 0.5
    return math.ceil(sum(text_tokens(t) for t in texts) + TEMPLATE_TOKENS + TURN_TOKENS * max(0, turns - 1))


def _rows(spec, identity: dict | None) -> list | None:
    from wrapper import datasets as ds

    if spec.source is None:
        rows = ds.identity_rows()
        if identity:
            def fill(v):
                if not isinstance(v, str):
                    return v
                # user text is the replacement, never a pattern: backslashes and all stay as written
                v = re.sub(r"\{\{\s*name\s*\}\}", lambda _: identity["name"], v)
                return re.sub(r"\{\{\s*author\s*\}\}", lambda _: identity["author"], v)
            rows = [{k: fill(v) for k, v in r.items()} for r in rows]
        return rows
    path = Path(spec.source)
    try:
        if path.stat().st_size > REREAD_LIMIT:
            return None
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        rows = json.loads(text)
        return rows if isinstance(rows, list) else None
    except (OSError, ValueError):
        return None


def sample_lengths(plan: Plan) -> list[int]:
    """Estimated token length of every training sample (truncated at cutoff_len)."""
    lengths: list[int] = []
    for d in plan.datasets:
        rows = _rows(d, plan.identity)
        if rows is None:  # too large to re-read: the rough byte-based estimate from datasets.py
            n = min(d.n_samples, plan.max_samples or d.n_samples)
            lengths += [d.est_tokens_mean] * max(0, n - 1) + [d.est_tokens_max]
            continue
        if plan.max_samples:
            rows = rows[: plan.max_samples]
        lengths += [row_tokens(r) for r in rows]
    return [min(plan.cutoff_len, n) for n in lengths] or [min(plan.cutoff_len, TEMPLATE_TOKENS)]


def _round8(n: int) -> int:
    return -(-n // 8) * 8   # LLaMA-Factory pads each batch to a multiple of 8


def padded_tokens_per_epoch(lengths: list[int], batch: int, seed: int = 0) -> int:
    """Tokens the GPU computes in one epoch: each batch padded to its longest sample (shuffled order)."""
    order = list(lengths)
    random.Random(seed).shuffle(order)
    return sum(len(order[i:i + batch]) * _round8(max(order[i:i + batch])) for i in range(0, len(order), batch))


# ------------------------------------------------------------------ the machine

def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None and importlib.util.find_spec("triton") is not None


def bnb_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def gpu_tflops(name: str) -> float | None:
    low = name.lower()
    for key, tflops in GPU_TFLOPS:
        if key in low:
            return tflops
    return None


# Measured on one H100 (BENCH.md, 2026-11-28). At identity-sized batches a micro-step is bound by Python
# and kernel launches (~6.5 ms per layer for LoRA on all linear layers with cuDNN attention off, ~1.9x
# that for 4-bit QLoRA with checkpointing), not by FLOPs. Start-up and shut-down (imports ~15 s,
# tokenizer, data, LoRA and trainer set-up, saving, exit) cost ~22 s on top of reading the weights
# (23.5 s before lfw's fast exit, which took 1.4 s off the end of the run), and bitsandbytes' import adds
# ~5 s to a quantized run.
MFU = {"lora": 0.25, "qlora": 0.12, "full": 0.30}
LAYER_STEP_S = 0.0065
QLORA_STEP = 1.9               # dequantizing kernels
CKPT_STEP = 1.25               # recomputation
FIRST_STEPS_S = 2.0            # cuBLAS set-up and the first steps
STARTUP_S = 22.0
BNB_IMPORT_S = 5.0
LOAD_GBPS = 5.0


def predict_time(shape: dict, method: str, tokens_per_epoch: int, micro_steps_per_epoch: int, epochs: float,
                 grad_ckpt: bool, gpu_name: str) -> dict | None:
    """Predicted seconds of training and of the whole run; compute scaled from the H100 by the GPU's bf16
    TFLOP/s. None when the GPU is not in the table."""
    tflops = gpu_tflops(gpu_name)
    if tflops is None:
        return None
    n = shape["linear"] + shape["embed"] / 2   # the lm_head is a matmul too
    flops_per_token = 2 * n * (3 if method == "full" else 2) + (2 * n if grad_ckpt else 0)
    compute = epochs * tokens_per_epoch * flops_per_token / (tflops * 1e12 * MFU.get(method, 0.25))
    per_step = shape["layers"] * LAYER_STEP_S * (QLORA_STEP if method == "qlora" else 1) * (
        CKPT_STEP if grad_ckpt else 1)
    launch = math.ceil(epochs * micro_steps_per_epoch) * per_step
    train = compute + launch + FIRST_STEPS_S
    startup = STARTUP_S + (BNB_IMPORT_S if method == "qlora" else 0) + shape["params"] * 2 / (LOAD_GBPS * 1e9)
    return {"train_s": round(train, 1), "startup_s": round(startup, 1), "total_s": round(train + startup, 1),
            "gpu_tflops": tflops}


# ------------------------------------------------------------------ choosing

def _flag(extra: dict, key: str):
    v = extra.get(key)
    return None if v is None else bool(v)


def choose(plan: Plan, recipe: Recipe) -> None:
    """Fill method, batch, accumulation, checkpointing and the liger kernel into the plan, with the predicted
    peak memory. Values set in the recipe (its keys, or the same LLaMA-Factory keys under `llamafactory:`) win."""
    from wrapper.recipe import RecipeError

    dev = plan.device
    x = plan.extra
    shape = model_shape(plan.model.config, plan.model.id)
    lengths = sample_lengths(plan)
    packing = bool(x.get("neat_packing") or x.get("packing"))
    seq = plan.cutoff_len if packing else min(plan.cutoff_len, _round8(max(lengths)))
    varying = not packing and len({min(plan.cutoff_len, _round8(n)) for n in lengths}) > 1
    rank, target = plan.lora_rank, plan.lora_target
    dtype_bytes = 2 if (plan.bf16 or plan.fp16 or dev.kind != "cpu") else 4
    quant_bits = int(x.get("quantization_bit") or recipe.quantization_bit)

    # liger: measured on an H100 (BENCH.md), its kernels are no faster on identity-sized batches and triton
    # compiles them on first use (~7 s), but its fused cross-entropy never builds the logits. So it is a
    # memory tool: tried only when the plan does not fit without it. A recipe's enable_liger_kernel wins.
    liger_set = _flag(x, "enable_liger_kernel")
    liger_ok = dev.kind == "cuda" and liger_available() and shape.get("model_type") in LIGER_MODEL_TYPES

    batch_set = recipe.batch_size or x.get("per_device_train_batch_size")
    accum_set = recipe.gradient_accumulation or x.get("gradient_accumulation_steps")
    ckpt_set = recipe.gradient_checkpointing
    if ckpt_set is None and x.get("disable_gradient_checkpointing") is not None:
        ckpt_set = not x["disable_gradient_checkpointing"]
    method_set = recipe.method
    if method_set == "auto" and x.get("quantization_bit"):
        method_set = "qlora"

    budget = dev.free_mem * MARGIN if dev.kind == "cuda" else None

    def est(method: str, batch: int, ckpt: bool, liger: bool) -> dict:
        return estimate(shape, method, batch, seq, ckpt, rank, target, liger, quant_bits, dtype_bytes, varying)

    if method_set != "auto":
        methods = [method_set]
    elif dev.kind == "cuda":
        methods = ["lora", "qlora"]
    else:
        methods = ["lora"]  # CPU: no GPU memory to save and 4-bit is slow; unprobed: assume LoRA
    ckpt_options = [ckpt_set] if ckpt_set is not None else [False, True]
    liger_options = [liger_set] if liger_set is not None else [False, True] if liger_ok else [False]
    # fastest first: no checkpointing (a third less compute), then the liger kernel if that lets it fit
    knobs = [(c, lg) for c in ckpt_options for lg in liger_options]
    batch_options = [int(batch_set)] if batch_set else _batch_options(plan, dev)

    chosen = None
    if budget is None:
        chosen = (methods[0], batch_options[0], ckpt_options[0], liger_options[0])
    else:
        for method in methods:
            for batch in batch_options:          # largest batch first: steps cost ~the same at these sizes
                for ckpt, lg in knobs:
                    if est(method, batch, ckpt, lg)["total"] <= budget:
                        chosen = (method, batch, ckpt, lg)
                        break
                if chosen:
                    break
            if chosen:
                break
    if chosen is None:
        raise RecipeError(_does_not_fit(plan, shape, seq, methods, batch_options, knobs[-1], est, budget,
                                        method_set, bool(batch_set)))
    method, batch, ckpt, liger = chosen
    if ckpt_set is None and dev.kind != "cuda":
        # CPU: memory is plentiful and recomputation costs time. Unprobed GPU: the safe choice.
        ckpt = dev.kind == "unprobed"
    if method == "qlora" and dev.kind == "cuda" and not bnb_available():
        plan.notes.append("bitsandbytes is not installed: QLoRA needs it (pip install bitsandbytes)")
    plan.method = method
    plan.finetuning_type = "full" if method == "full" else "lora"
    plan.quantization_bit = quant_bits if method == "qlora" else None
    plan.batch_size = batch
    plan.gradient_checkpointing = ckpt
    plan.gradient_accumulation = int(accum_set or max(1, EFFECTIVE_BATCH // batch))
    plan.liger_kernel = bool(liger)
    e = est(method, batch, ckpt, liger)
    tokens_epoch = (sum(lengths) if packing else padded_tokens_per_epoch(lengths, batch, plan.seed))
    plan.memory = {k: int(v) for k, v in e.items()} | {
        "seq_len": seq, "varying_lengths": varying, "budget": int(budget or 0), "params": int(shape["params"]),
        "tokens_per_epoch": int(tokens_epoch), "longest_sample": max(lengths), "liger": bool(liger),
        "packing": packing,
    }
    if dev.kind == "cuda":
        micro = -(-len(lengths) // batch) if not packing else -(-sum(lengths) // (plan.cutoff_len * batch))
        t = predict_time(shape, method, tokens_epoch, micro, plan.epochs, ckpt, dev.name)
        if t:
            plan.memory["time"] = t
    if method_set == "auto":
        plan.method_reason = (
            "no CUDA GPU: LoRA on the CPU" if dev.kind == "cpu"
            else "GPU not probed: LoRA assumed" if dev.kind == "unprobed"
            else f"LoRA in bf16 fits {dev.free_mem / GiB:.0f} GiB free" if method == "lora"
            else f"LoRA in bf16 would need {est('lora', batch_options[-1], *knobs[-1])['total'] / GiB:.1f} GiB, "
                 f"more than {MARGIN:.0%} of {dev.free_mem / GiB:.1f} GiB free: 4-bit QLoRA"
        )
    else:
        plan.method_reason = "set in the recipe"


def _batch_options(plan: Plan, dev) -> list[int]:
    if dev.kind == "cpu":
        return [max(1, min(4, plan.n_samples))]
    cap = max(1, min(EFFECTIVE_BATCH, plan.n_samples))
    return [b for b in (8, 4, 2, 1) if b <= cap] or [1]


def _does_not_fit(plan, shape, seq, methods, batch_options, knob, est, budget, method_set, batch_fixed) -> str:
    dev = plan.device
    ckpt, liger = knob
    smallest = min(((m, est(m, batch_options[-1], ckpt, liger)["total"]) for m in methods), key=lambda t: t[1])
    m, need = smallest
    what = "QLoRA 4-bit" if m == "qlora" else "LoRA bf16" if m == "lora" else "full fine-tuning"
    how = ", ".join(x for x in ("gradient checkpointing" if ckpt else "", "the liger kernel" if liger else "") if x)
    head = (f"{plan.model.id} does not fit {dev.name}: {what} at batch {batch_options[-1]}"
            f"{' with ' + how if how else ''} needs about {need / GiB:.1f} GiB, and {MARGIN:.0%} of the "
            f"{dev.free_mem / GiB:.1f} GiB free is {budget / GiB:.1f} GiB.")
    hints = []
    # the largest model of this family that would fit, as LoRA and as QLoRA, at this batch and settings
    fixed = estimate(shape, "lora", batch_options[-1], seq, ckpt, plan.lora_rank, plan.lora_target, liger)
    act_logits = (fixed["activations"] + fixed["logits"]) * (1 + VARYING_SLACK) + CONTEXT
    for name, per_param in (("LoRA bf16", 2.0), ("QLoRA 4-bit", 0.62)):
        fits_b = (budget / ALLOCATOR_SLACK - act_logits) / per_param / 1e9
        if fits_b > 0.3:
            hints.append(f"{name} fits models up to about {fits_b:.0f}B" if fits_b >= 1.5
                         else f"{name} fits models up to about {fits_b:.1f}B")
    if "qlora" not in methods and method_set != "auto":
        hints.append("try method: qlora (or method: auto)")
    if batch_fixed and batch_options[-1] > 1:
        hints.append("a smaller batch_size")
    if seq > 512:
        hints.append(f"a smaller cutoff_len (now {plan.cutoff_len})")
    if dev.count > 1:
        hints.append("resources: {strategy: zero3} to shard the model over the GPUs")
    return head + (" On this GPU: " + "; ".join(hints) + "." if hints else "")
