"""LoRA: low-rank weight updates, read from .safetensors files and merged into a model's tensors before it is built.

For a layer with weight W (a linear map, or a convolution), a LoRA holds ``down`` (rank r x inputs, or r x in x k x k
for a convolution: "LoCon") and ``up`` (outputs x r), and the merged weight is, as diffusers'
``load_lora_weights`` + ``fuse_lora(lora_scale=s)`` (PEFT's merge) computes it::

    W' = W + s * (alpha / r) * up @ down            (convolutions: the same product over the flattened kernel)

``s`` is the scale the user gives (``--lora FILE:0.8``), ``alpha`` the file's per-layer ``.alpha`` (kohya) or the
``lora_alpha`` / ``alpha_pattern`` of the PEFT config in the file's metadata; without either, alpha = r (scale 1).
Several LoRAs add up. Text-encoder layers get the same treatment as UNet layers.

File layouts understood (tensor names):

    kohya / A1111      lora_unet_<module>.lora_down.weight, .lora_up.weight, .alpha
                       lora_te_<module>... (SD1/SD2), lora_te1_ / lora_te2_ (SDXL's two text encoders)
                       <module> is the diffusers module path with "_" for "." (SD1/SD2), or for SDXL the
                       original SGM UNet path (input_blocks_4_1_transformer_blocks_0_attn1_to_q)
    diffusers / PEFT   unet.<module>.lora_A.weight / .lora_B.weight, text_encoder.<module>..., text_encoder_2...
                       (as ``save_lora_weights`` writes them; metadata "lora_adapter_metadata" read when present)
    older diffusers    unet.<...>.processor.to_q_lora.down.weight, <module>.lora.down.weight,
                       text_encoder.<...>.to_q_lora.down.weight, <module>.lora_linear_layer.down.weight

Text-encoder module paths may carry transformers' ``text_model.`` prefix or not. LyCORIS variants (LoHa, LoKr,
Tucker-decomposed LoCon, DoRA) are refused with a message, as is any tensor that fits no layer of the model.
Pickled files (.pt, .ckpt, .bin) are refused: they can run code when loaded.

Merging makes new float32 arrays for the layers it touches and leaves the model's original tensors (often
read-only memory maps of the model files, float32, float16 or bfloat16 as stored) as they were.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .checkpoint.pickled import is_pickle_path, refuse_pickle
from .checkpoint.safetensors_file import SafetensorsFile, bf16_to_f32
from .errors import BadModelFileError, ModelNotFoundError, UsageError

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_KOHYA_PREFIXES = (("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"),
                   ("lora_te_", "text_encoder"))
METADATA_KEY = "lora_adapter_metadata"

# tensor-name endings -> role; the first that matches decides
_ROLES = (
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),
    (".alpha", "alpha"),
)
_UNSUPPORTED = {"hada_": "LoHa", "lokr_": "LoKr", "lora_mid": "LoCon with a Tucker core", "dora_scale": "DoRA",
                "lora_magnitude_vector": "DoRA", ".diff": "a full-weight difference", ".diff_b": "a bias difference"}
# older diffusers attention-processor names -> module names
_LEGACY_UNET = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_LEGACY_TEXT = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


@dataclass(frozen=True)
class LoraRequest:
    """One LoRA to merge: its file and the strength (1.0 = as trained)."""

    path: Path
    scale: float = 1.0

    def __str__(self) -> str:
        return f"{self.path}:{self.scale:g}"


def parse_lora_option(text: str) -> LoraRequest:
    """``PATH`` or ``PATH:SCALE`` (the command line's ``--lora``) -> LoraRequest; UsageError for a bad scale."""
    path, scale = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head and not tail.startswith(("/", "\\")):
        try:
            scale = float(tail)
        except ValueError:
            if re.fullmatch(r"[-+0-9.eE]+", tail):
                raise UsageError(f"--lora {text!r}: {tail!r} is not a number (write PATH:SCALE)") from None
        else:
            path = head
            if not math.isfinite(scale):
                raise UsageError(f"--lora {text!r}: the scale must be a finite number")
    return LoraRequest(Path(path), scale)


@dataclass
class LoraLayer:
    """One layer's update as read from a file, before it is matched to the model."""

    name: str                      # the file's name for the layer (without the role suffix)
    down: np.ndarray | None = None
    up: np.ndarray | None = None
    alpha: float | None = None


@dataclass
class LoraFile:
    """The layers of one LoRA file, grouped by the model component they belong to."""

    path: Path
    layers: dict[str, LoraLayer] = field(default_factory=dict)
    metadata: dict | None = None   # the PEFT config per component ("unet.r", "unet.lora_alpha", ...), if any


def read_lora_file(path: str | Path) -> LoraFile:
    """The LoRA layers of a .safetensors file (float32), grouped by layer name. Pickles are refused."""
    path = Path(path)
    if is_pickle_path(path):
        refuse_pickle(path)
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: LoRA file not found")
    result = LoraFile(path)
    with SafetensorsFile(path) as f:
        meta = f.metadata or {}
        if meta.get(METADATA_KEY):
            try:
                result.metadata = json.loads(meta[METADATA_KEY])
            except json.JSONDecodeError:
                raise BadModelFileError(f"{path}: malformed {METADATA_KEY} metadata") from None
        for key in f.keys():
            for marker, kind in _UNSUPPORTED.items():
                if marker in key:
                    raise BadModelFileError(f"{path}: {kind} tensors ({key!r}) are not supported, only plain LoRA "
                                            "(down/up pairs)")
            for suffix, role in _ROLES:
                if key.endswith(suffix):
                    name = key[:-len(suffix)]
                    break
            else:
                raise BadModelFileError(f"{path}: {key!r} is not a LoRA tensor (expected lora_down/lora_up, "
                                        "lora_A/lora_B or alpha)")
            layer = result.layers.setdefault(name, LoraLayer(name))
            value = f.get(key, np.float32)
            if role == "alpha":
                layer.alpha = float(np.asarray(value).reshape(-1)[0])
            else:
                setattr(layer, role, np.asarray(value, dtype=np.float32))
    if not result.layers:
        raise BadModelFileError(f"{path}: no LoRA tensors in it")
    for layer in result.layers.values():
        if layer.down is None or layer.up is None:
            raise BadModelFileError(f"{path}: layer {layer.name!r} has no "
                                    f"{'down (lora_A)' if layer.down is None else 'up (lora_B)'} tensor")
    return result


# ------------------------------------------------------------------------------------------- names -> modules
def _split_component(name: str) -> tuple[str, str, bool]:
    """(component, module name in the file's form, kohya-style flat name?) for a layer name."""
    for prefix, component in _KOHYA_PREFIXES:
        if name.startswith(prefix):
            return component, name[len(prefix):], True
    for component in sorted(COMPONENTS, key=len, reverse=True):
        if name.startswith(component + "."):
            rest = name[len(component) + 1:]
            if rest.startswith("base_model.model."):
                rest = rest[len("base_model.model."):]
            return component, rest, False
    raise BadModelFileError(f"layer {name!r} belongs to no component sdgen knows (expected lora_unet_*, "
                            "lora_te*_*, unet.*, text_encoder.* or text_encoder_2.*)")


def _dotted_module(component: str, module: str) -> str:
    """A diffusers/PEFT dotted layer name -> the module path in sdgen's tensor names."""
    if component == "unet":
        module = module.replace(".processor.", ".")
        head, _, last = module.rpartition(".")
        if last in _LEGACY_UNET and (head.endswith((".attn1", ".attn2")) or not head):
            module = f"{head}.{_LEGACY_UNET[last]}" if head else _LEGACY_UNET[last]
        return module
    if module.startswith("text_model."):
        module = module[len("text_model."):]
    head, _, last = module.rpartition(".")
    if last in _LEGACY_TEXT and head.endswith(".self_attn"):
        module = f"{head}.{_LEGACY_TEXT[last]}"
    return module


_SGM_HEAD = re.compile(r"^(input_blocks_\d+_\d+|output_blocks_\d+_\d+|middle_block_\d+)_(.+)$")
_SGM_PARTS = {"in_layers_0": "in_layers.0", "in_layers_2": "in_layers.2", "emb_layers_1": "emb_layers.1",
              "out_layers_0": "out_layers.0", "out_layers_3": "out_layers.3", "skip_connection": "skip_connection",
              "op": "op", "conv": "conv"}
_SGM_TOP = {"time_embed_0": "time_embed.0", "time_embed_2": "time_embed.2", "label_emb_0_0": "label_emb.0.0",
            "label_emb_0_2": "label_emb.0.2", "input_blocks_0_0": "input_blocks.0.0", "out_0": "out.0",
            "out_2": "out.2"}


def _sgm_module(flat: str, unet_config: dict) -> str | None:
    """A kohya SDXL UNet name in the original SGM layout (``input_blocks_4_1_transformer_blocks_0_attn1_to_q``)
    -> the diffusers module path (``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``), or None."""
    from .checkpoint.single_file import unet_name

    if flat in _SGM_TOP:
        name = unet_name(_SGM_TOP[flat] + ".weight", unet_config)
        return None if name is None else name[:-len(".weight")]
    m = _SGM_HEAD.match(flat)
    if not m:
        return None
    head = m.group(1)
    parts = head.split("_")
    dotted_head = "_".join(parts[:-2]) + "." + ".".join(parts[-2:]) if not head.startswith("middle_block") else \
        "middle_block." + parts[-1]
    rest = m.group(2)
    if rest in _SGM_PARTS:
        name = unet_name(f"{dotted_head}.{_SGM_PARTS[rest]}.weight", unet_config)
        return None if name is None else name[:-len(".weight")]
    # inside an attention block (transformer): the place of the block, then the rest as the flat tail
    name = unet_name(f"{dotted_head}.x.weight", unet_config)
    if name is None or not name.endswith(".x.weight"):
        return None
    return name[:-len(".x.weight")] + "\0" + rest


class _ModuleIndex:
    """The weight-carrying modules of one component, found by dotted path or by kohya's flat form."""

    def __init__(self, tensors: dict, component: str, unet_config: dict | None):
        self.tensors = tensors
        self.component = component
        self.unet_config = unet_config
        self.modules = {name[:-len(".weight")] for name in tensors if name.endswith(".weight")}
        self.flat = {m.replace(".", "_"): m for m in self.modules}

    def find(self, module: str, flat: bool) -> str | None:
        if not flat:
            return module if module in self.modules else None
        if self.component != "unet" and module.startswith("text_model_"):
            module = module[len("text_model_"):]
        if module in self.flat:
            return self.flat[module]
        if self.component == "unet" and self.unet_config is not None:
            sgm = _sgm_module(module, self.unet_config)
            if sgm is not None and "\0" in sgm:
                head, tail = sgm.split("\0")
                return self.flat.get(head.replace(".", "_") + "_" + tail)
            if sgm is not None and sgm in self.modules:
                return sgm
        return None


# ------------------------------------------------------------------------------------------- scales
def _pattern_value(patterns: dict, module: str):
    """The value of the first PEFT pattern (``rank_pattern``/``alpha_pattern`` key) matching the module path."""
    for key, value in (patterns or {}).items():
        key = key[1:] if key.startswith("^") else key
        if re.match(rf"(.*\.)?(?:{key})$", module) or re.match(rf"(?:{key})$", module):
            return value
    return None


def _alpha(layer: LoraLayer, lora: LoraFile, component: str, file_module: str, rank: int) -> tuple[float, float]:
    """(alpha, r) for a layer: the file's .alpha, else the PEFT metadata, else (rank, rank)."""
    if layer.alpha is not None:
        return layer.alpha, rank
    meta = lora.metadata
    if meta:
        prefix = component + "."
        config = {k[len(prefix):]: v for k, v in meta.items() if k.startswith(prefix)}
        if config:
            alpha = _pattern_value(config.get("alpha_pattern"), file_module)
            if alpha is None:
                alpha = config.get("lora_alpha", rank)
            r = rank
            if config.get("use_rslora"):
                return float(alpha), math.sqrt(r)
            return float(alpha), float(r)
    return float(rank), float(rank)


def _as_f32(t: np.ndarray) -> np.ndarray:
    """A weight as float32: tensors may be held as stored (float16, or bfloat16 bits as uint16)."""
    if t.dtype == np.uint16:
        return bf16_to_f32(t)
    return np.asarray(t, dtype=np.float32)


def _delta(layer: LoraLayer, base: np.ndarray, factor: float, where: str) -> np.ndarray:
    """factor * up @ down, in the shape of the base weight."""
    down, up = layer.down, layer.up
    rank = down.shape[0]
    if up.ndim > 2 and any(d != 1 for d in up.shape[2:]):
        raise BadModelFileError(f"{where}: lora_up has a {up.shape[2:]} kernel (only 1x1 is supported)")
    up2 = up.reshape(up.shape[0], -1)
    down2 = down.reshape(rank, -1)
    if up2.shape[1] != rank:
        raise BadModelFileError(f"{where}: lora_up {tuple(up.shape)} does not fit lora_down {tuple(down.shape)}")
    if up2.shape[0] != base.shape[0] or up2.shape[0] * down2.shape[1] != base.size:
        raise BadModelFileError(f"{where}: an update of shape {(up2.shape[0],) + tuple(down.shape[1:])} does not fit "
                                f"the model's weight {tuple(base.shape)} (a LoRA for another model family?)")
    delta = np.matmul(up2, down2) * np.float32(factor)
    return delta.reshape(base.shape).astype(np.float32, copy=False)


# ------------------------------------------------------------------------------------------- merging
@dataclass
class MergeReport:
    """What a merge did: per LoRA file, how many layers of each component it changed."""

    layers: dict[str, dict[str, int]] = field(default_factory=dict)


def merge_loras(components: dict, loras: list[LoraRequest], lora_files: list[LoraFile] | None = None
                ) -> tuple[dict, MergeReport]:
    """``components`` ({name: (config, tensors)}) with every LoRA merged into the tensors of the layers it changes.

    Returns a new components dict (untouched components and tensors are shared, changed tensors are new arrays) and
    a report. BadModelFileError when a LoRA has a layer the model lacks or whose shape does not fit.
    """
    files = lora_files or [read_lora_file(r.path) for r in loras]
    out = {name: (cfg, tensors) for name, (cfg, tensors) in components.items()}
    copied: set[str] = set()
    report = MergeReport()
    unet_config = components["unet"][0] if "unet" in components else None
    indexes: dict[str, _ModuleIndex] = {}
    for request, lora in zip(loras, files):
        counts: dict[str, int] = {}
        for layer in lora.layers.values():
            component, file_module, flat = _split_component(layer.name)
            if component not in components:
                raise BadModelFileError(f"{lora.path}: layer {layer.name!r} is for {component}, which this model "
                                        "does not have (a LoRA for another model family?)")
            cfg, tensors = out[component]
            if not isinstance(tensors, dict):
                raise UsageError("LoRAs need the model's real weights (not --random-weights)")
            if component not in indexes:
                indexes[component] = _ModuleIndex(tensors, component,
                                                  unet_config if component == "unet" else None)
            module = indexes[component].find(file_module if flat else _dotted_module(component, file_module), flat)
            if module is None:
                raise BadModelFileError(f"{lora.path}: layer {layer.name!r} fits no layer of the model's "
                                        f"{component} (a LoRA for another model family?)")
            if component not in copied:  # a shallow copy of the same kind (memory-mapped tensor dicts stay so)
                tensors = copy.copy(tensors)
                out[component] = (cfg, tensors)
                indexes[component].tensors = tensors
                copied.add(component)
            key = module + ".weight"
            base = _as_f32(tensors[key])
            alpha, r = _alpha(layer, lora, component, file_module, layer.down.shape[0])
            tensors[key] = base + _delta(layer, base, request.scale * alpha / r, f"{lora.path}: {layer.name}")
            counts[component] = counts.get(component, 0) + 1
        report.layers[str(request.path)] = counts
    return out, report


def components_touched(loras: list[LoraRequest]) -> set[str]:
    """The model components the LoRA files change (read from their tensor names)."""
    touched = set()
    for request in loras:
        for layer in read_lora_file(request.path).layers.values():
            touched.add(_split_component(layer.name)[0])
    return touched
