"""LLaMA-Factory's own argument parsers applied to rendered YAMLs (imports llamafactory: slow, so
only `lfw validate` and `lfw train` use it), and the generated list of keys and templates that
`render` checks against without importing llamafactory."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import sys
from pathlib import Path

import yaml

from wrapper.errors import LfwError
from wrapper.paths import LF_KEYS_FILE


def _parsers():
    from llamafactory.hparams import parser as p

    return {"train.yaml": p._parse_train_args, "infer.yaml": p._parse_infer_args,
            "infer_base.yaml": p._parse_infer_args, "export.yaml": p._parse_infer_args}


def check_with_llamafactory(files: dict[str, Path]) -> None:
    """Parse each rendered YAML with the dataclass parser `llamafactory-cli` uses; raise LfwError on refusal."""
    parsers = _parsers()
    for label, path in files.items():
        if label not in parsers:
            continue
        args = yaml.safe_load(path.read_text(encoding="utf-8"))
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                parsers[label](args)
        except (ValueError, TypeError, ImportError, AssertionError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LfwError(f"{path}: LLaMA-Factory rejects it: {first}") from None


def live_keys_and_templates() -> dict:
    from llamafactory.data.template import TEMPLATES
    from llamafactory.hparams import (
        DataArguments,
        EvaluationArguments,
        FinetuningArguments,
        GeneratingArguments,
        ModelArguments,
        TrainingArguments,
    )
    from llamafactory.hparams.training_args import RayArguments

    keys = set()
    for cls in (ModelArguments, DataArguments, TrainingArguments, FinetuningArguments, GeneratingArguments,
                EvaluationArguments, RayArguments):
        keys.update(f.name for f in dataclasses.fields(cls) if f.init)
    import llamafactory

    return {"llamafactory": llamafactory.__version__, "keys": sorted(keys), "templates": sorted(TEMPLATES)}


if __name__ == "__main__":
    # python -m wrapper.lfcheck --write-keys   regenerates templates/llamafactory_keys.json
    if sys.argv[1:] == ["--write-keys"]:
        LF_KEYS_FILE.write_text(json.dumps(live_keys_and_templates(), indent=1) + "\n")
        print(f"wrote {LF_KEYS_FILE}")
