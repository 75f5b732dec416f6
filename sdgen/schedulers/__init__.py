"""Noise schedulers that reproduce diffusers' number for number, in numpy.

    make_scheduler(name, config, **overrides) -> Scheduler
    scheduler_names() -> [(name, aliases, description), ...]

config is the model's ``scheduler/scheduler_config.json`` as a dict. ``name=None`` builds the class the config names
(``_class_name``); otherwise name is one of the user-facing names or aliases below (case-insensitive; spaces, ``-``
and ``_`` are interchangeable). Like diffusers' ``Scheduler.from_config(model_scheduler.config)``, the new scheduler
takes the keys of the model's config it knows (betas, prediction_type, steps_offset, ...) and its own defaults for
the rest; then the name's preset (e.g. Karras sigmas) and the overrides are applied.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import UsageError
from .base import Scheduler, SigmaScheduler
from .ddim import DDIMScheduler
from .dpmsolver_multistep import DPMSolverMultistepScheduler
from .euler import EulerDiscreteScheduler
from .euler_ancestral import EulerAncestralDiscreteScheduler
from .pndm import PNDMScheduler

__all__ = [
    "Scheduler", "SigmaScheduler", "make_scheduler", "scheduler_names", "scheduler_classes",
    "PNDMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
]

_CLASSES: dict[str, type[Scheduler]] = {
    cls.diffusers_class: cls
    for cls in (PNDMScheduler, DDIMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
                DPMSolverMultistepScheduler)
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
)


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


def _resolve(name: str) -> _Entry:
    entry = _LOOKUP.get(_norm(name))
    if entry is not None:
        return entry
    close = difflib.get_close_matches(_norm(name), list(_LOOKUP), n=3, cutoff=0.5)
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
    entry = _resolve(name)
    return entry.cls.from_config(config, **{**entry.preset, **overrides})
