"""``sdgen pull NAME``: download a registry model's diffusers folder from the Hugging Face Hub into the usual cache.

Only what sdgen loads is fetched: ``model_index.json``, the scheduler and tokenizer files, and for each model
component its ``config.json`` and one set of safetensors weights (full precision where the repo has it, or the
``--variant`` asked for; shards included). Pickled weights, other frameworks' files, the safety checker and
duplicate precisions are left on the Hub. The files land in the Hugging Face cache (``registry.hf_hub_cache()``),
where ``registry.locate`` finds them by the entry's ``repo``.

huggingface_hub is an optional dependency (``pip install 'sdgen[hub]'``). Without a network the command fails at
once with one line saying so (a quick connection check, rather than the client's retries).
"""

from __future__ import annotations

import difflib
import os
import re
import socket
from urllib.parse import urlparse

from .errors import ModelNotFoundError, SdgenError, UsageError

COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae")
SUPPORT_FOLDERS = ("scheduler", "tokenizer", "tokenizer_2")
WEIGHT_BASENAMES = ("diffusion_pytorch_model", "model")
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def find_spec(name: str):
    """The registry entry called ``name`` (or with that repo id); ModelNotFoundError naming the known ones."""
    from .registry import load_registry

    registry = load_registry()
    spec = registry.get(name) or registry.get(name.lower())
    if spec is None:
        spec = next((s for s in registry.values() if s.repo and s.repo.lower() == name.lower()), None)
    if spec is None:
        close = difflib.get_close_matches(name.lower(), list(registry), n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise ModelNotFoundError(f"{name!r} is not a model of the registry{hint} (known: "
                                 f"{', '.join(sorted(registry)) or 'none'}; see `sdgen models`)")
    return spec


def select_files(files: list[str], variant: str | None = None) -> list[str]:
    """The files of a diffusers repo that sdgen needs (see the module docstring), from the repo's file list."""
    present = set(files)
    if "model_index.json" not in present:
        raise UsageError("the repo has no model_index.json: not a diffusers model folder")
    chosen = ["model_index.json"]
    chosen += [f for f in files if f.split("/")[0] in SUPPORT_FOLDERS and f.count("/") == 1]
    for component in COMPONENTS:
        in_folder = [f for f in files if f.startswith(component + "/") and f.count("/") == 1]
        if not in_folder:
            continue
        if f"{component}/config.json" in present:
            chosen.append(f"{component}/config.json")
        chosen += _weights(component, in_folder, variant)
    return chosen


def _weights(component: str, in_folder: list[str], variant: str | None) -> list[str]:
    """One set of weights of a component: the variant asked for, else full precision, else fp16/bf16."""
    order = [variant] if variant else [None, "fp16", "bf16"]
    for v in order:
        suffix = f".{v}" if v else ""
        for base in WEIGHT_BASENAMES:
            single = f"{component}/{base}{suffix}.safetensors"
            if single in in_folder:
                return [single]
            index = f"{component}/{base}.safetensors.index{suffix}.json"
            if index in in_folder:
                shard = re.compile(re.escape(f"{component}/{base}{suffix}") + r"-\d+-of-\d+\.safetensors$")
                return [index] + [f for f in in_folder if shard.match(f)]
    names = ", ".join(sorted(f.split("/")[1] for f in in_folder))
    wanted = f"variant {variant!r}" if variant else "safetensors weights"
    raise UsageError(f"the repo's {component}/ has no {wanted} sdgen can load (it has: {names}); pickled "
                     "weights are never loaded")


def _check_network(endpoint: str) -> None:
    """Fail at once, in one line, when the Hub cannot be reached (no DNS, no route, refused)."""
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return  # the client goes through the proxy; let it report
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=10):
            pass
    except OSError as e:
        reason = e.strerror or str(e) or type(e).__name__
        raise SdgenError(f"no network: cannot reach {url.hostname} ({reason}); `sdgen pull` needs to download "
                         "from the Hugging Face Hub") from None


def _hub_error(e: Exception, repo: str) -> SdgenError:
    """One-line error for a failure of the Hub client."""
    from huggingface_hub import errors as hub_errors

    if isinstance(e, hub_errors.GatedRepoError):
        return SdgenError(f"{repo} is gated: accept its license on huggingface.co and log in (`hf auth login`)")
    if isinstance(e, hub_errors.RepositoryNotFoundError):
        return ModelNotFoundError(f"{repo}: no such repo on the Hugging Face Hub (or it is private)")
    if isinstance(e, hub_errors.RevisionNotFoundError):
        return UsageError(f"{repo}: no such revision")
    if isinstance(e, (hub_errors.OfflineModeIsEnabled, hub_errors.LocalEntryNotFoundError, ConnectionError)) or \
            "connect" in type(e).__name__.lower() or "timeout" in type(e).__name__.lower():
        return SdgenError(f"no network: cannot download {repo} ({type(e).__name__})")
    message = " ".join(str(e).split()) or type(e).__name__
    return SdgenError(f"cannot download {repo}: {message[:300]}")


def pull_model(name: str, variant: str | None = None, revision: str = "main", quiet: bool = False) -> str:
    """Download the model ``name`` of the registry; returns the local folder (a snapshot in the hub cache)."""
    from .registry import hf_hub_cache

    spec = find_spec(name)
    if not spec.repo:
        where = f" (its weights are at {spec.path})" if spec.path else ""
        raise UsageError(f"model {spec.name!r} has no Hugging Face repo to pull from{where}")
    try:
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError:
        raise SdgenError("`sdgen pull` needs huggingface_hub: pip install 'sdgen[hub]'") from None
    if constants.HF_HUB_OFFLINE:
        raise SdgenError("no network: HF_HUB_OFFLINE is set, so nothing can be downloaded")
    _check_network(constants.ENDPOINT)
    if quiet:
        huggingface_hub.utils.disable_progress_bars()
    try:
        files = huggingface_hub.HfApi().list_repo_files(spec.repo, revision=revision)
        wanted = select_files(files, variant)
        folder = huggingface_hub.snapshot_download(spec.repo, revision=revision, allow_patterns=wanted,
                                                   cache_dir=str(hf_hub_cache()))
    except SdgenError:
        raise
    except Exception as e:  # the client's errors: one line each
        raise _hub_error(e, spec.repo) from None
    return folder
