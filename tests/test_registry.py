"""The model registry: the shipped models.toml, user entries, and finding weights by name or path."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from sdgen import registry
from sdgen.errors import ModelNotFoundError, UsageError
from sdgen.registry import ModelSpec, default_model_name, hf_cache_snapshot, load_registry, resolve_model


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No real caches, models dirs or user config leak into these tests."""
    for var in ("SDGEN_MODELS_TOML", "SDGEN_MODELS_DIR", "SDGEN_DEFAULT_MODEL", "HF_HUB_CACHE",
                "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))


def _diffusers_folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    return path


def test_shipped_registry():
    models = load_registry()
    for name in ("toy", "sd14", "sd15", "sd21", "sd21-base", "sdxl", "sdxl-turbo", "sd-turbo"):
        assert name in models, name
    assert models["sd15"].repo == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert models["sd14"].repo == "CompVis/stable-diffusion-v1-4"
    sd21 = models["sd21"]
    assert (sd21.family, sd21.width, sd21.height, sd21.scheduler) == ("sd2", 768, 768, None)
    assert (models["sd21-base"].width, models["sd21-base"].repo) == (512, "stabilityai/stable-diffusion-2-1-base")
    sdxl = models["sdxl"]
    assert (sdxl.family, sdxl.width, sdxl.repo) == ("sdxl", 1024, "stabilityai/stable-diffusion-xl-base-1.0")
    turbo = models["sdxl-turbo"]
    assert (turbo.family, turbo.width, turbo.steps, turbo.guidance) == ("sdxl", 512, 1, 0.0)
    assert (turbo.scheduler, turbo.timestep_spacing) == ("euler_a", "trailing")
    sd_turbo = models["sd-turbo"]
    assert (sd_turbo.family, sd_turbo.steps, sd_turbo.guidance, sd_turbo.scheduler) == ("sd2", 1, 0.0, "euler")
    toy = models["toy"]
    assert toy.family == "sd1" and toy.path == Path(registry.__file__).resolve().parent / "data" / "toy"
    assert all(isinstance(spec, ModelSpec) and spec.family in registry.FAMILIES for spec in models.values())


def test_default_model_name(monkeypatch):
    assert default_model_name() == "toy"
    monkeypatch.setenv("SDGEN_DEFAULT_MODEL", "sd15")
    assert default_model_name() == "sd15"


def test_existing_paths_are_used_as_is(tmp_path):
    folder = _diffusers_folder(tmp_path / "some model")
    assert resolve_model(folder) == (None, folder)
    assert resolve_model(str(folder)) == (None, folder)
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"")
    assert resolve_model(single) == (None, single)


def test_models_dir(monkeypatch, tmp_path):
    models = tmp_path / "models"
    folder = _diffusers_folder(models / "sd15")
    monkeypatch.setenv("SDGEN_MODELS_DIR", os.pathsep.join([str(tmp_path / "empty"), str(models)]))
    spec, path = resolve_model("sd15")
    assert spec.name == "sd15" and path == folder
    assert resolve_model("SD15")[1] == folder  # names are matched case-insensitively
    # a folder without model_index.json is not a model
    (models / "sd14").mkdir()
    with pytest.raises(ModelNotFoundError, match="sd14"):
        resolve_model("sd14")
    single = models / "sd14.safetensors"
    single.write_bytes(b"")
    assert resolve_model("sd14")[1] == single


def test_hf_cache_layout(tmp_path):
    repo_dir = tmp_path / "hub" / "models--stabilityai--sd-turbo"
    old = _diffusers_folder(repo_dir / "snapshots" / "aaaa")
    new = _diffusers_folder(repo_dir / "snapshots" / "bbbb")
    (repo_dir / "snapshots" / "cccc").mkdir()  # partial download: no model_index.json
    os.utime(old, (time.time() - 100, time.time() - 100))
    spec, path = resolve_model("sd-turbo")
    assert spec.repo == "stabilityai/sd-turbo" and path == new  # newest snapshot with a model_index.json
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("aaaa\n")
    assert resolve_model("sd-turbo")[1] == old  # refs/main wins
    (repo_dir / "refs" / "main").write_text("cccc")
    assert resolve_model("sd-turbo")[1] == new  # ... unless it names an incomplete snapshot


def test_repo_ids(tmp_path):
    repo_dir = tmp_path / "hub" / "models--stabilityai--sd-turbo"
    folder = _diffusers_folder(repo_dir / "snapshots" / "aaaa")
    spec, path = resolve_model("stabilityai/sd-turbo")  # a registered repo: its spec
    assert spec.name == "sd-turbo" and path == folder
    other = _diffusers_folder(tmp_path / "hub" / "models--someone--thing" / "snapshots" / "r1")
    assert resolve_model("someone/thing") == (None, other)  # unregistered, but in the cache
    with pytest.raises(ModelNotFoundError, match="no such file or folder"):
        resolve_model("someone/else")
    with pytest.raises(ModelNotFoundError, match="no such file or folder"):
        resolve_model(str(tmp_path / "missing.safetensors"))


def test_hf_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert registry.hf_hub_cache() == tmp_path / "hf" / "hub"
    monkeypatch.delenv("HF_HOME")
    assert registry.hf_hub_cache() == tmp_path / "home" / ".cache" / "huggingface" / "hub"
    folder = _diffusers_folder(registry.hf_hub_cache() / "models--CompVis--stable-diffusion-v1-4" / "snapshots" / "x")
    assert hf_cache_snapshot("CompVis/stable-diffusion-v1-4") == folder
    assert hf_cache_snapshot("nobody/nothing") is None


def test_not_found_message(tmp_path):
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("sdxl")
    message = str(info.value)
    assert "\n" not in message
    for part in ("'sdxl'", "SDGEN_MODELS_DIR", str(tmp_path / "hub"), "stabilityai/stable-diffusion-xl-base-1.0",
                 "--model PATH"):
        assert part in message, part


def test_unknown_name_suggests_close_ones():
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("sd1.5")
    message = str(info.value)
    assert "neither an existing path nor a known model name" in message and "sd15" in message
    assert "\n" not in message


def test_user_entries_merge(tmp_path):
    user = tmp_path / "config" / "sdgen" / "models.toml"
    user.parent.mkdir(parents=True)
    weights = _diffusers_folder(user.parent / "weights" / "mine")
    user.write_text('[models.sd15]\nsteps = 30\n\n'
                    '[models.mine]\nfamily = "sdxl"\npath = "weights/mine"\nguidance = 3\n')
    models = load_registry()
    assert models["sd15"].steps == 30 and models["sd15"].repo == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    mine = models["mine"]
    assert (mine.width, mine.height, mine.steps, mine.guidance) == (1024, 1024, 50, 3.0)  # family defaults
    assert resolve_model("mine") == (mine, weights)


def test_models_toml_override_and_errors(monkeypatch, tmp_path):
    own = tmp_path / "own.toml"
    own.write_text('[models.only]\nfamily = "sd1"\nrepo = "me/only"\n')
    monkeypatch.setenv("SDGEN_MODELS_TOML", str(own))
    assert list(load_registry()) == ["only"]
    for text, words in [
        ('[models.x]\nfamily = "sd9"\n', "family"),
        ('[models.x]\nfamily = "sd1"\nwidht = 3\n', "unknown key 'widht'"),
        ('[models.x]\nfamily = "sd1"\nwidth = "big"\n', "wrong type"),
        ('[models.x\n', "malformed TOML"),
    ]:
        own.write_text(text)
        with pytest.raises(UsageError, match=words):
            load_registry()
    monkeypatch.setenv("SDGEN_MODELS_TOML", str(tmp_path / "missing.toml"))
    with pytest.raises(UsageError, match="SDGEN_MODELS_TOML"):
        load_registry()
