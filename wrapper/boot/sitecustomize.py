"""Start-up hook for the Python processes that lfw starts for LLaMA-Factory.

lfw puts this folder first on PYTHONPATH of `llamafactory-cli`, so the hook also runs in every rank
that torchrun starts from it. It makes the modules named in LFW_HIDE_MODULES (comma-separated) look
not installed: `import` raises ImportError and `importlib.util.find_spec` returns None, which is how
transformers, peft and LLaMA-Factory test for optional packages. lfw hides bitsandbytes from runs
that do not quantize (peft's LoRA layer imports it otherwise: ~5 s on a GPU machine). Then the
sitecustomize this one shadows, if any, runs as usual.
"""

import os
import sys


def _hide() -> None:
    for name in os.environ.get("LFW_HIDE_MODULES", "").split(","):
        name = name.strip()
        if name and name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]


def _chain() -> None:
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


_hide()
_chain()
