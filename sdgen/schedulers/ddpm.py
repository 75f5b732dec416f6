"""DDPM: ancestral sampling of denoising diffusion probabilistic models (Ho et al. 2020,
https://arxiv.org/abs/2006.11239). Each step samples x_{t'} from the Gaussian posterior q(x_{t'} | x_t, x0_pred)
between consecutive inference timesteps t > t': its mean mixes x0_pred and x_t, and fresh noise of the posterior's
standard deviation is added on every step except at t = 0.

Matches diffusers' ``DDPMScheduler`` with the fixed variances (fixed_small, fixed_small_log, fixed_large). It was
made for ~1000 steps: with few steps it is slow to converge, but it still reproduces diffusers exactly.
"""

from __future__ import annotations

import numpy as np

from ..errors import UsageError
from . import schedules as S
from .base import Scheduler

F32 = S.F32


class DDPMScheduler(Scheduler):
    diffusers_class = "DDPMScheduler"
    defaults = dict(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        trained_betas=None,
        variance_type="fixed_small",
        clip_sample=True,
        prediction_type="epsilon",
        thresholding=False,
        dynamic_thresholding_ratio=0.995,
        clip_sample_range=1.0,
        sample_max_value=1.0,
        timestep_spacing="leading",
        steps_offset=0,
        rescale_betas_zero_snr=False,
    )
    order = 1
    init_noise_sigma = 1.0
    VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")

    @classmethod
    def _prediction_types(cls):
        return ("epsilon", "sample", "v_prediction")

    def __init__(self, **config):
        super().__init__(**config)
        if self.config["variance_type"] not in self.VARIANCE_TYPES:
            raise UsageError(f"DDPMScheduler: variance_type {self.config['variance_type']!r} is not supported "
                             f"(one of {', '.join(self.VARIANCE_TYPES)})")

    def set_timesteps(self, num_inference_steps: int) -> None:
        c = self.config
        T = c["num_train_timesteps"]
        n = S.check_steps(num_inference_steps, T)
        self.num_inference_steps = n
        ts = S.spaced_timesteps(c["timestep_spacing"], T, n, c["steps_offset"])
        self.timesteps = np.round(ts).astype(np.int64)

    def previous_timestep(self, timestep: int) -> int:
        """The next timestep of the schedule (-1 after the last one)."""
        if self.num_inference_steps is None:
            return timestep - 1
        hits = np.nonzero(self.timesteps == timestep)[0]
        if len(hits) == 0:
            raise UsageError(f"timestep {timestep} is not one of the scheduler's timesteps")
        i = int(hits[0])
        return -1 if i == len(self.timesteps) - 1 else int(self.timesteps[i + 1])

    def _alpha_bars(self, t: int):
        prev_t = self.previous_timestep(t)
        alpha_t = self.alphas_cumprod[t]
        alpha_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else F32(1.0)
        return alpha_t, alpha_prev

    def _std(self, t: int):
        """Standard deviation of the noise added at timestep t (the square root of diffusers' variance)."""
        alpha_t, alpha_prev = self._alpha_bars(t)
        beta = F32(1) - alpha_t / alpha_prev
        variance = max((F32(1) - alpha_prev) / (F32(1) - alpha_t) * beta, F32(1e-20))
        vt = self.config["variance_type"]
        if vt == "fixed_small":
            return S.sqrt32(variance)
        if vt == "fixed_small_log":
            return S.exp32(F32(0.5) * S.log32(variance))
        return S.sqrt32(beta)  # fixed_large

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, generator=None) -> np.ndarray:
        c = self.config
        t = int(timestep)
        alpha_t, alpha_prev = self._alpha_bars(t)
        beta_t, beta_prev = F32(1) - alpha_t, F32(1) - alpha_prev
        step_alpha = alpha_t / alpha_prev
        step_beta = F32(1) - step_alpha

        pt = c["prediction_type"]
        if pt == "epsilon":
            pred_x0 = (sample - S.sqrt32(beta_t) * model_output) / S.sqrt32(alpha_t)
        elif pt == "sample":
            pred_x0 = model_output
        else:  # v_prediction
            pred_x0 = S.sqrt32(alpha_t) * sample - S.sqrt32(beta_t) * model_output
        if c["thresholding"]:
            pred_x0 = S.threshold_sample(pred_x0, c["dynamic_thresholding_ratio"], c["sample_max_value"])
        elif c["clip_sample"]:
            r = F32(c["clip_sample_range"])
            pred_x0 = np.clip(pred_x0, -r, r)

        # mean of the posterior q(x_prev | x_t, x0): eq. (7) of the DDPM paper
        x0_coeff = (S.sqrt32(alpha_prev) * step_beta) / beta_t
        xt_coeff = S.sqrt32(step_alpha) * beta_prev / beta_t
        prev_sample = x0_coeff * pred_x0 + xt_coeff * sample
        if t > 0:
            noise = S.draw_noise(model_output.shape, generator, model_output.dtype)
            prev_sample = prev_sample + self._std(t) * noise
        return prev_sample.astype(F32, copy=False)
