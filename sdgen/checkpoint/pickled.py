"""Refuse pickled PyTorch weight files (.ckpt, .pt, .pth, .bin) without ever unpickling them.

Unpickling runs arbitrary code chosen by whoever wrote the file, so sdgen reads safetensors only and tells the
user how to convert: once, in an environment they trust.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import BadModelFileError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")

CONVERT_HINT = (
    "convert it once in an environment you trust: "
    "python -c \"import torch, safetensors.torch as st; sd = torch.load('IN', weights_only=True); "
    "st.save_file({k: v.contiguous() for k, v in sd.get('state_dict', sd).items()}, 'OUT.safetensors')\" "
    "(or for a diffusers folder: DiffusionPipeline.from_pretrained(DIR).save_pretrained(NEW_DIR, "
    "safe_serialization=True))"
)


def is_pickle_path(path: str | os.PathLike) -> bool:
    """True when the file name says it is a pickled checkpoint."""
    return Path(path).suffix.lower() in PICKLE_SUFFIXES


def refuse_pickle(path: str | os.PathLike) -> None:
    """Raise BadModelFileError for a pickled checkpoint; the file is not opened."""
    if is_pickle_path(path):
        raise BadModelFileError(
            f"{path}: pickled PyTorch weights are not loaded (unpickling can run code); {CONVERT_HINT}"
        )
