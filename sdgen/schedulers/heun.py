"""Heun: the second-order sampler of Karras et al. (2022, https://arxiv.org/abs/2206.00364, Algorithm 1 without
churn). Each step is an Euler step to sigma_{i+1} followed by a correction with the derivative there (the trapezoid
rule); the last step, to sigma = 0, is plain Euler.

Matches diffusers' ``HeunDiscreteScheduler``. Like diffusers, ``timesteps`` lists every timestep but the first twice
(2n - 1 entries for n steps): the pipeline calls the model and ``step`` once per entry, the first call of a pair
takes the Euler step, the second one corrects it.
"""

from __future__ import annotations

import numpy as np

from ..errors import UsageError
from . import schedules as S
from .base import SigmaScheduler

F32 = S.F32


class HeunDiscreteScheduler(SigmaScheduler):
    diffusers_class = "HeunDiscreteScheduler"
    defaults = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="linear",
        trained_betas=None,
        prediction_type="epsilon",
        use_karras_sigmas=False,
        use_exponential_sigmas=False,
        use_beta_sigmas=False,
        clip_sample=False,
        clip_sample_range=1.0,
        timestep_spacing="linspace",
        steps_offset=0,
    )
    order = 2

    @classmethod
    def _prediction_types(cls):
        return ("epsilon", "v_prediction", "sample")

    def __init__(self, **config):
        super().__init__(**config)
        S.check_sigma_options(self.config, self.diffusers_class)
        if self.config["beta_schedule"] not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
            raise UsageError(f"beta_schedule {self.config['beta_schedule']!r} is not supported")
        self.set_timesteps(self.config["num_train_timesteps"])
        self.num_inference_steps = None

    def set_timesteps(self, num_inference_steps: int) -> None:
        n = S.check_steps(num_inference_steps, self.config["num_train_timesteps"])
        self.num_inference_steps = n
        timesteps, sigmas, _ = S.discrete_sigma_schedule(self.config, self.alphas_cumprod, n)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(F32)
        # [s0, s1, s1, s2, s2, ..., s_{n-1}, s_{n-1}, 0] and [t0, t1, t1, ..., t_{n-1}, t_{n-1}]
        self.sigmas = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]])
        timesteps = np.asarray(timesteps)
        self.timesteps = np.concatenate([timesteps[:1], np.repeat(timesteps[1:], 2)]).astype(F32)
        self._prev_derivative: np.ndarray | None = None
        self._dt = None
        self._sample: np.ndarray | None = None
        self._reset_step_index()

    @property
    def state_in_first_order(self) -> bool:
        return self._dt is None

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, generator=None) -> np.ndarray:
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        first = self.state_in_first_order
        sigma, sigma_next = (self.sigmas[i], self.sigmas[i + 1]) if first else (self.sigmas[i - 1], self.sigmas[i])
        sample = sample.astype(F32, copy=False)
        # the model was evaluated at sigma (first stage) or at sigma_next (second stage)
        sigma_in = sigma if first else sigma_next
        pt = self.config["prediction_type"]
        if pt == "epsilon":
            pred_x0 = sample - sigma_in * model_output
        elif pt == "v_prediction":
            s2 = sigma_in * sigma_in + F32(1)
            pred_x0 = model_output * (-sigma_in / S.sqrt32(s2)) + (sample / s2)
        else:
            pred_x0 = model_output
        if self.config["clip_sample"]:
            r = F32(self.config["clip_sample_range"])
            pred_x0 = np.clip(pred_x0, -r, r)

        if first:
            derivative = (sample - pred_x0) / sigma
            dt = sigma_next - sigma
            self._prev_derivative, self._dt, self._sample = derivative, dt, sample
        else:
            derivative = ((self._prev_derivative + (sample - pred_x0) / sigma_next) / F32(2))
            dt, sample = self._dt, self._sample
            self._prev_derivative = self._dt = self._sample = None
        prev_sample = (sample + derivative * dt).astype(F32, copy=False)
        self._step_index += 1
        return prev_sample
