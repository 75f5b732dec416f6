"""Weight loading: our safetensors reader against the safetensors package (torch API), diffusers folders written
by diffusers and transformers themselves, and corrupt or pickled files."""

from __future__ import annotations

import copy
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

from sdgen.checkpoint import (  # noqa: E402
    SafetensorsFile,
    describe_nonfinite,
    find_weights,
    load_component,
    load_scheduler_config,
    open_safetensors,
    read_model_index,
)
from sdgen.errors import BadModelFileError, ModelNotFoundError  # noqa: E402


def _as_numpy(t) -> np.ndarray:
    """What ``get(name, dtype=None)`` should give: the stored dtype, bfloat16 (which numpy lacks) as float32."""
    return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.fixture(scope="module")
def mixed_tensors():
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, 3.0e38, -1.5])
    return {
        "f32": torch.randn(3, 5, 7, generator=g),
        "f16": torch.randn(4, 9, generator=g).half(),
        "bf16": torch.randn(2, 3, 11, generator=g).bfloat16(),
        "bf16_special": special.bfloat16(),
        "f16_special": special.half(),
        "f64": torch.randn(6, generator=g, dtype=torch.float64),
        "i64": torch.arange(-5, 7, dtype=torch.int64).reshape(3, 4),
        "i32": torch.arange(10, dtype=torch.int32),
        "u8": torch.arange(200, 210, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }


@pytest.fixture(scope="module")
def mixed_file(tmp_path_factory, mixed_tensors):
    path = tmp_path_factory.mktemp("st") / "mixed.safetensors"
    safetensors_torch.save_file(mixed_tensors, str(path), metadata={"format": "pt", "note": "hi"})
    return path


# --------------------------------------------------------------------------------------------- safetensors reader
def test_reads_every_dtype_like_torch(mixed_file, mixed_tensors):
    with open_safetensors(mixed_file) as f:
        assert set(f.keys()) == set(mixed_tensors)
        assert f.metadata == {"format": "pt", "note": "hi"}
        for name, t in mixed_tensors.items():
            ours = f.get(name, dtype=None)
            assert _same_bits(ours, _as_numpy(t)), name  # bf16 exact, NaN/inf/-0 bits included
            if t.is_floating_point():
                assert _same_bits(f.get(name), t.float().numpy()), name
        assert f.info("bf16").dtype == "BF16" and f.info("bf16").shape == (2, 3, 11)
        assert f.get("i64").dtype == np.float32  # default conversion applies to integers too
        np.testing.assert_array_equal(f.get("i64"), mixed_tensors["i64"].numpy().astype(np.float32))


def test_float32_is_a_zero_copy_read_only_view(mixed_file):
    with SafetensorsFile(mixed_file) as f:
        a = f.get("f32")
        assert not a.flags.owndata and not a.flags.writeable
        with pytest.raises(ValueError):
            a[0, 0, 0] = 1.0
        converted = f.get("f16")
        assert converted.flags.owndata and converted.dtype == np.float32
    assert a.sum() == a.sum()  # views stay usable after close


def test_nonfinite_report(mixed_file):
    with SafetensorsFile(mixed_file) as f:
        found = {name: (bad, total) for name, bad, total in f.nonfinite()}
    # 3.0e38 overflows to inf in fp16 but not in bf16
    assert found == {"bf16_special": (3, 8), "f16_special": (4, 8)}
    lines = describe_nonfinite(mixed_file)
    assert any(line.startswith("bf16_special: 3 of 8") for line in lines)


# --------------------------------------------------------------------------------------------- corrupt files
def _write_raw(path: Path, header: dict | bytes, data: bytes = b"", header_len: int | None = None) -> Path:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if header_len is None else header_len) + blob + data)
    return path


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize("header, data, header_len, words", [
    ({"a": _entry()}, b"\0" * 8, 10 ** 9, ["header length", "beyond"]),
    (b"{not json", b"", None, ["malformed JSON"]),
    (b"\xff\xfe{}", b"", None, ["not UTF-8"]),
    (b"[1, 2]", b"", None, ["not an object"]),
    ({"a": _entry(offsets=(0, 8))}, b"\0" * 4, None, ["truncated", "'a'"]),
    ({"a": _entry(offsets=(16, 24))}, b"\0" * 8, None, ["out of range", "'a'"]),
    ({"a": _entry(offsets=(8, 4))}, b"\0" * 8, None, ["malformed data_offsets"]),
    ({"a": _entry(), "b": _entry(offsets=(4, 12))}, b"\0" * 12, None, ["overlap", "'a'", "'b'"]),
    ({"a": _entry(shape=(3,))}, b"\0" * 8, None, ["do not match shape"]),
    ({"a": _entry(dtype="F17")}, b"\0" * 8, None, ["unknown dtype 'F17'"]),
    ({"a": _entry(shape=(-2,))}, b"\0" * 8, None, ["malformed shape"]),
    ({"a": 3}, b"", None, ["malformed header entry"]),
    ({"__metadata__": {"x": 1}}, b"", None, ["__metadata__"]),
])
def test_corrupt_files_raise_one_line_errors(tmp_path, header, data, header_len, words):
    path = _write_raw(tmp_path / "bad.safetensors", header, data, header_len)
    with pytest.raises(BadModelFileError) as info:
        SafetensorsFile(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    for word in words:
        assert word in message


def test_unaligned_data_and_padded_header(tmp_path):
    """Headers padded with spaces are valid; a header of 0x280 bytes starts like a pickle (80 02) but is not one;
    an odd data start gives unaligned float32 data, which comes back as an aligned copy."""
    values = np.arange(6, dtype="<f4")
    for header_len in (0x280, 0x281):
        blob = json.dumps({"a": _entry(shape=(2, 3), offsets=(0, 24))}).encode().ljust(header_len)
        path = _write_raw(tmp_path / f"h{header_len}.safetensors", blob, values.tobytes())
        with SafetensorsFile(path) as f:
            a = f.get("a")
            assert a.flags.aligned and a.dtype == np.float32
            np.testing.assert_array_equal(a, values.reshape(2, 3))


def test_truncated_real_file(tmp_path, mixed_file):
    blob = mixed_file.read_bytes()
    for cut in (len(blob) - 3, 20, 5, 0):
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(blob[:cut])
        with pytest.raises(BadModelFileError, match="truncated|too short|beyond"):
            SafetensorsFile(path)


def test_missing_file_and_missing_tensor(tmp_path, mixed_file):
    with pytest.raises(BadModelFileError, match="not found"):
        SafetensorsFile(tmp_path / "nope.safetensors")
    with SafetensorsFile(mixed_file) as f, pytest.raises(BadModelFileError, match="no tensor named 'zzz'"):
        f.get("zzz")


def test_unsupported_but_valid_dtype_fails_on_read(tmp_path):
    path = _write_raw(tmp_path / "f8.safetensors", {"a": _entry(dtype="F8_E4M3", offsets=(0, 2))}, b"\0\0")
    f = SafetensorsFile(path)
    with pytest.raises(BadModelFileError, match="F8_E4M3"):
        f.get("a")


# --------------------------------------------------------------------------------------------- pickles
class _Trap:
    """Unpickling this creates a marker file: proof that something unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def no_unpickling(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickles_are_refused_unopened(tmp_path, suffix, no_unpickling):
    marker = tmp_path / "marker"
    path = tmp_path / f"model{suffix}"
    path.write_bytes(pickle.dumps({"w": _Trap(marker)}))
    with pytest.raises(BadModelFileError) as info:
        open_safetensors(path)
    assert "safetensors" in str(info.value) and str(path) in str(info.value)
    assert not marker.exists()


def test_pickle_content_under_safetensors_name(tmp_path, no_unpickling):
    marker = tmp_path / "marker"
    for name, blob in [("raw", pickle.dumps(_Trap(marker), protocol=2)), ("zip", b"PK\x03\x04" + b"\0" * 60)]:
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(blob)
        with pytest.raises(BadModelFileError, match="pickled"):
            SafetensorsFile(path)
    assert not marker.exists()


def test_folder_with_only_bin_weights_is_refused(tmp_path, no_unpickling):
    unet = tmp_path / "unet"
    unet.mkdir(parents=True)
    (unet / "config.json").write_text("{}")
    (unet / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(_Trap(tmp_path / "marker")))
    with pytest.raises(BadModelFileError, match="pickled weights"):
        load_component(tmp_path, "unet")
    assert not (tmp_path / "marker").exists()


# --------------------------------------------------------------------------------------------- diffusers folders
@pytest.fixture(scope="module")
def tiny_vae_dirs(tmp_path_factory):
    """A tiny AutoencoderKL saved by diffusers as fp32, fp16 sharded variant, bf16 sharded, and fp32 + fp16."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8,
                                  layers_per_block=1)
    root = tmp_path_factory.mktemp("pipes")
    reference = {k: v.detach().clone() for k, v in vae.state_dict().items()}
    vae.save_pretrained(root / "fp32" / "vae")
    vae.save_pretrained(root / "both" / "vae")
    half = copy.deepcopy(vae).to(torch.float16)
    half.save_pretrained(root / "fp16_sharded" / "vae", variant="fp16", max_shard_size="4KB")
    half.save_pretrained(root / "both" / "vae", variant="fp16")
    copy.deepcopy(vae).to(torch.bfloat16).save_pretrained(root / "bf16_sharded" / "vae", max_shard_size="4KB")
    return root, reference


def _check_vae(tensors, reference, dtype):
    assert set(tensors) == set(reference)
    for name, t in reference.items():
        expected = t.to(dtype).float().numpy()
        assert tensors[name].dtype == np.float32
        assert _same_bits(tensors[name], expected), name


def test_vae_fp32_fp16_bf16_and_shards(tiny_vae_dirs):
    root, reference = tiny_vae_dirs
    config, tensors = load_component(root / "fp32", "vae")
    assert config["_class_name"] == "AutoencoderKL" and config["latent_channels"] == 4
    _check_vae(tensors, reference, torch.float32)
    # only the fp16 variant present: picked automatically; sharded with an index.fp16.json
    assert find_weights(root / "fp16_sharded" / "vae").name == "diffusion_pytorch_model.safetensors.index.fp16.json"
    _check_vae(load_component(root / "fp16_sharded", "vae")[1], reference, torch.float16)
    _check_vae(load_component(root / "fp16_sharded", "vae", variant="fp16")[1], reference, torch.float16)
    _check_vae(load_component(root / "bf16_sharded", "vae")[1], reference, torch.bfloat16)


def test_variant_choice(tiny_vae_dirs):
    root, reference = tiny_vae_dirs
    assert find_weights(root / "both" / "vae").name == "diffusion_pytorch_model.safetensors"
    assert find_weights(root / "both" / "vae", "fp16").name == "diffusion_pytorch_model.fp16.safetensors"
    _check_vae(load_component(root / "both", "vae", variant="fp16")[1], reference, torch.float16)
    with pytest.raises(BadModelFileError, match="variant 'bf16'.*full precision, fp16"):
        load_component(root / "both", "vae", variant="bf16")


def test_missing_shard_is_reported(tiny_vae_dirs, tmp_path):
    import shutil

    root, _ = tiny_vae_dirs
    shutil.copytree(root / "bf16_sharded", tmp_path / "m")
    shard = sorted((tmp_path / "m" / "vae").glob("*-00002-of-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(BadModelFileError, match=f"{shard.name}.*missing"):
        load_component(tmp_path / "m", "vae")


def test_missing_pieces(tmp_path):
    with pytest.raises(ModelNotFoundError, match=str(tmp_path / "nowhere")):
        load_component(tmp_path / "nowhere", "unet")
    with pytest.raises(BadModelFileError, match="no unet folder"):
        load_component(tmp_path, "unet")
    (tmp_path / "unet").mkdir()
    with pytest.raises(BadModelFileError, match=r"unet[/\\]config.json"):
        load_component(tmp_path, "unet")
    (tmp_path / "unet" / "config.json").write_text("{}")
    with pytest.raises(BadModelFileError, match="no safetensors weights"):
        load_component(tmp_path, "unet")
    with pytest.raises(BadModelFileError, match="model_index.json"):
        read_model_index(tmp_path)
    (tmp_path / "model_index.json").write_text("{oops")
    with pytest.raises(BadModelFileError, match="malformed JSON"):
        read_model_index(tmp_path)
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    assert read_model_index(tmp_path)["_class_name"] == "StableDiffusionPipeline"
    with pytest.raises(BadModelFileError, match="scheduler_config.json"):
        load_scheduler_config(tmp_path)
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text('{"timestep_spacing": "trailing"}')
    assert load_scheduler_config(tmp_path) == {"timestep_spacing": "trailing"}


# --------------------------------------------------------------------------------------------- text encoders
@pytest.fixture(scope="module")
def clip_models(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    cfg = transformers.CLIPTextConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=8, projection_dim=8,
                                      bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(0)
    plain = transformers.CLIPTextModel(cfg)
    projected = transformers.CLIPTextModelWithProjection(cfg)
    root = tmp_path_factory.mktemp("te")
    plain.save_pretrained(root / "saved" / "text_encoder")
    projected.save_pretrained(root / "saved" / "text_encoder_2")
    return root, plain, projected


def _canonical_reference(model) -> dict[str, np.ndarray]:
    out = {}
    for name, t in model.state_dict().items():
        name = name.removeprefix("text_model.")
        if name != "embeddings.position_ids":
            out[name] = t.float().numpy()
    return out


def test_text_encoders_saved_by_transformers(clip_models):
    root, plain, projected = clip_models
    for component, model in (("text_encoder", plain), ("text_encoder_2", projected)):
        config, tensors = load_component(root / "saved", component)
        assert config["hidden_size"] == 16
        expected = _canonical_reference(model)
        assert set(tensors) == set(expected), component
        for name in expected:
            assert _same_bits(tensors[name], expected[name]), name
    assert "text_projection.weight" in load_component(root / "saved", "text_encoder_2")[1]


def test_text_encoder_hub_naming_gives_the_same_names(clip_models, tmp_path):
    """Hub files: every tensor under ``text_model.``, plus the int64 ``position_ids`` buffer, stored as fp16."""
    root, plain, _ = clip_models
    te = tmp_path / "text_encoder"
    te.mkdir()
    (te / "config.json").write_text((root / "saved" / "text_encoder" / "config.json").read_text())
    hub = {"text_model." + k.removeprefix("text_model."): v.half().contiguous() for k, v in plain.state_dict().items()}
    hub["text_model.embeddings.position_ids"] = torch.arange(8).unsqueeze(0)
    safetensors_torch.save_file(hub, str(te / "model.fp16.safetensors"))
    _, tensors = load_component(tmp_path, "text_encoder")
    saved = load_component(root / "saved", "text_encoder")[1]
    assert set(tensors) == set(saved)
    for name in saved:
        assert _same_bits(tensors[name], saved[name].astype(np.float16).astype(np.float32)), name


def test_text_encoder_with_both_namings_is_an_error(tmp_path):
    te = tmp_path / "text_encoder"
    te.mkdir()
    (te / "config.json").write_text("{}")
    safetensors_torch.save_file({"text_model.final_layer_norm.weight": torch.ones(2),
                                 "final_layer_norm.weight": torch.ones(2)},
                                str(te / "model.safetensors"))
    with pytest.raises(BadModelFileError, match="both with and without"):
        load_component(tmp_path, "text_encoder")
