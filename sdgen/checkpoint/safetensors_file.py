"""Read .safetensors files without torch: a validated header, a memory map, numpy views of the tensors.

The format: 8 bytes little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``, then the data block;
offsets are relative to the start of the data block. Everything in the header is checked when the file is
opened, so a corrupt or truncated file fails at once with a one-line ``BadModelFileError`` naming the file.

numpy has no bfloat16: BF16 tensors are converted to float32 by placing their 16 bits in the high half of a
32-bit word, which is exact.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import weakref
from pathlib import Path
from typing import Iterator, NoReturn

import numpy as np

from ..errors import BadModelFileError
from .pickled import refuse_pickle

# safetensors dtype name -> numpy dtype of the stored bytes (BF16 is read as raw uint16).
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
# Valid in the format, but not something this reader converts: the file opens, reading these tensors fails.
_UNSUPPORTED_DTYPES: dict[str, int] = {"F8_E4M3": 1, "F8_E5M2": 1}
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")

_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's limit as well
_CHUNK = 1 << 22  # elements per step when scanning for non-finite values


class TensorInfo:
    """One header entry: dtype name, shape, and the byte range inside the data block."""

    __slots__ = ("name", "dtype", "shape", "begin", "end")

    def __init__(self, name: str, dtype: str, shape: tuple[int, ...], begin: int, end: int):
        self.name, self.dtype, self.shape, self.begin, self.end = name, dtype, shape, begin, end

    def __repr__(self) -> str:
        return f"TensorInfo({self.name!r}, {self.dtype}, {self.shape}, [{self.begin}, {self.end}))"


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16 array) -> float32 array, exactly (the bits become the high half of each float)."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def _looks_pickled(head: bytes) -> bool:
    """True for the first bytes of a PyTorch zip archive or a raw pickle stream."""
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


class SafetensorsFile:
    """An open .safetensors file: ``keys()``, ``info(name)``, ``get(name, dtype)``, ``metadata``.

    Tensors are read from a read-only memory map; float32 tensors come back as zero-copy read-only views where
    the data is aligned. Use as a context manager or call ``close()``; views already handed out stay valid.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.metadata: dict[str, str] = {}
        self._infos: dict[str, TensorInfo] = {}
        self._mm: mmap.mmap | None = None
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                head = f.read(8)
                if size < 8:
                    self._fail(f"too short to be a safetensors file ({size} bytes)")
                (header_len,) = struct.unpack("<Q", head)
                if header_len > min(size - 8, _MAX_HEADER_BYTES) and _looks_pickled(head):
                    self._fail("is a pickled PyTorch file, not safetensors (pickles can run code and are never loaded)")
                if header_len > size - 8:
                    self._fail(f"header length {header_len} is beyond the end of the file ({size} bytes): "
                               "truncated or not a safetensors file")
                if header_len > _MAX_HEADER_BYTES:
                    self._fail(f"header length {header_len} is larger than the {_MAX_HEADER_BYTES} bytes allowed")
                header_bytes = f.read(header_len)
                self._data_start = 8 + header_len
                self._data_size = size - self._data_start
                self._parse_header(header_bytes)
                # mmap cannot map an empty file; size >= 8 here.
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                st = os.fstat(f.fileno())
                _register_map(self._mm, f"{os.path.realpath(self.path)}|{st.st_dev}|{st.st_ino}|{st.st_size}|"
                                        f"{st.st_mtime_ns}", size)
        except FileNotFoundError:
            raise BadModelFileError(f"{self.path}: file not found") from None
        except IsADirectoryError:
            raise BadModelFileError(f"{self.path}: is a directory, not a safetensors file") from None
        except PermissionError as e:
            raise BadModelFileError(f"{self.path}: cannot read ({e.strerror})") from None

    # ----------------------------------------------------------------------------------------------- header
    def _fail(self, problem: str) -> NoReturn:
        raise BadModelFileError(f"{self.path}: {problem}")

    def _parse_header(self, header_bytes: bytes) -> None:
        try:
            header = json.loads(header_bytes.decode("utf-8"))
        except UnicodeDecodeError:
            self._fail("malformed header: not UTF-8 text (not a safetensors file?)")
        except json.JSONDecodeError as e:
            self._fail(f"malformed JSON header: {e.msg} at character {e.pos}")
        if not isinstance(header, dict):
            self._fail("malformed header: the JSON is not an object")
        meta = header.pop("__metadata__", None)
        if meta is not None:
            if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
                self._fail("malformed header: __metadata__ must map strings to strings")
            self.metadata = dict(meta)
        for name, entry in header.items():
            self._infos[name] = self._parse_entry(name, entry)
        self._check_layout()

    def _parse_entry(self, name: str, entry) -> TensorInfo:
        if not isinstance(entry, dict):
            self._fail(f"malformed header entry for tensor {name!r}")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype in _STORAGE_DTYPES:
            itemsize = _STORAGE_DTYPES[dtype].itemsize
        elif dtype in _UNSUPPORTED_DTYPES:
            itemsize = _UNSUPPORTED_DTYPES[dtype]
        else:
            self._fail(f"tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            self._fail(f"tensor {name!r} has a malformed shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            self._fail(f"tensor {name!r} has malformed data_offsets {offsets!r}")
        begin, end = offsets
        expected = math.prod(shape) * itemsize
        if end - begin != expected:
            self._fail(f"tensor {name!r}: {end - begin} bytes of data do not match shape {shape} of {dtype} "
                       f"({expected} bytes)")
        if end > self._data_size:
            self._fail(f"tensor {name!r} ends at data byte {end}, beyond the {self._data_size} bytes present: "
                       "file truncated or offsets out of range")
        return TensorInfo(name, dtype, tuple(shape), begin, end)

    def _check_layout(self) -> None:
        """No two non-empty tensors may share bytes."""
        spans = sorted((i.begin, i.end, i.name) for i in self._infos.values() if i.end > i.begin)
        for (_, prev_end, prev_name), (begin, _, name) in zip(spans, spans[1:]):
            if begin < prev_end:
                self._fail(f"tensors {prev_name!r} and {name!r} overlap in the data block")

    # ----------------------------------------------------------------------------------------------- access
    def keys(self) -> list[str]:
        """Tensor names in file order (sorted by offset, as written)."""
        return sorted(self._infos, key=lambda n: (self._infos[n].begin, n))

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._infos)

    def info(self, name: str) -> TensorInfo:
        """The header entry for ``name``; BadModelFileError if absent."""
        try:
            return self._infos[name]
        except KeyError:
            self._fail(f"no tensor named {name!r}")

    def raw(self, name: str) -> np.ndarray:
        """The stored data as a read-only view of the map, in the stored dtype (BF16 as uint16 bits)."""
        info = self.info(name)
        if info.dtype in _UNSUPPORTED_DTYPES:
            self._fail(f"tensor {name!r} is stored as {info.dtype}, which sdgen cannot read "
                       f"(supported: {', '.join(_STORAGE_DTYPES)})")
        if self._mm is None:
            self._fail("is closed")
        np_dtype = _STORAGE_DTYPES[info.dtype]
        count = math.prod(info.shape)
        if count == 0:
            return np.zeros(info.shape, dtype=np_dtype)
        arr = np.frombuffer(self._mm, dtype=np_dtype, count=count, offset=self._data_start + info.begin)
        return arr.reshape(info.shape)

    def get(self, name: str, dtype=np.float32) -> np.ndarray:
        """Tensor ``name`` converted to ``dtype`` (default float32; None keeps the stored dtype, BF16 -> float32).

        When no conversion is needed and the data is aligned, the result is a read-only view of the memory map;
        otherwise it is a fresh array.
        """
        info = self.info(name)
        arr = self.raw(name)
        if info.dtype == "BF16":
            arr = bf16_to_f32(arr)
        target = arr.dtype if dtype is None else np.dtype(dtype)
        if arr.dtype == target:
            return arr if arr.flags.aligned else arr.copy()
        return arr.astype(target)

    def tensors(self, dtype=np.float32) -> dict[str, np.ndarray]:
        """Every tensor, converted as by ``get``."""
        return {name: self.get(name, dtype) for name in self.keys()}

    def stored(self, name: str) -> np.ndarray:
        """Tensor ``name`` as stored, a read-only view of the map where aligned: float32 and float16 as they are,
        bfloat16 as its uint16 bits (sdgen.kernels.weights reads them so), float64 converted to float32."""
        info = self.info(name)
        arr = self.raw(name)
        if info.dtype == "F64":
            return arr.astype(np.float32)
        return arr if arr.flags.aligned else arr.copy()

    def releaser(self, name: str):
        """A function that drops tensor ``name``'s pages of the map from this process's memory (MADV_DONTNEED;
        they are read again from the file if touched later): for tensors a model keeps a converted copy of. Holds
        the map, not this object. None where the platform cannot."""
        info = self.info(name)
        mm = self._mm
        if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED") or info.end <= info.begin:
            return None
        page = mmap.PAGESIZE
        start = (self._data_start + info.begin) // page * page
        end = self._data_start + info.end

        def release() -> None:
            try:
                mm.madvise(mmap.MADV_DONTNEED, start, end - start)
            except (ValueError, OSError):  # closed map or unsupported: the pages just stay
                pass

        return release

    # ----------------------------------------------------------------------------------------------- checks
    def nonfinite(self, names: list[str] | None = None) -> list[tuple[str, int, int]]:
        """Float tensors holding NaN or inf, as (name, non-finite count, element count); a scan of the data.

        Meant to be called on request (it reads every byte of the tensors checked).
        """
        found = []
        for name in self.keys() if names is None else names:
            info = self.info(name)
            if info.dtype not in _FLOAT_DTYPES:
                continue
            flat = self.raw(name).reshape(-1)
            bad = 0
            for start in range(0, flat.size, _CHUNK):
                chunk = flat[start:start + _CHUNK]
                if info.dtype == "BF16":  # exponent bits all ones = inf or NaN
                    bad += int(np.count_nonzero((chunk & 0x7F80) == 0x7F80))
                else:
                    bad += chunk.size - int(np.count_nonzero(np.isfinite(chunk)))
            if bad:
                found.append((name, bad, flat.size))
        return found

    # ----------------------------------------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Release this object's reference to the map (the OS unmaps it once no view uses it)."""
        self._mm = None

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsFile({str(self.path)!r}, {len(self._infos)} tensors)"


# id(map) -> (weak reference to the map, the file's identity, its size): which file a view's bytes come from
_MAPS: dict[int, tuple[weakref.ref, str, int]] = {}


def _register_map(mm: mmap.mmap, identity: str, size: int) -> None:
    key = id(mm)
    _MAPS[key] = (weakref.ref(mm, lambda _ref, key=key: _MAPS.pop(key, None)), identity, size)


def file_origin(arr: np.ndarray) -> tuple[str, int, int] | None:
    """(identity of the file, byte offset in it, file size) where the bytes of arr lie, when arr is a C-contiguous
    view of a SafetensorsFile's map, i.e. the file's own bytes as stored; None for anything else (a converted or
    computed array, a copy). The identity names the file's real path, device, inode, size and modification time,
    so a file changed since (or another file at that path) has another identity."""
    if not isinstance(arr, np.ndarray) or not arr.flags.c_contiguous or arr.size == 0:
        return None
    owner = arr
    while isinstance(owner, np.ndarray):
        owner = owner.base
    if isinstance(owner, memoryview):
        owner = owner.obj
    entry = _MAPS.get(id(owner)) if isinstance(owner, mmap.mmap) else None
    if entry is None or entry[0]() is not owner:
        return None
    start = np.frombuffer(owner, dtype=np.uint8, count=1).__array_interface__["data"][0]
    return entry[1], arr.__array_interface__["data"][0] - start, entry[2]


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
    """Write float32, float16 and bfloat16 (as uint16 bits) tensors as a .safetensors file at path, atomically (a
    temporary file in the same folder, renamed over path), each tensor's bytes written from the array as it lies
    (no copy of the whole). The data block starts on a 64-byte boundary and the tensors follow one another widest
    dtype first, so that each maps aligned to its elements."""
    names = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.uint16): "BF16"}
    order = sorted(tensors, key=lambda name: -tensors[name].dtype.itemsize)
    header: dict = {"__metadata__": dict(metadata or {})}
    offset = 0
    for name in order:
        arr = tensors[name]
        if arr.dtype not in names:
            raise ValueError(f"write_safetensors: {name} is {arr.dtype}")
        header[name] = {"dtype": names[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 64)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            for name in order:
                f.write(memoryview(np.ascontiguousarray(tensors[name])).cast("B"))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def open_safetensors(path: str | os.PathLike) -> SafetensorsFile:
    """Open and validate a .safetensors file (refusing pickle formats by their file name first)."""
    refuse_pickle(path)
    return SafetensorsFile(path)


def describe_nonfinite(path: str | os.PathLike) -> list[str]:
    """One line per tensor of ``path`` that holds NaN/inf, e.g. ``"unet.x: 12 of 4096 values are NaN/inf"``."""
    with open_safetensors(path) as f:
        return [f"{name}: {'all' if bad == total else bad} of {total} values are NaN/inf"
                for name, bad, total in f.nonfinite()]
