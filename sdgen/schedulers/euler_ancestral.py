"""Euler ancestral ("Euler a"): an Euler step down to sigma_down, then fresh noise of size sigma_up, with
sigma_down^2 + sigma_up^2 = sigma_next^2 (k-diffusion's ``sample_euler_ancestral``).

Matches diffusers' ``EulerAncestralDiscreteScheduler``. Every step, the last one included, draws one noise tensor of
the model output's shape from the generator, as diffusers does.
"""

from __future__ import annotations

import numpy as np

from . import schedules as S
from .base import SigmaScheduler

F32 = S.F32


class EulerAncestralDiscreteScheduler(SigmaScheduler):
    diffusers_class = "EulerAncestralDiscreteScheduler"
    defaults = dict(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        trained_betas=None,
        prediction_type="epsilon",
        timestep_spacing="linspace",
        steps_offset=0,
        rescale_betas_zero_snr=False,
    )
    order = 1

    def __init__(self, **config):
        super().__init__(**config)
        T = self.config["num_train_timesteps"]
        sigmas = S.sigmas_of(self.alphas_cumprod)
        self.sigmas = np.concatenate([sigmas[::-1], [0.0]]).astype(F32)
        self.timesteps = np.linspace(0, T - 1, T)[::-1].copy()
        self._reset_step_index()

    def set_timesteps(self, num_inference_steps: int) -> None:
        c = self.config
        n = S.check_steps(num_inference_steps, c["num_train_timesteps"])
        self.num_inference_steps = n
        timesteps = S.spaced_timesteps(c["timestep_spacing"], c["num_train_timesteps"], n,
                                       c["steps_offset"]).astype(F32)
        sigmas = S.interp_sigmas(timesteps, S.sigmas_of(self.alphas_cumprod))
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(F32)
        self.timesteps = timesteps
        self._reset_step_index()

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, generator=None) -> np.ndarray:
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        sigma = self.sigmas[i]
        sample = sample.astype(F32, copy=False)
        if self.config["prediction_type"] == "epsilon":
            pred_x0 = sample - sigma * model_output
        else:  # v_prediction
            s2 = sigma * sigma + F32(1)
            pred_x0 = model_output * (-sigma / S.sqrt32(s2)) + (sample / s2)

        sigma_from, sigma_to = self.sigmas[i], self.sigmas[i + 1]
        from2, to2 = sigma_from * sigma_from, sigma_to * sigma_to
        sigma_up = S.sqrt32(to2 * (from2 - to2) / from2)
        sigma_down = S.sqrt32(to2 - sigma_up * sigma_up)

        derivative = (sample - pred_x0) / sigma
        dt = sigma_down - sigma
        prev_sample = sample + derivative * dt
        noise = S.draw_noise(model_output.shape, generator, model_output.dtype)
        prev_sample = (prev_sample + noise * sigma_up).astype(model_output.dtype, copy=False)
        self._step_index += 1
        return prev_sample

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps) -> np.ndarray:
        """original + noise * sigma_t."""
        sigmas = self.sigmas.astype(original_samples.dtype)
        sigma = S.per_batch(sigmas[self._noise_step_indices(timesteps)], original_samples.ndim)
        return original_samples + noise * sigma
