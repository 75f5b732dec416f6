"""LCM: multistep sampling of latent consistency models (Luo et al. 2023, https://arxiv.org/abs/2310.04378), the
scheduler of LCM-distilled and LCM-LoRA models.

Each step maps x_t straight to a denoised estimate with the consistency-model boundary condition
(denoised = c_out(t) x0_pred + c_skip(t) x_t), then, unless it is the last step, noises that estimate afresh to the
next timestep with noise drawn from the generator. The timesteps are a subset of the distillation schedule
(``original_inference_steps`` evenly spaced training timesteps).

Matches diffusers' ``LCMScheduler``; ``step`` returns its ``prev_sample`` (the denoised estimate after the last step),
and the denoised estimate of the last step is kept in ``denoised``.
"""

from __future__ import annotations

import numpy as np

from ..errors import UsageError
from . import schedules as S
from .base import IndexedScheduler

F32 = S.F32


def consistency_timesteps(config: dict, num_inference_steps: int) -> np.ndarray:
    """The LCM / TCD inference timesteps: num_inference_steps of the ``original_inference_steps`` training timesteps
    k - 1, 2k - 1, ..., T - 1 (k = T // original_inference_steps), taken at evenly spaced positions from the top."""
    T = config["num_train_timesteps"]
    original_steps = config["original_inference_steps"]
    if original_steps > T:
        raise UsageError(f"original_inference_steps {original_steps} is more than the {T} training timesteps")
    n = S.check_steps(num_inference_steps, T)
    k = T // original_steps
    origin = (np.arange(1, original_steps + 1) * k - 1)[::-1]
    if len(origin) // n < 1:
        raise UsageError(f"{n} steps is more than this scheduler's original_inference_steps ({original_steps})")
    positions = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
    return origin[positions].astype(np.int64)


class LCMScheduler(IndexedScheduler):
    diffusers_class = "LCMScheduler"
    defaults = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        trained_betas=None,
        original_inference_steps=50,
        clip_sample=False,
        clip_sample_range=1.0,
        set_alpha_to_one=True,
        steps_offset=0,
        prediction_type="epsilon",
        thresholding=False,
        dynamic_thresholding_ratio=0.995,
        sample_max_value=1.0,
        timestep_spacing="leading",
        timestep_scaling=10.0,
        rescale_betas_zero_snr=False,
    )
    order = 1
    init_noise_sigma = 1.0
    sigma_data = 0.5

    @classmethod
    def _prediction_types(cls):
        return ("epsilon", "sample", "v_prediction")

    def __init__(self, **config):
        super().__init__(**config)
        self.final_alpha_cumprod = F32(1.0) if self.config["set_alpha_to_one"] else self.alphas_cumprod[0]
        self.denoised: np.ndarray | None = None

    def set_timesteps(self, num_inference_steps: int) -> None:
        self.timesteps = consistency_timesteps(self.config, num_inference_steps)
        self.num_inference_steps = len(self.timesteps)
        self._reset_step_index()

    def boundary_scalings(self, timestep: int):
        """(c_skip, c_out) of the consistency-model boundary condition at timestep (float32, as diffusers computes
        them from the integer timestep tensor)."""
        scaled = F32(timestep) * F32(self.config["timestep_scaling"])
        sd2 = F32(self.sigma_data ** 2)
        c_skip = sd2 / (scaled * scaled + sd2)
        c_out = scaled / S.sqrt32(scaled * scaled + sd2)
        return c_skip, c_out

    def _pred_x0(self, model_output, sample, alpha_t, beta_t):
        c = self.config
        pt = c["prediction_type"]
        if pt == "epsilon":
            x0 = (sample - S.sqrt32(beta_t) * model_output) / S.sqrt32(alpha_t)
        elif pt == "sample":
            x0 = model_output
        else:  # v_prediction
            x0 = S.sqrt32(alpha_t) * sample - S.sqrt32(beta_t) * model_output
        if c["thresholding"]:
            x0 = S.threshold_sample(x0, c["dynamic_thresholding_ratio"], c["sample_max_value"])
        elif c["clip_sample"]:
            r = F32(c["clip_sample_range"])
            x0 = np.clip(x0, -r, r)
        return x0

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, generator=None) -> np.ndarray:
        if self.num_inference_steps is None:
            raise RuntimeError("set_timesteps must be called before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        t = int(timestep)
        prev_t = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else t
        alpha_t = self.alphas_cumprod[t]
        alpha_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        beta_t, beta_prev = F32(1) - alpha_t, F32(1) - alpha_prev

        c_skip, c_out = self.boundary_scalings(t)
        pred_x0 = self._pred_x0(model_output, sample.astype(F32, copy=False), alpha_t, beta_t)
        denoised = c_out * pred_x0 + c_skip * sample
        if i != self.num_inference_steps - 1:
            noise = S.draw_noise(model_output.shape, generator, denoised.dtype)
            prev_sample = S.sqrt32(alpha_prev) * denoised + S.sqrt32(beta_prev) * noise
        else:
            prev_sample = denoised
        self.denoised = denoised
        self._step_index += 1
        return prev_sample.astype(F32, copy=False)
