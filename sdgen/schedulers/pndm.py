"""PNDM / PLMS: pseudo numerical methods for diffusion models (Liu et al. 2022, https://arxiv.org/abs/2202.09778).

Matches diffusers' ``PNDMScheduler``. With ``skip_prk_steps`` (as in the Stable Diffusion configs) it runs only the
linear multistep (PLMS) part: the first step is taken twice (once forward, once re-done with the average of the two
model outputs, like a Heun step), then Adams-Bashforth of order 2, 3 and 4 on the stored model outputs. Without it,
the first three steps are Runge-Kutta steps of four model evaluations each (12 calls at half-step timesteps).

Each update moves the sample from timestep t to t_prev with the transfer of the PNDM paper (eq. 11).
"""

from __future__ import annotations

import numpy as np

from . import schedules as S
from .base import Scheduler

F32 = S.F32


class PNDMScheduler(Scheduler):
    diffusers_class = "PNDMScheduler"
    defaults = dict(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        trained_betas=None,
        skip_prk_steps=False,
        set_alpha_to_one=False,
        prediction_type="epsilon",
        timestep_spacing="leading",
        steps_offset=0,
    )
    order = 1
    init_noise_sigma = 1.0
    pndm_order = 4

    def __init__(self, **config):
        super().__init__(**config)
        self.final_alpha_cumprod = F32(1.0) if self.config["set_alpha_to_one"] else self.alphas_cumprod[0]
        self.prk_timesteps = np.zeros(0, np.int64)
        self.plms_timesteps = np.zeros(0, np.int64)
        self._reset_state()

    def _reset_state(self) -> None:
        self.counter = 0
        self.ets: list[np.ndarray] = []
        self.cur_model_output = 0
        self.cur_sample: np.ndarray | None = None

    def set_timesteps(self, num_inference_steps: int) -> None:
        c = self.config
        T = c["num_train_timesteps"]
        n = S.check_steps(num_inference_steps, T)
        self.num_inference_steps = n
        # ascending, as diffusers' PNDMScheduler._timesteps
        ts = np.round(S.spaced_timesteps(c["timestep_spacing"], T, n, c["steps_offset"])).astype(np.int64)[::-1]
        self._timesteps = ts.copy()
        if c["skip_prk_steps"]:
            # the first timestep is used twice: plms_timesteps = [t_last, t_last-1', t_last-1', ...] reversed
            self.prk_timesteps = np.zeros(0, np.int64)
            self.plms_timesteps = np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1].copy()
        else:
            half = T // n // 2
            prk = np.repeat(ts[-self.pndm_order:], 2) + np.tile(np.array([0, half]), self.pndm_order)
            self.prk_timesteps = np.repeat(prk[:-1], 2)[1:-1][::-1].copy()
            self.plms_timesteps = ts[:-3][::-1].copy()
        self.timesteps = np.concatenate([self.prk_timesteps, self.plms_timesteps]).astype(np.int64)
        self._reset_state()

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, generator=None) -> np.ndarray:
        if self.num_inference_steps is None:
            raise RuntimeError("set_timesteps must be called before step")
        if self.counter < len(self.prk_timesteps) and not self.config["skip_prk_steps"]:
            return self._step_prk(model_output, int(timestep), sample)
        return self._step_plms(model_output, int(timestep), sample)

    # -------------------------------------------------------------------------------------- Runge-Kutta warm-up
    def _step_prk(self, model_output, timestep, sample):
        diff_to_prev = 0 if self.counter % 2 else self.config["num_train_timesteps"] // self.num_inference_steps // 2
        prev_timestep = timestep - diff_to_prev
        timestep = int(self.prk_timesteps[self.counter // 4 * 4])
        phase = self.counter % 4
        if phase == 0:
            self.cur_model_output = self.cur_model_output + (1 / 6) * model_output
            self.ets.append(model_output)
            self.cur_sample = sample
        elif phase in (1, 2):
            self.cur_model_output = self.cur_model_output + (1 / 3) * model_output
        else:
            model_output = self.cur_model_output + (1 / 6) * model_output
            self.cur_model_output = 0
        cur_sample = self.cur_sample if self.cur_sample is not None else sample
        prev_sample = self._prev_sample(cur_sample, timestep, prev_timestep, model_output)
        self.counter += 1
        return prev_sample

    # -------------------------------------------------------------------------------------- linear multistep
    def _step_plms(self, model_output, timestep, sample):
        if not self.config["skip_prk_steps"] and len(self.ets) < 3:
            raise RuntimeError("PNDM without skip_prk_steps must run its 12 Runge-Kutta steps first")
        stride = self.config["num_train_timesteps"] // self.num_inference_steps
        prev_timestep = timestep - stride
        if self.counter != 1:
            self.ets = self.ets[-3:]
            self.ets.append(model_output)
        else:
            # the repeated first timestep: redo the step from the first sample
            prev_timestep = timestep
            timestep = timestep + stride

        ets = self.ets
        if len(ets) == 1 and self.counter == 0:
            self.cur_sample = sample
        elif len(ets) == 1 and self.counter == 1:
            model_output = (model_output + ets[-1]) / 2
            sample = self.cur_sample
            self.cur_sample = None
        elif len(ets) == 2:
            model_output = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            model_output = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            model_output = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])

        prev_sample = self._prev_sample(sample, timestep, prev_timestep, model_output)
        self.counter += 1
        return prev_sample

    def _prev_sample(self, sample, timestep: int, prev_timestep: int, model_output):
        """x_{t-delta} from x_t and the (combined) noise prediction, PNDM eq. (11)."""
        alpha_t = self.alphas_cumprod[timestep]
        alpha_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_t = F32(1) - alpha_t
        beta_prev = F32(1) - alpha_prev
        if self.config["prediction_type"] == "v_prediction":
            model_output = S.sqrt32(alpha_t) * model_output + S.sqrt32(beta_t) * sample
        sample_coeff = S.sqrt32(alpha_prev / alpha_t)
        denom = alpha_t * S.sqrt32(beta_prev) + S.sqrt32(alpha_t * beta_t * alpha_prev)
        return sample_coeff * sample - (alpha_prev - alpha_t) * model_output / denom
