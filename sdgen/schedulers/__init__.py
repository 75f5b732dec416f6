"""Noise schedulers that reproduce diffusers' number for number, in numpy.

    make_scheduler(name, config, **overrides) -> Scheduler
    scheduler_names() -> [(name, aliases, description), ...]

config is the model's ``scheduler/scheduler_config.json`` as a dict. ``name=None`` builds the class the config names
(``_class_name``); otherwise name is one of the user-facing names or aliases below (case-insensitive; spaces, ``-``
and ``_`` are interchangeable). Like diffusers' ``Scheduler.from_config(model_scheduler.config)``, the new scheduler
takes the keys of the model's config it knows (betas, prediction_type, steps_offset, ...) and its own defaults for
the rest; then the name's preset (e.g. Karras sigmas) and the overrides are applied.

Any name of a scheduler with Karras, exponential or beta sigmas can also take the suffix " karras", " exponential"
or " beta" (e.g. "unipc karras", "dpmpp_2s exponential", "euler beta"). The A1111 / k-diffusion names are aliases
only where diffusers' documented equivalent is the same algorithm ("dpm2 a karras" is
KDPM2AncestralDiscreteScheduler with Karras sigmas); A1111's "DPM++ SDE" and "DPM++ 2S a" have no exact diffusers
counterpart here and are not aliases.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import UsageError
from .base import IndexedScheduler, Scheduler, SigmaScheduler, SolverScheduler
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .deis import DEISMultistepScheduler
from .dpmsolver_multistep import DPMSolverMultistepScheduler
from .dpmsolver_singlestep import DPMSolverSinglestepScheduler
from .euler import EulerDiscreteScheduler
from .euler_ancestral import EulerAncestralDiscreteScheduler
from .heun import HeunDiscreteScheduler
from .kdpm2 import KDPM2DiscreteScheduler
from .kdpm2_ancestral import KDPM2AncestralDiscreteScheduler
from .lcm import LCMScheduler
from .lms import LMSDiscreteScheduler
from .pndm import PNDMScheduler
from .tcd import TCDScheduler
from .unipc import UniPCMultistepScheduler

__all__ = [
    "Scheduler", "IndexedScheduler", "SigmaScheduler", "SolverScheduler", "make_scheduler", "scheduler_names",
    "scheduler_classes",
    "PNDMScheduler", "DDIMScheduler", "DDPMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
    "DEISMultistepScheduler", "UniPCMultistepScheduler", "LCMScheduler", "TCDScheduler",
]

_CLASSES: dict[str, type[Scheduler]] = {
    cls.diffusers_class: cls
    for cls in (PNDMScheduler, DDIMScheduler, DDPMScheduler, LMSDiscreteScheduler, EulerDiscreteScheduler,
                EulerAncestralDiscreteScheduler, HeunDiscreteScheduler, KDPM2DiscreteScheduler,
                KDPM2AncestralDiscreteScheduler, DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler,
                DEISMultistepScheduler, UniPCMultistepScheduler, LCMScheduler, TCDScheduler)
}


@dataclass(frozen=True)
class _Entry:
    name: str
    cls: type[Scheduler]
    description: str
    aliases: tuple[str, ...] = ()
    preset: dict[str, Any] = field(default_factory=dict)


_ENTRIES: tuple[_Entry, ...] = (
    _Entry("pndm", PNDMScheduler, "PNDM / PLMS linear multistep (Stable Diffusion 1.x default)",
           ("plms", "PNDMScheduler")),
    _Entry("ddim", DDIMScheduler, "DDIM, deterministic (eta = 0)", ("DDIMScheduler",)),
    _Entry("euler", EulerDiscreteScheduler, "Euler (k-diffusion style, first order)",
           ("euler discrete", "EulerDiscreteScheduler", "k_euler")),
    _Entry("euler_karras", EulerDiscreteScheduler, "Euler with Karras sigmas", ("euler karras", "k_euler_karras"),
           {"use_karras_sigmas": True}),
    _Entry("euler_a", EulerAncestralDiscreteScheduler, "Euler ancestral: adds fresh noise every step (stochastic)",
           ("euler ancestral", "euler_ancestral", "euler a", "EulerAncestralDiscreteScheduler", "k_euler_a",
            "k_euler_ancestral")),
    _Entry("dpmpp_2m", DPMSolverMultistepScheduler, "DPM-Solver++ 2M, second-order multistep",
           ("dpm++ 2m", "dpm++2m", "dpmsolver++", "dpm solver++", "dpmpp2m",
            "DPMSolverMultistepScheduler", "k_dpmpp_2m")),
    _Entry("dpmpp_2m_karras", DPMSolverMultistepScheduler, "DPM-Solver++ 2M with Karras sigmas",
           ("dpm++ 2m karras", "dpm++2m karras", "dpmpp2m karras", "k_dpmpp_2m_karras"),
           {"use_karras_sigmas": True}),
    _Entry("dpmpp_2m_sde", DPMSolverMultistepScheduler, "DPM-Solver++ 2M SDE (stochastic)",
           ("dpm++ 2m sde", "dpm++2m sde", "sde-dpmsolver++"), {"algorithm_type": "sde-dpmsolver++"}),
    _Entry("dpmpp_2m_sde_karras", DPMSolverMultistepScheduler, "DPM-Solver++ 2M SDE with Karras sigmas (stochastic)",
           ("dpm++ 2m sde karras", "dpm++2m sde karras"),
           {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
    _Entry("dpmpp_3m", DPMSolverMultistepScheduler, "DPM-Solver++ 3M, third-order multistep",
           ("dpm++ 3m", "dpm++3m", "dpmpp3m"), {"solver_order": 3}),
    _Entry("dpmpp_2s", DPMSolverSinglestepScheduler, "DPM-Solver++(2S), second-order singlestep",
           ("dpm++ 2s", "dpm++2s", "dpmpp2s", "dpmsolver singlestep", "dpm solver singlestep",
            "DPMSolverSinglestepScheduler")),
    _Entry("dpmpp_2s_karras", DPMSolverSinglestepScheduler, "DPM-Solver++(2S) with Karras sigmas",
           ("dpm++ 2s karras", "dpm++2s karras", "dpmpp2s karras"), {"use_karras_sigmas": True}),
    _Entry("lms", LMSDiscreteScheduler, "LMS: fourth-order linear multistep in sigma (k-diffusion)",
           ("lms discrete", "LMSDiscreteScheduler", "k_lms")),
    _Entry("lms_karras", LMSDiscreteScheduler, "LMS with Karras sigmas", ("lms karras", "k_lms_karras"),
           {"use_karras_sigmas": True}),
    _Entry("heun", HeunDiscreteScheduler, "Heun: second order, two model calls per step (k-diffusion)",
           ("heun discrete", "HeunDiscreteScheduler", "k_heun")),
    _Entry("heun_karras", HeunDiscreteScheduler, "Heun with Karras sigmas", ("heun karras", "k_heun_karras"),
           {"use_karras_sigmas": True}),
    _Entry("dpm2", KDPM2DiscreteScheduler, "DPM2 (KDPM2): second-order midpoint, two model calls per step",
           ("kdpm2", "k_dpm_2", "KDPM2DiscreteScheduler")),
    _Entry("dpm2_karras", KDPM2DiscreteScheduler, "DPM2 with Karras sigmas", ("dpm2 karras", "k_dpm_2_karras"),
           {"use_karras_sigmas": True}),
    _Entry("dpm2_a", KDPM2AncestralDiscreteScheduler,
           "DPM2 ancestral: DPM2 plus fresh noise every step (stochastic)",
           ("dpm2 a", "dpm2 ancestral", "dpm2a", "kdpm2 ancestral", "kdpm2_a", "k_dpm_2_a", "k_dpm_2_ancestral",
            "KDPM2AncestralDiscreteScheduler")),
    _Entry("dpm2_a_karras", KDPM2AncestralDiscreteScheduler, "DPM2 ancestral with Karras sigmas (stochastic)",
           ("dpm2 a karras", "dpm2a karras", "k_dpm_2_a_karras"), {"use_karras_sigmas": True}),
    _Entry("deis", DEISMultistepScheduler, "DEIS: exponential-integrator multistep (logrho)",
           ("deis multistep", "DEISMultistepScheduler")),
    _Entry("unipc", UniPCMultistepScheduler, "UniPC: unified predictor-corrector multistep (bh2)",
           ("uni pc", "unipc multistep", "UniPCMultistepScheduler")),
    _Entry("ddpm", DDPMScheduler, "DDPM ancestral sampling (stochastic; made for many steps)", ("DDPMScheduler",)),
    _Entry("lcm", LCMScheduler, "LCM: latent consistency model sampling, for LCM-distilled models (stochastic)",
           ("LCMScheduler", "latent consistency")),
    _Entry("tcd", TCDScheduler, "TCD: trajectory consistency distillation sampling, gamma (eta) 0.3 (stochastic)",
           ("TCDScheduler",)),
)

#: name suffixes that switch on a sigma schedule for any scheduler that has it
_SUFFIXES = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas", "beta": "use_beta_sigmas"}


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", "_", name.strip().lower())


_LOOKUP: dict[str, _Entry] = {}
for _e in _ENTRIES:
    for _n in (_e.name, *_e.aliases):
        _LOOKUP.setdefault(_norm(_n), _e)


def scheduler_names() -> list[tuple[str, list[str], str]]:
    """(name, aliases, one-line description) of every scheduler name, for ``sdgen schedulers``."""
    return [(e.name, list(e.aliases), e.description) for e in _ENTRIES]


def scheduler_classes() -> dict[str, type[Scheduler]]:
    """diffusers class name -> our class."""
    return dict(_CLASSES)


def _resolve(name: str) -> tuple[_Entry, dict[str, Any]]:
    """The entry a name means, and the extra preset a " karras" / " exponential" suffix adds."""
    key = _norm(name)
    entry = _LOOKUP.get(key)
    if entry is not None:
        return entry, {}
    for suffix, option in _SUFFIXES.items():
        if key.endswith("_" + suffix):
            base = _LOOKUP.get(key[: -len(suffix) - 1])
            if base is not None and option in base.cls.defaults and not any(
                    base.preset.get(o) for o in _SUFFIXES.values()):
                return base, {option: True}
    close = difflib.get_close_matches(key, list(_LOOKUP), n=3, cutoff=0.5)
    names = []
    for c in close:
        canonical = _LOOKUP[c].name
        if canonical not in names:
            names.append(canonical)
    hint = f"did you mean {' or '.join(names)}? " if names else ""
    raise UsageError(f"unknown scheduler {name!r}; {hint}(`sdgen schedulers` lists them: "
                     f"{', '.join(e.name for e in _ENTRIES)})")


def make_scheduler(name: str | None, config: dict, **overrides) -> Scheduler:
    """A scheduler for a model whose scheduler config is config (see the module docstring)."""
    config = dict(config or {})
    if name is None:
        class_name = config.get("_class_name")
        cls = _CLASSES.get(class_name)
        if cls is None:
            raise UsageError(f"the model's scheduler {class_name or '(none named)'} is not supported; "
                             f"choose one with --scheduler ({', '.join(e.name for e in _ENTRIES)})")
        return cls.from_config(config, **overrides)
    entry, suffix_preset = _resolve(name)
    return entry.cls.from_config(config, **{**entry.preset, **suffix_preset, **overrides})
