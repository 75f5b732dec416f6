"""DDIM: denoising diffusion implicit models (Song et al. 2020, https://arxiv.org/abs/2010.02502).

Matches diffusers' ``DDIMScheduler``. Each step predicts x0 and the noise from the model output, then jumps to the
previous timestep along the deterministic DDIM path; with ``eta > 0`` (the pipeline's ``eta`` argument, here a
scheduler option) part of the noise is fresh Gaussian noise drawn from the generator, eta = 1 being DDPM-like.
"""

from __future__ import annotations

import numpy as np

from . import schedules as S
from .base import Scheduler

F32 = S.F32


class DDIMScheduler(Scheduler):
    diffusers_class = "DDIMScheduler"
    defaults = dict(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        trained_betas=None,
        clip_sample=True,
        set_alpha_to_one=True,
        steps_offset=0,
        prediction_type="epsilon",
        thresholding=False,
        dynamic_thresholding_ratio=0.995,
        clip_sample_range=1.0,
        sample_max_value=1.0,
        timestep_spacing="leading",
        rescale_betas_zero_snr=False,
        # not a diffusers config key: the pipeline's `eta` (0 = deterministic DDIM), kept with the scheduler here
        eta=0.0,
    )
    order = 1
    init_noise_sigma = 1.0

    @classmethod
    def _prediction_types(cls):
        return ("epsilon", "sample", "v_prediction")

    def __init__(self, **config):
        super().__init__(**config)
        self.final_alpha_cumprod = F32(1.0) if self.config["set_alpha_to_one"] else self.alphas_cumprod[0]

    def set_timesteps(self, num_inference_steps: int) -> None:
        c = self.config
        T = c["num_train_timesteps"]
        n = S.check_steps(num_inference_steps, T)
        self.num_inference_steps = n
        ts = S.spaced_timesteps(c["timestep_spacing"], T, n, c["steps_offset"])
        self.timesteps = np.round(ts).astype(np.int64)

    def _alpha_prev(self, prev_timestep: int):
        return self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod

    def _variance(self, timestep: int, prev_timestep: int):
        alpha_t = self.alphas_cumprod[timestep]
        alpha_prev = self._alpha_prev(prev_timestep)
        beta_t = F32(1) - alpha_t
        beta_prev = F32(1) - alpha_prev
        return (beta_prev / beta_t) * (F32(1) - alpha_t / alpha_prev)

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, generator=None, eta: float | None = None,
             use_clipped_model_output: bool = False) -> np.ndarray:
        if self.num_inference_steps is None:
            raise RuntimeError("set_timesteps must be called before step")
        c = self.config
        eta = c["eta"] if eta is None else eta
        timestep = int(timestep)
        prev_timestep = timestep - c["num_train_timesteps"] // self.num_inference_steps

        alpha_t = self.alphas_cumprod[timestep]
        alpha_prev = self._alpha_prev(prev_timestep)
        beta_t = F32(1) - alpha_t

        pt = c["prediction_type"]
        if pt == "epsilon":
            pred_x0 = (sample - S.sqrt32(beta_t) * model_output) / S.sqrt32(alpha_t)
            pred_eps = model_output
        elif pt == "sample":
            pred_x0 = model_output
            pred_eps = (sample - S.sqrt32(alpha_t) * pred_x0) / S.sqrt32(beta_t)
        else:  # v_prediction
            pred_x0 = S.sqrt32(alpha_t) * sample - S.sqrt32(beta_t) * model_output
            pred_eps = S.sqrt32(alpha_t) * model_output + S.sqrt32(beta_t) * sample

        if c["thresholding"]:
            pred_x0 = S.threshold_sample(pred_x0, c["dynamic_thresholding_ratio"], c["sample_max_value"])
        elif c["clip_sample"]:
            r = c["clip_sample_range"]
            pred_x0 = np.clip(pred_x0, F32(-r), F32(r))

        std_dev_t = eta * S.sqrt32(self._variance(timestep, prev_timestep))
        if use_clipped_model_output:
            pred_eps = (sample - S.sqrt32(alpha_t) * pred_x0) / S.sqrt32(beta_t)

        direction = S.sqrt32(F32(1) - alpha_prev - std_dev_t * std_dev_t) * pred_eps
        prev_sample = S.sqrt32(alpha_prev) * pred_x0 + direction
        if eta > 0:
            noise = S.draw_noise(model_output.shape, generator, model_output.dtype)
            prev_sample = prev_sample + std_dev_t * noise
        return prev_sample
