"""KDPM2 ancestral ("DPM2 a"): k-diffusion's ``sample_dpm_2_ancestral``. Each step splits sigma_{i+1} into
sigma_down and sigma_up (sigma_down^2 + sigma_up^2 = sigma_{i+1}^2), takes the DPM2 midpoint step from sigma_i down to
sigma_down (the midpoint being the geometric mean of sigma_i and sigma_down) and then adds fresh noise of size
sigma_up; the last step, to sigma = 0, is plain Euler without noise.

Matches diffusers' ``KDPM2AncestralDiscreteScheduler``: one noise tensor of the model output's shape is drawn from
the generator at the end of every completed two-stage step, as there. ``timesteps`` interleaves midpoint and step
timesteps like KDPM2's.
"""

from __future__ import annotations

import numpy as np

from . import schedules as S
from .kdpm2 import KDPM2DiscreteScheduler

F32 = S.F32


class KDPM2AncestralDiscreteScheduler(KDPM2DiscreteScheduler):
    diffusers_class = "KDPM2AncestralDiscreteScheduler"
    defaults = dict(KDPM2DiscreteScheduler.defaults)
    order = 2

    def _midpoint_sigmas(self, sigmas: np.ndarray) -> np.ndarray:
        sigmas_next = np.concatenate([sigmas[1:], [0.0]]).astype(F32)
        s2, n2 = sigmas * sigmas, sigmas_next * sigmas_next
        with np.errstate(invalid="ignore", divide="ignore"):
            sigmas_up = np.sqrt(n2 * (s2 - n2) / s2)  # nan for the final sigma = 0, never used
            sigmas_down = np.sqrt(n2 - sigmas_up * sigmas_up)
        sigmas_down[-1] = 0.0
        mid = S.log_midpoint(sigmas, sigmas_down)
        mid[-2:] = 0.0
        self.sigmas_up = S.interleave_pairs(sigmas_up)
        self.sigmas_down = S.interleave_pairs(sigmas_down)
        return mid

    def _interleave_timesteps(self, timesteps: np.ndarray, timesteps_mid: np.ndarray) -> np.ndarray:
        mid = timesteps_mid[:-2]
        return np.concatenate([timesteps[:1], np.stack([mid, timesteps[1:]], axis=-1).reshape(-1)])

    def _mid_index(self) -> int:
        return self._step_index - 1

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, generator=None) -> np.ndarray:
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        sample = sample.astype(F32, copy=False)
        if self.state_in_first_order:
            sigma, sigma_mid = self.sigmas[i], self.sigmas_interpol[i]
            pred_x0 = self._pred_x0(model_output, sample, sigma)
            derivative = (sample - pred_x0) / sigma
            self._sample = sample
            prev_sample = sample + derivative * (sigma_mid - sigma)
        else:
            sigma, sigma_mid = self.sigmas[i - 1], self.sigmas_interpol[i - 1]
            sigma_up, sigma_down = self.sigmas_up[i - 1], self.sigmas_down[i - 1]
            pred_x0 = self._pred_x0(model_output, sample, sigma_mid)
            derivative = (sample - pred_x0) / sigma_mid
            prev_sample = self._sample + derivative * (sigma_down - sigma)
            self._sample = None
            noise = S.draw_noise(model_output.shape, generator, model_output.dtype)
            prev_sample = prev_sample + noise * sigma_up
        self._step_index += 1
        return prev_sample.astype(F32, copy=False)
