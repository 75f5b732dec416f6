"""Euler: the first-order sampler of Karras et al. (2022, https://arxiv.org/abs/2206.00364, Algorithm 2) in sigma
space, x_{i+1} = x_i + (x_i - x0_pred) / sigma_i * (sigma_{i+1} - sigma_i).

Matches diffusers' ``EulerDiscreteScheduler``, including Karras / exponential / beta sigmas, ``final_sigmas_type``,
``interpolation_type`` and the optional "churn" (s_churn > 0 adds fresh noise before the step).
"""

from __future__ import annotations

import numpy as np

from ..errors import UsageError
from . import schedules as S
from .base import SigmaScheduler

F32 = S.F32


class EulerDiscreteScheduler(SigmaScheduler):
    diffusers_class = "EulerDiscreteScheduler"
    defaults = dict(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        trained_betas=None,
        prediction_type="epsilon",
        interpolation_type="linear",
        use_karras_sigmas=False,
        use_exponential_sigmas=False,
        use_beta_sigmas=False,
        sigma_min=None,
        sigma_max=None,
        timestep_spacing="linspace",
        timestep_type="discrete",
        steps_offset=0,
        rescale_betas_zero_snr=False,
        final_sigmas_type="zero",
    )
    order = 1

    @classmethod
    def _prediction_types(cls):
        return ("epsilon", "v_prediction", "sample", "original_sample")

    def __init__(self, **config):
        super().__init__(**config)
        c = self.config
        S.check_sigma_options(c, self.diffusers_class)
        if c["interpolation_type"] not in ("linear", "log_linear"):
            raise UsageError(f"interpolation_type {c['interpolation_type']!r} is not supported (linear, log_linear)")
        if c["final_sigmas_type"] not in ("zero", "sigma_min"):
            raise UsageError(f"final_sigmas_type {c['final_sigmas_type']!r} is not supported (zero, sigma_min)")
        T = c["num_train_timesteps"]
        sigmas = S.sigmas_of(self.alphas_cumprod)[::-1]
        self.sigmas = np.concatenate([sigmas, np.zeros(1, F32)]).astype(F32)
        if self._continuous_v():
            self.timesteps = np.array([F32(0.25) * S.log32(s) for s in sigmas], F32)
        else:
            self.timesteps = np.linspace(0, T - 1, T)[::-1].astype(F32)
        self._reset_step_index()

    def _continuous_v(self) -> bool:
        return self.config["timestep_type"] == "continuous" and self.config["prediction_type"] == "v_prediction"

    def set_timesteps(self, num_inference_steps: int) -> None:
        c = self.config
        n = S.check_steps(num_inference_steps, c["num_train_timesteps"])
        self.num_inference_steps = n
        timesteps = S.spaced_timesteps(c["timestep_spacing"], c["num_train_timesteps"], n,
                                       c["steps_offset"]).astype(F32)
        train_sigmas = S.sigmas_of(self.alphas_cumprod)
        log_sigmas = np.log(train_sigmas)
        if c["interpolation_type"] == "linear":
            sigmas = S.interp_sigmas(timesteps, train_sigmas)
        else:  # log_linear: n + 1 sigmas, as diffusers (one more than the timesteps)
            sigmas = np.exp(S.torch_linspace_f32(float(np.log(train_sigmas[-1])), float(np.log(train_sigmas[0])),
                                                 n + 1))
        spread = S.spread_sigmas(c, sigmas, n)  # Karras / exponential / beta
        if spread is not None:
            sigmas = spread
            timesteps = S.sigma_to_t(sigmas, log_sigmas)
        if c["final_sigmas_type"] == "sigma_min":
            a0 = self.alphas_cumprod[0]
            sigma_last = float(S.sqrt32((F32(1) - a0) / a0))
        else:
            sigma_last = 0.0
        self.sigmas = np.concatenate([sigmas, [sigma_last]]).astype(F32)
        if self._continuous_v():
            self.timesteps = np.array([F32(0.25) * S.log32(s) for s in self.sigmas[:-1]], F32)
        else:
            self.timesteps = np.asarray(timesteps).astype(F32)
        self._reset_step_index()

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, generator=None, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0) -> np.ndarray:
        if self._step_index is None:
            self._init_step_index(timestep)
        sample = sample.astype(F32, copy=False)
        i = self._step_index
        sigma = self.sigmas[i]
        gamma = min(s_churn / (len(self.sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * F32(gamma + 1)
        if gamma > 0:
            eps = S.draw_noise(model_output.shape, generator, model_output.dtype) * F32(s_noise)
            sample = sample + eps * S.sqrt32(sigma_hat * sigma_hat - sigma * sigma)

        pt = self.config["prediction_type"]
        if pt in ("sample", "original_sample"):
            pred_x0 = model_output
        elif pt == "epsilon":
            pred_x0 = sample - sigma_hat * model_output
        else:  # v_prediction
            s2 = sigma * sigma + F32(1)
            pred_x0 = model_output * (-sigma / S.sqrt32(s2)) + (sample / s2)

        derivative = (sample - pred_x0) / sigma_hat
        dt = self.sigmas[i + 1] - sigma_hat
        prev_sample = (sample + derivative * dt).astype(model_output.dtype, copy=False)
        self._step_index += 1
        return prev_sample

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps) -> np.ndarray:
        """original + noise * sigma_t."""
        sigmas = self.sigmas.astype(original_samples.dtype)
        sigma = S.per_batch(sigmas[self._noise_step_indices(timesteps)], original_samples.ndim)
        return original_samples + noise * sigma

