"""The model registry: models.toml entries -> ModelSpec, and a model name or path -> the weights on disk.

Where the registry comes from: ``$SDGEN_MODELS_TOML`` if set, else ``models.toml`` at the project root (next to
the ``sdgen`` package, as installed by ``pip install -e .``); then entries of the user's
``$XDG_CONFIG_HOME/sdgen/models.toml`` (default ``~/.config/sdgen/models.toml``) are merged in, key by key, so a
user file may add models or change e.g. just the ``path`` of a known one.

Reading TOML needs Python 3.11's ``tomllib`` (or the ``tomli`` package on 3.10).
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelNotFoundError, SdgenError, UsageError

try:
    import tomllib
except ImportError:  # Python 3.10
    try:
        import tomli as tomllib  # type: ignore[no-redef]
    except ImportError:
        tomllib = None  # type: ignore[assignment]

PROJECT_MODELS_TOML = Path(__file__).resolve().parent.parent / "models.toml"
FAMILIES = ("sd1", "sd2", "sdxl")
# Defaults per family where an entry leaves them out: diffusers' pipeline defaults.
_FAMILY_DEFAULTS = {
    "sd1": {"width": 512, "height": 512, "steps": 50, "guidance": 7.5},
    "sd2": {"width": 768, "height": 768, "steps": 50, "guidance": 7.5},
    "sdxl": {"width": 1024, "height": 1024, "steps": 50, "guidance": 5.0},
}
_KEYS = {"family": str, "repo": str, "path": str, "width": int, "height": int, "steps": int,
         "guidance": (int, float), "scheduler": str, "timestep_spacing": str, "description": str, "config": str}


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry. ``scheduler``/``timestep_spacing`` None = use the model's own scheduler config."""

    name: str
    family: str
    repo: str | None
    width: int
    height: int
    steps: int
    guidance: float
    scheduler: str | None = None
    timestep_spacing: str | None = None
    path: Path | None = None
    description: str = ""
    config: str | None = None  # single-file weights: a bundled config name or a diffusers folder (--config)


# ------------------------------------------------------------------------------------------------ reading TOML
def user_models_toml() -> Path:
    """The user's own registry file (may not exist)."""
    config_home = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config_home) / "sdgen" / "models.toml"


def _read_toml(path: Path) -> dict[str, dict]:
    """The ``[models.NAME]`` tables of ``path``, with relative ``path`` values made absolute."""
    if tomllib is None:
        raise SdgenError("reading models.toml needs Python 3.11 or later (tomllib), or the tomli package")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise UsageError(f"{path}: cannot read the model registry ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: malformed TOML: {e}") from None
    models = data.get("models", {})
    if not isinstance(models, dict) or not all(isinstance(v, dict) for v in models.values()):
        raise UsageError(f"{path}: expected [models.NAME] tables")
    out = {}
    for name, entry in models.items():
        for key, value in entry.items():
            if key not in _KEYS:
                raise UsageError(f"{path}: model {name!r} has unknown key {key!r} (known: {', '.join(_KEYS)})")
            if not isinstance(value, _KEYS[key]) or isinstance(value, bool):
                raise UsageError(f"{path}: model {name!r}: {key} = {value!r} has the wrong type")
        entry = dict(entry)
        if "path" in entry:
            entry["path"] = str((path.parent / Path(entry["path"]).expanduser()).resolve())
        out[name] = entry
    return out


def _spec(name: str, entry: dict, source: str) -> ModelSpec:
    family = entry.get("family")
    if family not in FAMILIES:
        raise UsageError(f"{source}: model {name!r} needs family = one of {', '.join(FAMILIES)} (got {family!r})")
    values = {**_FAMILY_DEFAULTS[family], **entry}
    for key in ("width", "height", "steps"):
        if values[key] < 1:
            raise UsageError(f"{source}: model {name!r}: {key} must be positive")
    return ModelSpec(
        name=name, family=family, repo=values.get("repo"), width=values["width"], height=values["height"],
        steps=values["steps"], guidance=float(values["guidance"]), scheduler=values.get("scheduler"),
        timestep_spacing=values.get("timestep_spacing"),
        path=Path(values["path"]) if "path" in values else None, description=values.get("description", ""),
        config=values.get("config"),
    )


def registry_files() -> list[Path]:
    """The registry files read, in order (later ones override earlier ones); only those that exist."""
    override = os.environ.get("SDGEN_MODELS_TOML")
    files = [Path(override).expanduser()] if override else [PROJECT_MODELS_TOML]
    if override and not files[0].is_file():
        raise UsageError(f"$SDGEN_MODELS_TOML points to {files[0]}, which does not exist")
    files.append(user_models_toml())
    return [f for f in files if f.is_file()]


def load_registry() -> dict[str, ModelSpec]:
    """Every known model, by name."""
    merged: dict[str, dict] = {}
    sources: dict[str, Path] = {}
    for path in registry_files():
        for name, entry in _read_toml(path).items():
            merged[name] = {**merged.get(name, {}), **entry}
            sources[name] = path
    return {name: _spec(name, entry, str(sources[name])) for name, entry in merged.items()}


def get_spec(name: str) -> ModelSpec | None:
    """The registry entry called ``name``, or None."""
    return load_registry().get(name)


def default_model_name() -> str:
    """The model used when none is given: ``$SDGEN_DEFAULT_MODEL``, else ``toy``."""
    return os.environ.get("SDGEN_DEFAULT_MODEL") or "toy"


# ------------------------------------------------------------------------------------------------ finding weights
def hf_hub_cache() -> Path:
    """The Hugging Face hub cache folder, as huggingface_hub decides it."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home).expanduser() / "huggingface" / "hub"


def hf_cache_snapshot(repo: str, cache: Path | None = None) -> Path | None:
    """The snapshot folder of ``repo`` in the hub cache that has a model_index.json: the one ``refs/main``
    names if it qualifies, else the most recently modified; None if there is none."""
    repo_dir = (cache or hf_hub_cache()) / ("models--" + repo.replace("/", "--"))
    snapshots = repo_dir / "snapshots"
    if not snapshots.is_dir():
        return None
    try:
        main = (repo_dir / "refs" / "main").read_text().strip()
    except OSError:
        main = ""
    if main and (snapshots / main / "model_index.json").is_file():
        return snapshots / main
    candidates = [d for d in snapshots.iterdir() if (d / "model_index.json").is_file()]
    return max(candidates, key=lambda d: d.stat().st_mtime, default=None)


def _is_model(path: Path) -> bool:
    """A diffusers folder (has model_index.json) or a single .safetensors file."""
    return (path / "model_index.json").is_file() if path.is_dir() else path.is_file()


def _models_dirs() -> list[Path]:
    value = os.environ.get("SDGEN_MODELS_DIR", "")
    return [Path(p).expanduser() for p in value.split(os.pathsep) if p]


def locate(spec: ModelSpec) -> tuple[Path | None, list[str]]:
    """Where ``spec``'s weights are on this machine, and the places looked at (for error messages)."""
    looked: list[str] = []
    candidates: list[Path] = []
    if spec.path is not None:
        candidates.append(spec.path)
    for models_dir in _models_dirs():
        candidates += [models_dir / spec.name, models_dir / f"{spec.name}.safetensors"]
    for candidate in candidates:
        if _is_model(candidate):
            return candidate, looked
        looked.append(str(candidate))
    if not _models_dirs():
        looked.append("$SDGEN_MODELS_DIR (not set)")
    if spec.repo:
        snapshot = hf_cache_snapshot(spec.repo)
        if snapshot is not None:
            return snapshot, looked
        looked.append(f"the Hugging Face cache {hf_hub_cache()} for {spec.repo}")
    return None, looked


def resolve_model(name_or_path: str | os.PathLike) -> tuple[ModelSpec | None, Path]:
    """``(spec, weights path)`` for a registry name, a path, or a Hugging Face repo id.

    An existing path is returned as is, with no spec (a diffusers folder or a single .safetensors file). A repo
    id (``org/name``) selects the registry entry with that repo, else its snapshot in the Hugging Face cache.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return None, path
    name = str(name_or_path)
    registry = load_registry()
    spec = registry.get(name) or registry.get(name.lower())
    if spec is None:
        spec = next((s for s in registry.values() if s.repo and s.repo.lower() == name.lower()), None)
    if spec is None and name.count("/") == 1 and not name.startswith((".", "/", "~")):
        snapshot = hf_cache_snapshot(name)
        if snapshot is not None:
            return None, snapshot
    if spec is None and ("/" in name or os.sep in name or name.endswith(".safetensors")):
        raise ModelNotFoundError(f"{name}: no such file or folder (nor a Hugging Face repo in the cache "
                                 f"{hf_hub_cache()})")
    if spec is None:
        close = difflib.get_close_matches(name.lower(), list(registry), n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        known = ", ".join(sorted(registry)) or "none"
        raise ModelNotFoundError(f"{name!r} is neither an existing path nor a known model name{hint} "
                                 f"(known: {known})")
    found, looked = locate(spec)
    if found is None:
        source = f" (download the diffusers folder of {spec.repo}" if spec.repo else " (get its diffusers folder"
        raise ModelNotFoundError(
            f"no weights for model {spec.name!r}; looked in {', '.join(looked)}{source} and pass --model PATH, "
            f"or put it under $SDGEN_MODELS_DIR/{spec.name})"
        )
    return spec, found
