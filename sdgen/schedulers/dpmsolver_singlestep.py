"""DPM-Solver / DPM-Solver++ singlestep (Lu et al. 2022, https://arxiv.org/abs/2206.00927 and
https://arxiv.org/abs/2211.01095): the steps are grouped in runs of ``solver_order`` (orders 1, 2, 1, 2, ... for
DPM-Solver++(2S)); within a run every model evaluation starts from the sample at the start of the run, so the k-th
step of a run is a k-th order single step over the whole run, its intermediate results only serving as evaluation
points.

Matches diffusers' ``DPMSolverSinglestepScheduler``: algorithm types dpmsolver++, sde-dpmsolver++ (one noise tensor
drawn every step) and dpmsolver, midpoint / heun terms, orders 1-3, Karras / exponential / beta sigmas, lower-order
final runs and ``final_sigmas_type``. Its timesteps always span the schedule evenly (no ``timestep_spacing`` option).
"""

from __future__ import annotations

import numpy as np

from ..errors import UsageError
from . import schedules as S
from .base import SolverScheduler
from .dpmsolver_multistep import DPMSolverMultistepScheduler

F32 = S.F32


class DPMSolverSinglestepScheduler(SolverScheduler):
    diffusers_class = "DPMSolverSinglestepScheduler"
    defaults = dict(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        trained_betas=None,
        solver_order=2,
        prediction_type="epsilon",
        thresholding=False,
        dynamic_thresholding_ratio=0.995,
        sample_max_value=1.0,
        algorithm_type="dpmsolver++",
        solver_type="midpoint",
        lower_order_final=False,
        use_karras_sigmas=False,
        use_exponential_sigmas=False,
        use_beta_sigmas=False,
        use_flow_sigmas=False,
        flow_shift=1.0,
        final_sigmas_type="zero",
        lambda_min_clipped=-float("inf"),
        variance_type=None,
        use_dynamic_shifting=False,
        time_shift_type="exponential",
    )
    order = 1

    @classmethod
    def _prediction_types(cls):
        return ("epsilon", "sample", "v_prediction")

    # the same conversion and first-order step as the multistep solver
    convert_model_output = DPMSolverMultistepScheduler.convert_model_output
    _first_order = DPMSolverMultistepScheduler._first_order

    def __init__(self, **config):
        super().__init__(**config)
        c = self.config
        S.check_sigma_options(c, self.diffusers_class)
        if c["use_flow_sigmas"] or c["use_dynamic_shifting"]:
            raise UsageError("DPMSolverSinglestepScheduler: use_flow_sigmas and use_dynamic_shifting are not supported")
        if c["algorithm_type"] == "deis":
            c["algorithm_type"] = "dpmsolver++"
        if c["algorithm_type"] not in ("dpmsolver++", "sde-dpmsolver++", "dpmsolver"):
            raise UsageError(f"algorithm_type {c['algorithm_type']!r} is not supported "
                             "(dpmsolver++, sde-dpmsolver++, dpmsolver)")
        if c["solver_type"] in ("logrho", "bh1", "bh2"):
            c["solver_type"] = "midpoint"
        if c["solver_type"] not in ("midpoint", "heun"):
            raise UsageError(f"solver_type {c['solver_type']!r} is not supported (midpoint, heun)")
        if c["solver_order"] not in (1, 2, 3):
            raise UsageError(f"solver_order must be 1, 2 or 3, not {c['solver_order']!r}")
        if c["final_sigmas_type"] not in ("zero", "sigma_min"):
            raise UsageError(f"final_sigmas_type {c['final_sigmas_type']!r} is not supported (zero, sigma_min)")
        if c["algorithm_type"] == "dpmsolver" and c["final_sigmas_type"] == "zero":
            raise UsageError("algorithm_type dpmsolver needs final_sigmas_type sigma_min")
        alpha_t = np.sqrt(self.alphas_cumprod)
        sigma_t = np.sqrt(F32(1) - self.alphas_cumprod)
        with np.errstate(divide="ignore"):
            self.lambda_t = np.log(alpha_t) - np.log(sigma_t)
        self.sigmas = S.sigmas_of(self.alphas_cumprod)
        T = c["num_train_timesteps"]
        self.timesteps = np.linspace(0, T - 1, T, dtype=F32)[::-1].copy()
        self.model_outputs: list[np.ndarray | None] = [None] * c["solver_order"]
        self.sample: np.ndarray | None = None
        self.order_list = self.get_order_list(T)
        self._reset_step_index()

    def get_order_list(self, num_inference_steps: int) -> list[int]:
        """The order of each step: runs of 1, 2, (3), shortened at the end when lower_order_final."""
        steps, order = num_inference_steps, self.config["solver_order"]
        if self.config["lower_order_final"]:
            if order == 3:
                if steps % 3 == 0:
                    orders = [1, 2, 3] * (steps // 3 - 1) + [1, 2] + [1]
                elif steps % 3 == 1:
                    orders = [1, 2, 3] * (steps // 3) + [1]
                else:
                    orders = [1, 2, 3] * (steps // 3) + [1, 2]
            elif order == 2:
                if steps % 2 == 0:
                    orders = [1, 2] * (steps // 2 - 1) + [1, 1]
                else:
                    orders = [1, 2] * (steps // 2) + [1]
            else:
                orders = [1] * steps
        else:
            orders = {1: [1], 2: [1, 2], 3: [1, 2, 3]}[order] * (steps // order)
        if self.config["final_sigmas_type"] == "zero":
            orders[-1] = 1
        return orders

    def set_timesteps(self, num_inference_steps: int) -> None:
        c = self.config
        T = c["num_train_timesteps"]
        n = S.check_steps(num_inference_steps, T)
        self.num_inference_steps = n
        clipped_idx = int(np.searchsorted(self.lambda_t[::-1], c["lambda_min_clipped"]))
        timesteps = S.solver_timesteps("linspace", T, n, last=T - clipped_idx)
        timesteps, sigmas = S.solver_sigma_schedule(c, self.alphas_cumprod, timesteps, n)
        sigma_last = S.min_train_sigma(self.alphas_cumprod) if c["final_sigmas_type"] == "sigma_min" else 0.0
        self.sigmas = np.concatenate([sigmas, [sigma_last]]).astype(F32)
        self.timesteps = np.asarray(timesteps).astype(np.int64)
        self.model_outputs = [None] * c["solver_order"]
        self.sample = None
        # as diffusers (which rewrites its config too): a run cut short by the end, or a final step to sigma = 0,
        # needs the lower-order final run
        if not c["lower_order_final"] and (n % c["solver_order"] != 0 or c["final_sigmas_type"] == "zero"):
            c["lower_order_final"] = True
        self.order_list = self.get_order_list(n)
        self._reset_step_index()

    # -------------------------------------------------------------------------------------- updates
    def _second_order(self, outputs, sample, noise):
        """From the run's start s1 (sigmas[i - 1]) over s0 (sigmas[i]) to t (sigmas[i + 1])."""
        i = self._step_index
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(self.sigmas[i + 1])
        _, _, lambda_s0 = self._alpha_sigma_lambda(self.sigmas[i])
        alpha_s1, sigma_s1, lambda_s1 = self._alpha_sigma_lambda(self.sigmas[i - 1])
        m0, m1 = outputs[-1], outputs[-2]
        h, h_0 = lambda_t - lambda_s1, lambda_s0 - lambda_s1
        r0 = h_0 / h
        D0, D1 = m1, (F32(1.0) / r0) * (m0 - m1)
        algo, midpoint = self.config["algorithm_type"], self.config["solver_type"] == "midpoint"
        if algo == "dpmsolver++":
            e = S.exp32(-h) - F32(1.0)
            x = (sigma_t / sigma_s1) * sample - (alpha_t * e) * D0
            if midpoint:
                return x - (F32(0.5) * (alpha_t * e)) * D1
            return x + (alpha_t * (e / h + F32(1.0))) * D1
        if algo == "dpmsolver":
            e = S.exp32(h) - F32(1.0)
            x = (alpha_t / alpha_s1) * sample - (sigma_t * e) * D0
            if midpoint:
                return x - (F32(0.5) * (sigma_t * e)) * D1
            return x - (sigma_t * (e / h - F32(1.0))) * D1
        # sde-dpmsolver++
        e2 = F32(1) - S.exp32(F32(-2.0) * h)
        x = (sigma_t / sigma_s1 * S.exp32(-h)) * sample + (alpha_t * e2) * D0
        if midpoint:
            x = x + (F32(0.5) * (alpha_t * e2)) * D1
        else:
            x = x + (alpha_t * (e2 / (F32(-2.0) * h) + F32(1.0))) * D1
        return x + (sigma_t * S.sqrt32(F32(1.0) - S.exp32(F32(-2) * h))) * noise

    def _third_order(self, outputs, sample, noise):
        """From the run's start s2 (sigmas[i - 2]) over s1, s0 to t (sigmas[i + 1])."""
        i = self._step_index
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(self.sigmas[i + 1])
        _, _, lambda_s0 = self._alpha_sigma_lambda(self.sigmas[i])
        _, _, lambda_s1 = self._alpha_sigma_lambda(self.sigmas[i - 1])
        alpha_s2, sigma_s2, lambda_s2 = self._alpha_sigma_lambda(self.sigmas[i - 2])
        m0, m1, m2 = outputs[-1], outputs[-2], outputs[-3]
        h, h_0, h_1 = lambda_t - lambda_s2, lambda_s0 - lambda_s2, lambda_s1 - lambda_s2
        r0, r1 = h_0 / h, h_1 / h
        D0 = m2
        D1_0, D1_1 = (F32(1.0) / r1) * (m1 - m2), (F32(1.0) / r0) * (m0 - m2)
        D1 = (r0 * D1_0 - r1 * D1_1) / (r0 - r1)
        D2 = (F32(2.0) * (D1_1 - D1_0)) / (r0 - r1)
        algo, midpoint = self.config["algorithm_type"], self.config["solver_type"] == "midpoint"
        if algo == "dpmsolver++":
            e = S.exp32(-h) - F32(1.0)
            x = (sigma_t / sigma_s2) * sample - (alpha_t * e) * D0
            if midpoint:
                return x + (alpha_t * (e / h + F32(1.0))) * D1_1
            x = x + (alpha_t * (e / h + F32(1.0))) * D1
            return x - (alpha_t * ((e + h) / (h * h) - F32(0.5))) * D2
        if algo == "dpmsolver":
            e = S.exp32(h) - F32(1.0)
            x = (alpha_t / alpha_s2) * sample - (sigma_t * e) * D0
            if midpoint:
                return x - (sigma_t * (e / h - F32(1.0))) * D1_1
            x = x - (sigma_t * (e / h - F32(1.0))) * D1
            return x - (sigma_t * ((e - h) / (h * h) - F32(0.5))) * D2
        # sde-dpmsolver++
        e2 = F32(1.0) - S.exp32(F32(-2.0) * h)
        m2h = F32(-2.0) * h
        x = (sigma_t / sigma_s2 * S.exp32(-h)) * sample + (alpha_t * e2) * D0
        if midpoint:
            x = x + (alpha_t * (e2 / m2h + F32(1.0))) * D1_1
        else:
            x = x + (alpha_t * (e2 / m2h + F32(1.0))) * D1
            x = x + (alpha_t * ((e2 + m2h) / (m2h * m2h) - F32(0.5))) * D2
        return x + (sigma_t * S.sqrt32(F32(1.0) - S.exp32(F32(-2) * h))) * noise

    # -------------------------------------------------------------------------------------- step
    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, generator=None) -> np.ndarray:
        if self.num_inference_steps is None:
            raise RuntimeError("set_timesteps must be called before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        sample = sample.astype(F32, copy=False)
        m = self.convert_model_output(model_output, sample)
        self.model_outputs = self.model_outputs[1:] + [m]
        noise = None
        if self.config["algorithm_type"] == "sde-dpmsolver++":
            noise = S.draw_noise(m.shape, generator, m.dtype)
        order = self.order_list[self._step_index]
        while self.model_outputs[-order] is None:
            order -= 1
        if order == 1:  # a new run starts here
            self.sample = sample
            prev_sample = self._first_order(m, self.sample, noise)
        elif order == 2:
            prev_sample = self._second_order(self.model_outputs, self.sample, noise)
        else:
            prev_sample = self._third_order(self.model_outputs, self.sample, noise)
        self._step_index += 1
        return prev_sample.astype(F32, copy=False)
