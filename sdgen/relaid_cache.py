"""Convolution weights re-laid for the kernels, kept on disk between runs.

Building a model re-lays each 3x3 convolution's weights from PyTorch's OIHW into the layout the kernels read
(kernels.weights.hwio / oihw_blocks): for SD 1.5 2.2 GB written into new memory at every load, which the OS must
first hand over (on the 2-core VMs sdgen is measured on, 0.4-2 s per GB, most of a load). The first build from a
model file marks it in this cache, the second writes those arrays into one .safetensors file (so that a model run
once never pays for the writing: on these VMs +3-6 s for SD 1.5's, as new memory of the OS's file cache), and later
builds map that file instead (its pages shared with the OS's file cache), neither reading nor re-laying the
originals.

A cache file belongs to one source file: named after the source's real path, and holding its identity (path,
device, inode, size, modification time) and LAYOUT_VERSION, which must match for it to be used; a tensor is found
by its byte offset, dtype and shape in the source and the layout. Only tensors used exactly as the file stores
them are cached (sdgen.checkpoint.file_origin: not converted to another dtype, not merged with a LoRA), and only
from source files of at least MIN_SOURCE_BYTES (small models re-lay in milliseconds). Written atomically; a
missing, stale or unreadable cache file is rebuilt, a cache folder that cannot be written is left alone (the
build goes on without it). The folder keeps at most MAX_BYTES, the least recently used files deleted first.

SDGEN_RELAID_CACHE: the folder (default: $XDG_CACHE_HOME/sdgen/relaid, else ~/.cache/sdgen/relaid), or "off".
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import numpy as np

from .checkpoint.safetensors_file import SafetensorsFile, file_origin, write_safetensors

LAYOUT_VERSION = "1"  # raise when kernels.weights' re-layouts change what they produce
MIN_SOURCE_BYTES = 256 << 20
MAX_BYTES = 12 << 30
_SUFFIX = ".relaid.safetensors"
TOTALS = {"hits": 0, "made": 0}  # this process's re-laid tensors taken from the cache, and made (and kept for it)


def folder() -> Path | None:
    """The cache folder, or None when SDGEN_RELAID_CACHE is "off"."""
    value = os.environ.get("SDGEN_RELAID_CACHE", "")
    if value.lower() in ("off", "0", "no", "false"):
        return None
    if value:
        return Path(value).expanduser()
    home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(home).expanduser() / "sdgen" / "relaid"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def file_for(source: str | os.PathLike, directory: Path) -> Path:
    """The cache file of the re-laid weights from the source file at this path, in the cache folder directory."""
    return directory / f"{_digest(os.path.realpath(source))}{_SUFFIX}"


class RelaidCache:
    """One model build's use of the cache: get() for each re-laid tensor, then close() (writes what was made)."""

    def __init__(self, directory: Path | None = None):
        self.directory = folder() if directory is None else directory
        self._files: dict[str, SafetensorsFile | None] = {}  # source identity -> its open cache file (None: none)
        self._arrays: dict[str, dict[str, np.ndarray]] = {}  # source identity -> every array of this build
        self._made: set[str] = set()  # sources with arrays made in this build (their cache file is written)

    def get(self, weight: np.ndarray, layout: str, make: Callable[[], np.ndarray]) -> np.ndarray:
        """make() (weight re-laid in the named layout), or the same numbers from the cache file of weight's source
        file (a read-only view of its map)."""
        origin = file_origin(weight) if self.directory is not None else None
        if origin is None or origin[2] < MIN_SOURCE_BYTES:
            return make()
        identity, offset, _ = origin
        name = f"{offset}:{weight.dtype.str}:{'x'.join(map(str, weight.shape))}:{layout}"
        arrays = self._arrays.setdefault(identity, {})
        cached = self._open(identity)
        if cached is not None and name in cached:
            arr = cached.stored(name)
            arrays[name] = arr
            TOTALS["hits"] += 1
            return arr
        arr = make()
        arrays[name] = arr
        self._made.add(identity)
        TOTALS["made"] += 1
        return arr

    def _path(self, identity: str) -> Path:
        return file_for(identity.split("|")[0], self.directory)

    def _open(self, identity: str) -> SafetensorsFile | None:
        if identity not in self._files:
            f = None
            try:
                f = SafetensorsFile(self._path(identity))
                if f.metadata.get("source") != identity or f.metadata.get("layout_version") != LAYOUT_VERSION:
                    f = None
            except Exception:  # noqa: BLE001 (missing, unreadable or foreign: rebuilt)
                f = None
            if f is not None:
                try:
                    os.utime(self._path(identity))  # recently used (kept longest by _trim)
                except OSError:  # a cache folder shared read-only: used as it is
                    pass
            self._files[identity] = f
        return self._files[identity]

    def close(self) -> None:
        """Write the cache file of each source some of whose arrays were made in this build (its arrays, and those
        the file held from other builds); then keep the folder within MAX_BYTES. Failures to write leave the cache
        as it was."""
        for identity in sorted(self._made):
            old = self._files.get(identity)
            if old is None:  # first build from this file (as it is now): only a mark of it, no arrays (a model
                arrays = {}  # run once never pays for the writing); they are written at the next build from it
            else:  # and what other builds from the file put there (a single-file checkpoint's VAE)
                arrays = dict(self._arrays[identity])
                arrays.update({name: old.stored(name) for name in old.keys() if name not in arrays})
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                write_safetensors(self._path(identity), arrays, {"source": identity, "layout_version": LAYOUT_VERSION})
            except OSError:
                pass
        if self._made:
            self._trim()
        self._made.clear()
        self._arrays.clear()
        self._files.clear()

    def _trim(self) -> None:
        try:
            files = sorted(self.directory.glob("*" + _SUFFIX), key=lambda p: p.stat().st_mtime, reverse=True)
            total = 0
            for path in files:
                total += path.stat().st_size
                if total > MAX_BYTES:
                    path.unlink()
        except OSError:
            pass
