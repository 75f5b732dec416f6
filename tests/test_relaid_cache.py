"""sdgen.relaid_cache: convolution weights re-laid for the kernels, kept on disk between runs.

The cache is checked against the build that does not use it: the same re-laid numbers, the same UNet output bit
for bit; and for what it must not do: use a file whose source changed, trust a corrupt file, fail a build where
it cannot write, cache weights that are not the file's own bytes."""

import os

import numpy as np

from sdgen import relaid_cache
from sdgen.checkpoint.safetensors_file import SafetensorsFile, file_origin, write_safetensors
from sdgen.kernels.conv import Conv2dPlan


def test_write_safetensors_and_file_origin(tmp_path):
    """write_safetensors: read back as written by sdgen's reader and the safetensors package (float32, float16; bf16
    bits by sdgen's), each tensor aligned to its elements; file_origin: where a view of a file's map lies in it,
    None for copies, another identity once the file is rewritten."""
    import safetensors.numpy

    rng = np.random.default_rng(0)
    tensors = {"h": rng.standard_normal(7).astype(np.float16), "w": rng.standard_normal((3, 5), dtype=np.float32),
               "b": rng.integers(0, 65535, 9).astype(np.uint16)}
    path = tmp_path / "t.safetensors"
    write_safetensors(path, tensors, {"note": "x"})
    f = SafetensorsFile(path)
    assert f.metadata == {"note": "x"} and sorted(f.keys()) == ["b", "h", "w"]
    for name, want in tensors.items():
        got = f.stored(name)
        assert got.dtype == want.dtype and np.array_equal(got, want) and not got.flags.writeable
        identity, offset, size = file_origin(got)
        assert str(path.resolve()) in identity and size == path.stat().st_size
        assert path.read_bytes()[offset:offset + want.nbytes] == want.tobytes()
    write_safetensors(tmp_path / "u.safetensors", {k: tensors[k] for k in ("h", "w")})
    read = safetensors.numpy.load_file(tmp_path / "u.safetensors")
    assert np.array_equal(read["w"], tensors["w"]) and np.array_equal(read["h"], tensors["h"])
    assert file_origin(f.stored("w").copy()) is None and file_origin(tensors["w"]) is None
    before = file_origin(f.stored("w"))[0]
    write_safetensors(path, tensors)
    os.utime(path, ns=(1, 1))
    assert file_origin(SafetensorsFile(path).stored("w"))[0] != before


def _plans(model) -> list:
    """The Conv2dPlans of a model, in a fixed order."""
    found, seen = [], set()

    def walk(o):
        if id(o) in seen:
            return
        seen.add(id(o))
        if isinstance(o, Conv2dPlan):
            found.append(o)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)
        elif hasattr(o, "__dict__") and type(o).__module__.startswith("sdgen"):
            for v in vars(o).values():
                walk(v)

    walk(model)
    return found


def _relaid(plan):
    return plan.hwio if plan.blocks is None else plan.blocks


def _entries(folder):
    """Cache file -> number of arrays in it."""
    return {p.name: len(SafetensorsFile(p).keys()) for p in sorted(folder.glob("*.relaid.safetensors"))}


def test_relaid_cache_builds(tiny_sd1, tmp_path, monkeypatch):
    """The first build from a file marks it (no arrays written), the second writes its re-laid weights, the third
    maps them: read-only views of the cache file, the numbers of the re-layout, the same UNet output bit for bit.
    A changed source file, a corrupt cache file, a folder that cannot be written, "off", and weights not as the file
    stores them (another weights dtype) each build as without the cache."""
    from sdgen.pipeline import Pipeline

    monkeypatch.setattr(relaid_cache, "MIN_SOURCE_BYTES", 0)
    folder = tmp_path / "relaid"
    monkeypatch.setenv("SDGEN_RELAID_CACHE", "off")
    plain = Pipeline.load(tiny_sd1).unet
    assert not folder.exists()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 8, 8), dtype=np.float32)
    ctx = rng.standard_normal((2, 77, plain.cfg.cross_attention_dim), dtype=np.float32)
    want = plain(x, 500, ctx)

    monkeypatch.setenv("SDGEN_RELAID_CACHE", str(folder))
    Pipeline.load(tiny_sd1)
    marks = _entries(folder)
    assert len(marks) == 2 and set(marks.values()) == {0}  # the UNet's file and the VAE's: marked only
    Pipeline.load(tiny_sd1)
    written = _entries(folder)
    assert written.keys() == marks.keys() and min(written.values()) > 0
    unet = Pipeline.load(tiny_sd1).unet
    plans, plain_plans = _plans(unet), _plans(plain)
    assert len(plans) == len(plain_plans) > 10
    cache_files = {str(p.resolve()) for p in folder.glob("*.relaid.safetensors")}
    for plan, ref in zip(plans, plain_plans):
        got = _relaid(plan)
        assert np.array_equal(got, _relaid(ref)) and got.dtype == _relaid(ref).dtype
        assert not got.flags.writeable and file_origin(got)[0].split("|")[0] in cache_files
    assert np.array_equal(unet(x, 500, ctx), want)
    assert _entries(folder) == written

    source = tiny_sd1 / "unet" / "diffusion_pytorch_model.safetensors"
    unet_file = relaid_cache.file_for(source, folder).name
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))  # the source changed
    unet = Pipeline.load(tiny_sd1).unet
    assert _entries(folder) == dict(written, **{unet_file: 0})  # marked again; the VAE's file as it was
    assert all(file_origin(_relaid(p)) is None for p in _plans(unet))
    assert np.array_equal(unet(x, 500, ctx), want)

    for path in folder.glob("*.relaid.safetensors"):  # corrupt: rebuilt, never trusted
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert np.array_equal(Pipeline.load(tiny_sd1).unet(x, 500, ctx), want)
    assert set(_entries(folder).values()) == {0}

    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("SDGEN_RELAID_CACHE", str(blocked / "relaid"))  # cannot be made: the build goes on
    for _ in range(2):
        assert np.array_equal(Pipeline.load(tiny_sd1).unet(x, 500, ctx), want)

    other = tmp_path / "other"
    monkeypatch.setenv("SDGEN_RELAID_CACHE", str(other))
    for _ in range(3):
        Pipeline.load(tiny_sd1, weights_dtype="fp16")  # converted from the fp32 files: not the files' bytes
    assert not other.exists() or not list(other.iterdir())
