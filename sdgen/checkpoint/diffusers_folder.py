"""Read a diffusers model folder: model_index.json, each component's config.json and its safetensors weights.

Layout (as written by ``save_pretrained`` and found on the Hugging Face Hub)::

    model_index.json
    scheduler/scheduler_config.json
    unet/config.json          unet/diffusion_pytorch_model[.fp16].safetensors
    vae/config.json           vae/diffusion_pytorch_model[.fp16].safetensors
    text_encoder/config.json  text_encoder/model[.fp16].safetensors
    text_encoder_2/...        (SDXL)

Large weights may be sharded: ``<base>.safetensors.index[.<variant>].json`` maps each tensor to its shard file.

Text encoders get one canonical naming: hub files say ``text_model.encoder.layers.0...`` while transformers 5
``save_pretrained`` of a CLIPTextModel writes ``encoder.layers.0...``; both become the latter (the unprefixed
form), ``text_projection.weight`` stays as it is, and the ``embeddings.position_ids`` buffer is dropped.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from ..errors import BadModelFileError, ModelNotFoundError
from .pickled import CONVERT_HINT, PICKLE_SUFFIXES
from .safetensors_file import SafetensorsFile

WEIGHT_BASENAMES = ("diffusion_pytorch_model", "model")
# When no variant is asked for and the full-precision file is absent, variants are tried in this order (then
# any other variant, alphabetically).
PREFERRED_VARIANTS = ("fp16", "bf16")
TEXT_MODEL_PREFIX = "text_model."
_DROPPED_TEXT_ENCODER_BUFFERS = ("embeddings.position_ids",)

_VARIANT_FILE = re.compile(r"^(?:%s)\.(\w+)\.safetensors$" % "|".join(WEIGHT_BASENAMES))
_VARIANT_INDEX = re.compile(r"^(?:%s)\.safetensors\.index\.(\w+)\.json$" % "|".join(WEIGHT_BASENAMES))


def read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path``; BadModelFileError (naming ``what`` and the path) when missing or malformed."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadModelFileError(f"{path}: {what} is missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BadModelFileError(f"{path}: cannot read {what} ({e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadModelFileError(f"{path}: malformed JSON in {what}: {e.msg} at line {e.lineno}") from None
    if not isinstance(data, dict):
        raise BadModelFileError(f"{path}: {what} is not a JSON object")
    return data


def _model_dir(model_dir: str | os.PathLike) -> Path:
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelNotFoundError(f"{path}: model folder not found")
    return path


def read_model_index(model_dir: str | os.PathLike) -> dict:
    """The pipeline's ``model_index.json`` (class names of its components)."""
    path = _model_dir(model_dir) / "model_index.json"
    if not path.is_file():
        raise BadModelFileError(f"{path} is missing: {model_dir} is not a diffusers folder")
    return read_json(path, "the pipeline index")


def load_scheduler_config(model_dir: str | os.PathLike) -> dict:
    """``scheduler/scheduler_config.json`` of a diffusers folder."""
    return read_json(_model_dir(model_dir) / "scheduler" / "scheduler_config.json", "the scheduler config")


def available_variants(component_dir: Path) -> list[str]:
    """Variant names with weights in ``component_dir`` (``fp16`` for ``model.fp16.safetensors``), preferred first."""
    found = set()
    for entry in component_dir.iterdir():
        match = _VARIANT_FILE.match(entry.name) or _VARIANT_INDEX.match(entry.name)
        if match:
            found.add(match.group(1))
    return sorted(found, key=lambda v: (PREFERRED_VARIANTS.index(v) if v in PREFERRED_VARIANTS else
                                        len(PREFERRED_VARIANTS), v))


def _weights_for(component_dir: Path, variant: str | None) -> Path | None:
    """The single weight file or shard index for ``variant`` (None = full precision), or None if absent."""
    suffix = "" if variant is None else f".{variant}"
    for base in WEIGHT_BASENAMES:
        for name in (f"{base}{suffix}.safetensors", f"{base}.safetensors.index{suffix}.json"):
            if (component_dir / name).is_file():
                return component_dir / name
    return None


def find_weights(component_dir: str | os.PathLike, variant: str | None = None) -> Path:
    """The weights of one component: a ``.safetensors`` file or a ``.safetensors.index[.variant].json``.

    ``variant=None`` takes the full-precision file, or when only variants exist the preferred one (fp16 first).
    A folder holding only pickled weights (``.bin``) is refused with the way to convert them.
    """
    component_dir = Path(component_dir)
    if not component_dir.is_dir():
        raise BadModelFileError(f"{component_dir}: component folder is missing")
    found = _weights_for(component_dir, variant)
    if found is None and variant is None:
        for other in available_variants(component_dir):
            found = _weights_for(component_dir, other)
            if found is not None:
                break
    if found is not None:
        return found
    present = ([None] if _weights_for(component_dir, None) else []) + available_variants(component_dir)
    if present:  # only reachable when a variant was asked for
        raise BadModelFileError(f"{component_dir}: no weights for variant {variant!r} (present: "
                                f"{', '.join(v or 'full precision' for v in present)})")
    pickles = sorted(p.name for p in component_dir.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise BadModelFileError(f"{component_dir}: only pickled weights ({', '.join(pickles)}), which are not "
                                f"loaded (unpickling can run code); {CONVERT_HINT}")
    raise BadModelFileError(f"{component_dir}: no safetensors weights "
                            f"(expected {WEIGHT_BASENAMES[0]}.safetensors or {WEIGHT_BASENAMES[1]}.safetensors)")


def _read_index(index_path: Path) -> dict[str, list[str]]:
    """Shard file name -> tensor names, from a ``*.safetensors.index*.json``."""
    index = read_json(index_path, "the shard index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise BadModelFileError(f"{index_path}: shard index has no weight_map")
    shards: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
            raise BadModelFileError(f"{index_path}: bad shard file name {shard!r} for tensor {name!r}")
        shards.setdefault(shard, []).append(name)
    return shards


class MappedTensors(dict):
    """Tensors that are views of memory-mapped files, as stored (``load_weights(..., dtype=None)``), with
    ``releaser(name)``: a function dropping that tensor's pages from memory once a model keeps a copy of it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.releasers: dict = {}

    def releaser(self, name: str):
        return self.releasers.get(name)


def _stored_tensors(f: SafetensorsFile, names, out: MappedTensors) -> MappedTensors:
    for name in names:
        out[name] = f.stored(name)
        out.releasers[name] = f.releaser(name)
    return out


def load_weights(path: str | os.PathLike, dtype=np.float32) -> dict[str, np.ndarray]:
    """All tensors of a ``.safetensors`` file, or of every shard listed by a ``.index.json``, as ``dtype``;
    dtype=None: as stored (memory-mapped views, see MappedTensors and SafetensorsFile.stored)."""
    path = Path(path)
    if not path.name.endswith(".json"):
        with SafetensorsFile(path) as f:
            if dtype is None:
                return _stored_tensors(f, f.keys(), MappedTensors())
            return f.tensors(dtype)
    tensors: dict[str, np.ndarray] = MappedTensors() if dtype is None else {}
    for shard, names in _read_index(path).items():
        shard_path = path.parent / shard
        if not shard_path.is_file():
            raise BadModelFileError(f"{shard_path}: shard listed in {path.name} is missing")
        with SafetensorsFile(shard_path) as f:
            for name in names:
                if name not in f:
                    raise BadModelFileError(f"{shard_path}: tensor {name!r} listed in {path.name} is not in it")
                if dtype is None:
                    _stored_tensors(f, [name], tensors)
                else:
                    tensors[name] = f.get(name, dtype)
    return tensors


def canonical_text_encoder_names(tensors: dict[str, np.ndarray], source: str | os.PathLike = "") -> dict:
    """Text-encoder tensors under one naming: ``text_model.`` prefix removed, ``position_ids`` buffer dropped."""
    out: dict[str, np.ndarray] = MappedTensors() if isinstance(tensors, MappedTensors) else {}
    for name, value in tensors.items():
        key = name[len(TEXT_MODEL_PREFIX):] if name.startswith(TEXT_MODEL_PREFIX) else name
        if key in _DROPPED_TEXT_ENCODER_BUFFERS:
            continue
        if key in out:
            raise BadModelFileError(f"{source}: tensor {key!r} appears both with and without the "
                                    f"{TEXT_MODEL_PREFIX!r} prefix")
        out[key] = value
        if isinstance(out, MappedTensors):
            out.releasers[key] = tensors.releaser(name)
    return out


def load_component(model_dir: str | os.PathLike, component: str,
                   variant: str | None = None, dtype=np.float32) -> tuple[dict, dict[str, np.ndarray]]:
    """``(config, tensors)`` of one component (``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``, ...).

    Tensors are float32 whatever the storage (fp32 ones are read-only views of the memory-mapped file), or with
    dtype=None as stored (views; see load_weights); text-encoder names are canonical (see the module docstring).
    """
    component_dir = _model_dir(model_dir) / component
    if not component_dir.is_dir():
        raise BadModelFileError(f"{component_dir}: the model has no {component} folder")
    config = read_json(component_dir / "config.json", f"the {component} config")
    weights = find_weights(component_dir, variant)
    tensors = load_weights(weights, dtype)
    if component.startswith("text_encoder"):
        tensors = canonical_text_encoder_names(tensors, weights)
    return config, tensors
