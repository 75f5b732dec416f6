"""KDPM2 ("DPM2"): k-diffusion's ``sample_dpm_2``, a second-order midpoint method in sigma space. Each step takes an
Euler half step to the geometric mean of sigma_i and sigma_{i+1}, evaluates the model there and uses that derivative
for the whole step; the last step, to sigma = 0, is plain Euler.

Matches diffusers' ``KDPM2DiscreteScheduler``. Like diffusers, ``timesteps`` interleaves the midpoint timesteps with
the step timesteps (2n - 1 entries for n steps; float64 with Karras / exponential / beta sigmas, as there), and the
pipeline calls the model and ``step`` once per entry.
"""

from __future__ import annotations

import numpy as np

from ..errors import UsageError
from . import schedules as S
from .base import SigmaScheduler

F32 = S.F32


class KDPM2DiscreteScheduler(SigmaScheduler):
    diffusers_class = "KDPM2DiscreteScheduler"
    defaults = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="linear",
        trained_betas=None,
        use_karras_sigmas=False,
        use_exponential_sigmas=False,
        use_beta_sigmas=False,
        prediction_type="epsilon",
        timestep_spacing="linspace",
        steps_offset=0,
    )
    order = 2

    def __init__(self, **config):
        super().__init__(**config)
        S.check_sigma_options(self.config, self.diffusers_class)
        if self.config["beta_schedule"] not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
            raise UsageError(f"beta_schedule {self.config['beta_schedule']!r} is not supported")
        self.set_timesteps(self.config["num_train_timesteps"])
        self.num_inference_steps = None

    # the pieces KDPM2 ancestral changes ---------------------------------------------------------------------------
    def _midpoint_sigmas(self, sigmas: np.ndarray) -> np.ndarray:
        """Per step, the sigma where the second model evaluation happens: sqrt(sigma_{i-1} sigma_i)."""
        return S.log_midpoint(sigmas, np.roll(sigmas, 1))

    def _interleave_timesteps(self, timesteps: np.ndarray, timesteps_mid: np.ndarray) -> np.ndarray:
        mid = timesteps_mid[1:-1]
        return np.concatenate([timesteps[:1], np.stack([mid, timesteps[1:]], axis=-1).reshape(-1)])

    def _mid_index(self) -> int:
        """Index into sigmas_interpol of the midpoint of the step in progress (the second stage's model input)."""
        return self._step_index

    # ---------------------------------------------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int) -> None:
        n = S.check_steps(num_inference_steps, self.config["num_train_timesteps"])
        self.num_inference_steps = n
        timesteps, sigmas, log_sigmas = S.discrete_sigma_schedule(self.config, self.alphas_cumprod, n,
                                                                  round_karras=True)
        # float32 from the spaced timesteps, float64 from Karras / exponential / beta sigmas (diffusers keeps it)
        t_dtype = timesteps.dtype
        sigmas = np.concatenate([sigmas, [0.0]]).astype(F32)
        self._short_sigmas = sigmas
        sigmas_mid = self._midpoint_sigmas(sigmas)
        self.sigmas = S.interleave_pairs(sigmas)
        self.sigmas_interpol = S.interleave_pairs(sigmas_mid)
        # only the finite midpoints are ever used; computing the others would be nan in, garbage out
        timesteps_mid = np.zeros(len(sigmas_mid), F32)
        used = np.isfinite(sigmas_mid)
        timesteps_mid[used] = S.sigma_to_t_f32(sigmas_mid[used], log_sigmas)
        self.timesteps = self._interleave_timesteps(np.asarray(timesteps, t_dtype), timesteps_mid.astype(t_dtype))
        self._sample: np.ndarray | None = None
        self._reset_step_index()

    @property
    def state_in_first_order(self) -> bool:
        return self._sample is None

    def scale_model_input(self, sample: np.ndarray, timestep=None) -> np.ndarray:
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self._step_index] if self.state_in_first_order else self.sigmas_interpol[self._mid_index()]
        return sample / S.sqrt32(sigma * sigma + F32(1))

    def _pred_x0(self, model_output, sample, sigma_in):
        if self.config["prediction_type"] == "epsilon":
            return sample - sigma_in * model_output
        s2 = sigma_in * sigma_in + F32(1)  # v_prediction
        return model_output * (-sigma_in / S.sqrt32(s2)) + (sample / s2)

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, generator=None) -> np.ndarray:
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        sample = sample.astype(F32, copy=False)
        if self.state_in_first_order:
            sigma, sigma_mid = self.sigmas[i], self.sigmas_interpol[i + 1]
            pred_x0 = self._pred_x0(model_output, sample, sigma)
            derivative = (sample - pred_x0) / sigma
            self._sample = sample
            prev_sample = sample + derivative * (sigma_mid - sigma)
        else:
            sigma, sigma_mid, sigma_next = self.sigmas[i - 1], self.sigmas_interpol[i], self.sigmas[i]
            pred_x0 = self._pred_x0(model_output, sample, sigma_mid)
            derivative = (sample - pred_x0) / sigma_mid
            prev_sample = self._sample + derivative * (sigma_next - sigma)
            self._sample = None
        self._step_index += 1
        return prev_sample.astype(F32, copy=False)
