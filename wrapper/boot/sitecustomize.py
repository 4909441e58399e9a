"""Start-up hook for the Python processes that lfw starts for LLaMA-Factory.

lfw puts this folder first on PYTHONPATH of `llamafactory-cli`, so the hook also runs in every rank
that torchrun starts from it. Four things, each switched on by lfw through the environment
(wrapper.launch.child_env; measured in BENCH.md):

- LFW_HIDE_MODULES (comma-separated): those modules look not installed: `import` raises ImportError
  and `importlib.util.find_spec` returns None, which is how transformers, peft and LLaMA-Factory test
  for optional packages. lfw hides bitsandbytes and scipy from runs that do not quantize (peft's LoRA
  layer imports bitsandbytes otherwise: ~5 s on a GPU machine), sklearn, which only transformers'
  assisted generation imports (1.6 s), and matplotlib, which only LLaMA-Factory's loss plot needs (lfw
  draws that plot itself).
- LFW_FAST_START=1: two shortcuts in transformers' start-up that give the same results sooner.
  `AutoProcessor.from_pretrained` fails at once, with OSError, for a local model folder that defines
  no processor (no processor, image, video or feature-extractor config, no processor_class or
  AutoProcessor auto_map, a model type transformers maps to no processor). There transformers would
  load the tokenizer a second time and return it, and LLaMA-Factory drops any result that is not a
  Processor: its OSError path gives the same None, ~2 s sooner. And `keys()` of the auto-class
  mappings (LLaMA-Factory asks `type(config) in AutoModelForImageTextToText._model_mapping.keys()`,
  and so on, to choose a model class) answers `in` by importing only the configuration classes whose
  name matches, as the mapping's own `in` does, not the ~100 configuration modules of every mapped
  model (2-4 s); any other use of the list computes it whole, as before.
- LFW_CUDNN_ATTENTION=0: torch's scaled-dot-product attention does not use its cuDNN backend. That
  backend builds an execution plan for every new sequence length (H100, torch 2.11: 2.3 s for the
  first, ~1.1 s for each new length, forward and backward), and training batches padded to their
  longest sample, like generation with a growing cache, keep bringing new lengths; the memory-efficient
  kernel it falls back to needs none (0.03 s). 7B LoRA on an H100: train_runtime 18.3 s -> 13.8 s.

- LFW_FAST_EXIT=1: when LLaMA-Factory's `run_exp` (train) or `export_model` (export) has returned
  normally, the process ends as Python would, less the teardown of every module and object that
  follows (1.4 s on a 2-core CPU, more with a model on a GPU): the atexit handlers run, logging is shut
  down, the streams are flushed, then os._exit(0). Not while a non-daemon thread is still alive (a
  normal exit would wait for it) or under Ray.

Then the sitecustomize this one shadows, if any, runs as usual.
"""

import os
import sys

_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json")


def _hide() -> None:
    for name in os.environ.get("LFW_HIDE_MODULES", "").split(","):
        name = name.strip()
        if name and name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]


def defines_no_processor(path, processor_names) -> bool:
    """True when `path` is a local folder from which AutoProcessor can only return a non-Processor."""
    import json

    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        return False
    if any(os.path.exists(os.path.join(path, f)) for f in _PROCESSOR_FILES):
        return False
    model_type = None
    for name in ("tokenizer_config.json", "config.json"):
        try:
            with open(os.path.join(path, name), encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            data = {}
        if not isinstance(data, dict):
            return False
        if data.get("processor_class") or "AutoProcessor" in (data.get("auto_map") or {}):
            return False
        if name == "config.json":
            model_type = data.get("model_type")
    return model_type is not None and model_type not in processor_names


def _patch_processor(module) -> None:
    cls = module.AutoProcessor
    original = cls.from_pretrained.__func__
    names = getattr(module, "PROCESSOR_MAPPING_NAMES", None)
    if names is None:
        return

    def from_pretrained(klass, pretrained_model_name_or_path, *args, **kwargs):
        if defines_no_processor(pretrained_model_name_or_path, names):
            raise OSError(f"{pretrained_model_name_or_path} defines no processor (lfw: LFW_FAST_START)")
        return original(klass, pretrained_model_name_or_path, *args, **kwargs)

    cls.from_pretrained = classmethod(from_pretrained)


class _AfterImport:
    """A meta-path finder that lets the real finders load `name`, then calls `then(module)`."""

    def __init__(self, name, then):
        self.name, self.then = name, then

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader, then = spec.loader, self.then
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module):
            run(module)
            try:
                then(module)
            except Exception:  # a transformers we do not know: leave it as it is
                pass

        loader.exec_module = exec_module
        return spec


class MappingKeys:
    """`_LazyAutoMapping.keys()`, made whole only when it is iterated, indexed, measured or added to."""

    __hash__ = None  # type: ignore[assignment]

    def __init__(self, mapping, whole):
        self._mapping, self._whole, self._list = mapping, whole, None

    def _all(self) -> list:
        if self._list is None:
            self._list = self._whole(self._mapping)
        return self._list

    def __contains__(self, item) -> bool:
        if self._list is not None:
            return item in self._list
        m = self._mapping
        if item in m._extra_content:
            return True
        name = getattr(item, "__name__", None)
        return any(cname == name and key in m._model_mapping and m._load_attr_from_module(key, cname) is item
                   for key, cname in m._config_mapping.items())

    def __iter__(self):
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())

    def __getitem__(self, i):
        return self._all()[i]

    def __add__(self, other) -> list:
        return self._all() + list(other)

    def __radd__(self, other) -> list:
        return list(other) + self._all()

    def __eq__(self, other) -> bool:
        return self._all() == (other._all() if isinstance(other, MappingKeys) else other)

    def __repr__(self) -> str:
        return repr(self._all())


def _patch_auto_keys(module) -> None:
    cls = module._LazyAutoMapping
    whole = cls.keys
    if getattr(whole, "_lfw", False):
        return

    def keys(self):
        return MappingKeys(self, whole)

    keys._lfw = True  # type: ignore[attr-defined]
    cls.keys = keys


def _no_cudnn_attention(module) -> None:
    module.backends.cuda.enable_cudnn_sdp(False)


def _exit_now() -> None:
    import atexit
    import logging
    import threading

    if os.environ.get("USE_RAY", "").lower() in ("1", "true", "y"):
        return
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        return
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except Exception:  # closed or replaced by something without flush
            pass
    os._exit(0)


def _exit_after(*names):
    def patch(module) -> None:
        for name in names:
            run = getattr(module, name)

            def done_then_exit(*args, _run=run, **kwargs):
                result = _run(*args, **kwargs)
                _exit_now()
                return result

            setattr(module, name, done_then_exit)

    return patch


def _install_hooks() -> None:
    if os.environ.get("LFW_FAST_START") == "1":
        sys.meta_path.insert(0, _AfterImport("transformers.models.auto.processing_auto", _patch_processor))
        sys.meta_path.insert(0, _AfterImport("transformers.models.auto.auto_factory", _patch_auto_keys))
    if os.environ.get("LFW_FAST_EXIT") == "1":
        sys.meta_path.insert(0, _AfterImport("llamafactory.train.tuner", _exit_after("run_exp", "export_model")))
    if os.environ.get("LFW_CUDNN_ATTENTION") == "0":
        sys.meta_path.insert(0, _AfterImport("torch", _no_cudnn_attention))


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
_install_hooks()
_chain()
