"""The Scheduler base class: config handling shaped like diffusers' ConfigMixin, the noise schedule every scheduler
starts from, and the step-index bookkeeping of the sigma-based schedulers.

A scheduler is driven exactly like a diffusers one::

    sched.set_timesteps(n)
    latents = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.scale_model_input(latents, t)
        latents = sched.step(model(x, t), t, latents, generator=generator)

Samples are float32 numpy arrays, batch first. A multi-stage scheduler (Heun, KDPM2) lists each timestep as often
as it wants the model evaluated, exactly as diffusers does, so the loop above stays the same for every scheduler.

Class tree: ``Scheduler`` (betas and config) -> ``IndexedScheduler`` (diffusers' ``step_index`` / ``begin_index``
bookkeeping) -> ``SigmaScheduler`` (a table of VE sigmas; inputs scaled by 1 / sqrt(sigma^2 + 1)) ->
``SolverScheduler`` (the DPM-Solver family: VP arithmetic on the same sigma table, unscaled inputs).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from ..errors import UsageError
from . import schedules as S


class Scheduler:
    #: The diffusers class this one reproduces.
    diffusers_class: ClassVar[str] = ""
    #: The config keys this scheduler accepts, with the defaults of the diffusers class's ``__init__``.
    defaults: ClassVar[dict[str, Any]] = {}
    #: diffusers' ``order``: model evaluations per solver step (2 for Heun and KDPM2; informational only, since their
    #: ``timesteps`` already repeat each timestep once per evaluation).
    order: ClassVar[int] = 1
    #: Whether ``rescale_betas_zero_snr`` also clamps the last alpha_bar to 2**-24 (the sigma-based ones do).
    _zero_snr_clamp_last: ClassVar[bool] = False

    def __init__(self, **config):
        unknown = sorted(set(config) - set(self.defaults))
        if unknown:
            raise UsageError(f"{self.diffusers_class} has no option {', '.join(unknown)}")
        self.config: dict[str, Any] = {**self.defaults, **config}
        c = self.config
        pt = c.get("prediction_type")
        if pt is not None and pt not in self._prediction_types():
            raise UsageError(f"{self.diffusers_class} does not support prediction_type {pt!r} "
                             f"(one of {', '.join(self._prediction_types())})")
        if c.get("timestep_spacing", "leading") not in S.TIMESTEP_SPACINGS:
            raise UsageError(f"timestep_spacing {c['timestep_spacing']!r} is not supported "
                             f"(one of {', '.join(S.TIMESTEP_SPACINGS)})")
        self.betas = S.make_betas(c["num_train_timesteps"], c["beta_start"], c["beta_end"], c["beta_schedule"],
                                  c.get("trained_betas"))
        if c.get("rescale_betas_zero_snr"):
            self.betas = S.rescale_zero_terminal_snr(self.betas)
        self.alphas = S.F32(1.0) - self.betas
        self.alphas_cumprod = S.cumprod_f32(self.alphas)
        if c.get("rescale_betas_zero_snr") and self._zero_snr_clamp_last:
            self.alphas_cumprod[-1] = 2.0 ** -24
        self.num_inference_steps: int | None = None
        self.timesteps = np.arange(0, c["num_train_timesteps"])[::-1].astype(np.int64)

    # ------------------------------------------------------------------------------------------ config
    @classmethod
    def from_config(cls, config: dict, **overrides) -> "Scheduler":
        """Like diffusers' ``cls.from_config(other.config, **overrides)``: take the keys of config this class knows
        (except those the other scheduler only had as defaults, listed in ``_use_default_values``), this class's
        defaults for the rest, then the overrides."""
        defaulted = set(config.get("_use_default_values") or ())
        shared = {k: v for k, v in config.items() if k in cls.defaults and k not in defaulted}
        shared.update(overrides)
        return cls(**shared)

    @classmethod
    def _prediction_types(cls) -> tuple[str, ...]:
        return ("epsilon", "v_prediction")

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.config.items() if v != self.defaults.get(k)}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in changed.items())})"

    # ------------------------------------------------------------------------------------------ interface
    init_noise_sigma = 1.0

    def set_timesteps(self, num_inference_steps: int) -> None:
        raise NotImplementedError

    def scale_model_input(self, sample: np.ndarray, timestep=None) -> np.ndarray:
        return sample

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, generator=None) -> np.ndarray:
        raise NotImplementedError

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps) -> np.ndarray:
        """sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise, per batch item (DDPM-style schedulers)."""
        t = S.as_timestep_array(timesteps).astype(np.int64)
        ac = self.alphas_cumprod.astype(original_samples.dtype)[t]
        a = S.per_batch(np.sqrt(ac), original_samples.ndim)
        b = S.per_batch(np.sqrt(1 - ac), original_samples.ndim)
        return a * original_samples + b * noise

    def __len__(self) -> int:
        return self.config["num_train_timesteps"]


class IndexedScheduler(Scheduler):
    """A scheduler that finds its place in ``timesteps`` with a step index (diffusers' ``_step_index`` /
    ``_begin_index``): the first call looks the timestep up, later calls just count."""

    #: index_for_timestep of a timestep not in the schedule: the last index (DPM-Solver) or an error (Euler).
    _missing_timestep_is_last: ClassVar[bool] = False

    def __init__(self, **config):
        super().__init__(**config)
        self._step_index: int | None = None
        self._begin_index: int | None = None

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at this index instead of looking the first timestep up (img2img sets it)."""
        self._begin_index = begin_index

    def index_for_timestep(self, timestep, schedule_timesteps: np.ndarray | None = None) -> int:
        """Position of timestep in the schedule; the second match if it occurs twice (so that an img2img run that
        starts mid-schedule does not skip a sigma)."""
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        hits = np.nonzero(schedule_timesteps == np.asarray(timestep).reshape(()))[0]
        if len(hits) == 0:
            if self._missing_timestep_is_last:
                return len(self.timesteps) - 1
            raise UsageError(f"timestep {timestep} is not one of the scheduler's timesteps")
        return int(hits[1] if len(hits) > 1 else hits[0])

    def _init_step_index(self, timestep) -> None:
        if self._begin_index is None:
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    def _reset_step_index(self) -> None:
        self._step_index = None
        self._begin_index = None

    def _noise_step_indices(self, timesteps) -> list[int]:
        t = S.as_timestep_array(timesteps)
        if self._begin_index is None:
            return [self.index_for_timestep(x) for x in t]
        if self._step_index is not None:
            return [self._step_index] * len(t)
        return [self._begin_index] * len(t)


class SigmaScheduler(IndexedScheduler):
    """Base of the schedulers that walk a table of VE sigmas, sigma = sqrt((1 - alpha_bar) / alpha_bar), with a
    step index (Euler, Euler ancestral, LMS, Heun, KDPM2, and via SolverScheduler the DPM-Solver family)."""

    _zero_snr_clamp_last = True

    @property
    def init_noise_sigma(self):
        max_sigma = self.sigmas.max()
        if self.config["timestep_spacing"] in ("linspace", "trailing"):
            return max_sigma
        return S.sqrt32(max_sigma * max_sigma + S.F32(1))

    def scale_model_input(self, sample: np.ndarray, timestep=None) -> np.ndarray:
        """sample / sqrt(sigma^2 + 1): the model was trained on unit-variance inputs."""
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self._step_index]
        return sample / S.sqrt32(sigma * sigma + S.F32(1))

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps) -> np.ndarray:
        """original + noise * sigma_t (the VE form of the k-diffusion schedulers)."""
        sigmas = self.sigmas.astype(original_samples.dtype)
        sigma = S.per_batch(sigmas[self._noise_step_indices(timesteps)], original_samples.ndim)
        return original_samples + noise * sigma


class SolverScheduler(SigmaScheduler):
    """Base of the DPM-Solver family (DPM-Solver multistep / singlestep, DEIS, UniPC): the same sigma table read as
    the VP pair alpha_t = 1 / sqrt(sigma^2 + 1), sigma_t = sigma alpha_t; the model input is not scaled."""

    init_noise_sigma = 1.0
    _missing_timestep_is_last = True

    @staticmethod
    def _alpha_sigma(sigma):
        """(alpha_t, sigma_t) of the VP process from the VE sigma: alpha = 1 / sqrt(sigma^2 + 1)."""
        alpha = S.F32(1) / S.sqrt32(sigma * sigma + S.F32(1))
        return alpha, sigma * alpha

    @classmethod
    def _alpha_sigma_lambda(cls, sigma):
        alpha, sig = cls._alpha_sigma(sigma)
        return alpha, sig, S.log32(alpha) - S.log32(sig)

    def _set_spaced_timesteps(self, num_inference_steps: int, zero_final: bool) -> None:
        """DEIS's and UniPC's set_timesteps: spaced timesteps, the configured sigma schedule, then a final sigma of 0
        (zero_final), else the schedule's own last sigma (karras / exponential / beta) or the smallest trained one."""
        c = self.config
        T = c["num_train_timesteps"]
        n = S.check_steps(num_inference_steps, T)
        timesteps = S.solver_timesteps(c["timestep_spacing"], T, n, c["steps_offset"])
        timesteps, sigmas = S.solver_sigma_schedule(c, self.alphas_cumprod, timesteps, n)
        if zero_final:
            sigma_last = 0.0
        elif c["use_karras_sigmas"] or c["use_exponential_sigmas"] or c["use_beta_sigmas"]:
            sigma_last = sigmas[-1]
        else:
            sigma_last = S.min_train_sigma(self.alphas_cumprod)
        self.sigmas = np.concatenate([sigmas, [sigma_last]]).astype(S.F32)
        self.timesteps = np.asarray(timesteps).astype(np.int64)
        self.num_inference_steps = len(self.timesteps)
        self._reset_state()
        self._reset_step_index()

    def scale_model_input(self, sample: np.ndarray, timestep=None) -> np.ndarray:
        return sample

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps) -> np.ndarray:
        """alpha_t x0 + sigma_t noise, with alpha_t, sigma_t from the step's sigma."""
        sigmas = self.sigmas.astype(original_samples.dtype)
        sigma = S.per_batch(sigmas[self._noise_step_indices(timesteps)], original_samples.ndim)
        alpha_t = S.F32(1) / np.sqrt(sigma * sigma + S.F32(1))
        return alpha_t * original_samples + (sigma * alpha_t) * noise
