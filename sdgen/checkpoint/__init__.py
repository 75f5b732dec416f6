"""Weights in: safetensors files (memory-mapped, validated) and diffusers model folders. Pickles are refused."""

from .diffusers_folder import (
    canonical_text_encoder_names,
    find_weights,
    load_component,
    load_scheduler_config,
    load_weights,
    read_json,
    read_model_index,
)
from .pickled import is_pickle_path, refuse_pickle
from .safetensors_file import SafetensorsFile, bf16_to_f32, describe_nonfinite, open_safetensors
from .single_file import detect_family, load_single_file, load_vae_file

__all__ = [
    "SafetensorsFile", "open_safetensors", "bf16_to_f32", "describe_nonfinite", "is_pickle_path", "refuse_pickle",
    "load_component", "load_weights", "find_weights", "read_model_index", "load_scheduler_config",
    "canonical_text_encoder_names", "read_json",
    "detect_family", "load_single_file", "load_vae_file",
]
