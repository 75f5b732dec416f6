"""TCD: trajectory consistency distillation sampling (Zheng et al. 2024, https://arxiv.org/abs/2402.19159), the
strategic stochastic sampler of TCD-distilled models (it also suits LCM-style turbo models).

Each step predicts x0 and the noise, moves them along the trajectory to the intermediate timestep
s = floor((1 - gamma) t_prev), and unless it is the last step re-noises from s up to t_prev with fresh noise.
gamma (diffusers calls it ``eta``) sets the stochasticity: 0 is deterministic, 1 is LCM-like.

Matches diffusers' ``TCDScheduler``. ``eta`` is not a diffusers config key but the ``eta`` argument of its ``step``
(default 0.3, as diffusers' TCD examples pass it); here it is a scheduler option. Note that diffusers'
StableDiffusionPipeline passes its own ``eta`` argument (default 0.0) to any scheduler whose ``step`` takes one, so
``pipe(..., eta=0.3)`` is what the default here reproduces.
"""

from __future__ import annotations

import numpy as np

from ..errors import UsageError
from . import schedules as S
from .lcm import LCMScheduler

F32 = S.F32


class TCDScheduler(LCMScheduler):
    diffusers_class = "TCDScheduler"
    defaults = dict(
        LCMScheduler.defaults,
        # not a diffusers config key: the `eta` (gamma) argument of TCDScheduler.step
        eta=0.3,
    )

    def __init__(self, **config):
        super().__init__(**config)
        if not 0 <= self.config["eta"] <= 1:
            raise UsageError(f"TCDScheduler: eta (gamma) must be between 0 and 1, not {self.config['eta']}")

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, generator=None,
             eta: float | None = None) -> np.ndarray:
        if self.num_inference_steps is None:
            raise RuntimeError("set_timesteps must be called before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        eta = self.config["eta"] if eta is None else eta
        if not 0 <= eta <= 1:
            raise UsageError(f"TCD eta (gamma) must be between 0 and 1, not {eta}")
        i = self._step_index
        t = int(timestep)
        prev_t = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else 0
        # float32 product, as torch's (1 - eta) * int64 tensor
        s = int(np.floor(F32(1 - eta) * F32(prev_t)))
        alpha_t = self.alphas_cumprod[t]
        beta_t = F32(1) - alpha_t
        alpha_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        alpha_s = self.alphas_cumprod[s]
        beta_s = F32(1) - alpha_s
        sample = sample.astype(F32, copy=False)

        pt = self.config["prediction_type"]
        if pt == "epsilon":
            pred_x0 = (sample - S.sqrt32(beta_t) * model_output) / S.sqrt32(alpha_t)
            pred_eps = model_output
        elif pt == "sample":
            pred_x0 = model_output
            pred_eps = (sample - S.sqrt32(alpha_t) * pred_x0) / S.sqrt32(beta_t)
        else:  # v_prediction
            pred_x0 = S.sqrt32(alpha_t) * sample - S.sqrt32(beta_t) * model_output
            pred_eps = S.sqrt32(alpha_t) * model_output + S.sqrt32(beta_t) * sample
        pred_noised = S.sqrt32(alpha_s) * pred_x0 + S.sqrt32(beta_s) * pred_eps

        if eta > 0 and i != self.num_inference_steps - 1:
            noise = S.draw_noise(model_output.shape, generator, pred_noised.dtype)
            ratio = alpha_prev / alpha_s
            prev_sample = S.sqrt32(ratio) * pred_noised + S.sqrt32(F32(1) - ratio) * noise
        else:
            prev_sample = pred_noised
        self.denoised = pred_noised
        self._step_index += 1
        return prev_sample.astype(F32, copy=False)
