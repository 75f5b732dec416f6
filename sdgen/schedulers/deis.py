"""DEIS: diffusion exponential integrator sampler (Zhang & Chen 2022, https://arxiv.org/abs/2204.13902), multistep,
in its "logrho" form: the noise predictions of the last steps are extrapolated by a Lagrange polynomial in
log(rho), rho = sigma_t / alpha_t, and integrated exactly against the exponential integrator's kernel.

Matches diffusers' ``DEISMultistepScheduler`` (orders 1-3, Karras / exponential / beta sigmas, lower-order final
steps). Its final sigma is never 0: sqrt((1 - alpha_bar_0) / alpha_bar_0), or with Karras / exponential / beta
sigmas the last sigma again (so the last step leaves the sample as it is), as in diffusers.

diffusers evaluates the coefficients in float32 with numpy's float32 ``log``; so does this module, giving the same
bits from the same rho. The third-order coefficients are differences of nearly equal terms, though: a 1-ulp change of
rho (torch's float32 sqrt is not always correctly rounded) moves them by ~1e-4, so third-order DEIS agrees with
diffusers to ~1e-4 relative only; second order (the default) to ~1e-5.
"""

from __future__ import annotations

import numpy as np

from ..errors import UsageError
from . import schedules as S
from .base import SolverScheduler

F32 = S.F32
log = S.nplog32


def _deis2(t, b, c):
    """Antiderivative (in rho) term of the 2-point logrho DEIS coefficient (diffusers' ind_fn of order 2)."""
    return t * (-log(c) + log(t) - F32(1)) / (log(b) - log(c))


def _deis3(t, b, c, d):
    """The same for 3 points (diffusers' ind_fn of order 3)."""
    lt, lc, ld = log(t), log(c), log(d)
    numerator = t * (lc * (ld - lt + F32(1)) - ld * lt + ld + lt * lt - F32(2) * lt + F32(2))
    denominator = (log(b) - lc) * (log(b) - ld)
    return numerator / denominator


class DEISMultistepScheduler(SolverScheduler):
    diffusers_class = "DEISMultistepScheduler"
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
        algorithm_type="deis",
        solver_type="logrho",
        lower_order_final=True,
        use_karras_sigmas=False,
        use_exponential_sigmas=False,
        use_beta_sigmas=False,
        use_flow_sigmas=False,
        flow_shift=1.0,
        timestep_spacing="linspace",
        steps_offset=0,
        use_dynamic_shifting=False,
        time_shift_type="exponential",
    )
    order = 1

    @classmethod
    def _prediction_types(cls):
        return ("epsilon", "sample", "v_prediction")

    def __init__(self, **config):
        super().__init__(**config)
        c = self.config
        S.check_sigma_options(c, self.diffusers_class)
        if c["use_flow_sigmas"] or c["use_dynamic_shifting"]:
            raise UsageError("DEISMultistepScheduler: use_flow_sigmas and use_dynamic_shifting are not supported")
        if c["algorithm_type"] in ("dpmsolver", "dpmsolver++"):
            c["algorithm_type"] = "deis"
        if c["algorithm_type"] != "deis":
            raise UsageError(f"DEISMultistepScheduler: algorithm_type {c['algorithm_type']!r} is not supported (deis)")
        if c["solver_type"] in ("midpoint", "heun", "bh1", "bh2"):
            c["solver_type"] = "logrho"
        if c["solver_type"] != "logrho":
            raise UsageError(f"DEISMultistepScheduler: solver_type {c['solver_type']!r} is not supported (logrho)")
        if c["solver_order"] not in (1, 2, 3):
            raise UsageError(f"solver_order must be 1, 2 or 3, not {c['solver_order']!r}")
        self.sigmas = S.sigmas_of(self.alphas_cumprod)
        T = c["num_train_timesteps"]
        self.timesteps = np.linspace(0, T - 1, T, dtype=F32)[::-1].copy()
        self._reset_state()
        self._reset_step_index()

    def _reset_state(self) -> None:
        self.model_outputs: list[np.ndarray | None] = [None] * self.config["solver_order"]
        self.lower_order_nums = 0

    def set_timesteps(self, num_inference_steps: int) -> None:
        self._set_spaced_timesteps(num_inference_steps, zero_final=False)  # diffusers' DEIS has no final_sigmas_type

    def convert_model_output(self, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """The noise prediction, by way of x0 (so thresholding and the other prediction types apply)."""
        c = self.config
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[self._step_index])
        pt = c["prediction_type"]
        if pt == "epsilon":
            x0 = (sample - sigma_t * model_output) / alpha_t
        elif pt == "sample":
            x0 = model_output
        else:  # v_prediction
            x0 = alpha_t * sample - sigma_t * model_output
        if c["thresholding"]:
            x0 = S.threshold_sample(x0, c["dynamic_thresholding_ratio"], c["sample_max_value"])
        return (sample - alpha_t * x0) / sigma_t

    def _first_order(self, m0, sample):
        i = self._step_index
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(self.sigmas[i + 1])
        alpha_s, sigma_s, lambda_s = self._alpha_sigma_lambda(self.sigmas[i])
        h = lambda_t - lambda_s
        return (alpha_t / alpha_s) * sample - (sigma_t * (S.exp32(h) - F32(1.0))) * m0

    def _rhos(self, count: int):
        """(alpha_t, alpha_s0, [rho_t, rho_s0, rho_s1, ...]) for the step in progress, rho = sigma / alpha."""
        i = self._step_index
        pairs = [self._alpha_sigma(self.sigmas[i + 1 - k]) for k in range(count + 1)]
        return pairs[0][0], pairs[1][0], [sig / alpha for alpha, sig in pairs]

    def _second_order(self, outputs, sample):
        alpha_t, alpha_s0, (rho_t, rho_s0, rho_s1) = self._rhos(2)
        m0, m1 = outputs[-1], outputs[-2]
        coef1 = _deis2(rho_t, rho_s0, rho_s1) - _deis2(rho_s0, rho_s0, rho_s1)
        coef2 = _deis2(rho_t, rho_s1, rho_s0) - _deis2(rho_s0, rho_s1, rho_s0)
        return alpha_t * (sample / alpha_s0 + coef1 * m0 + coef2 * m1)

    def _third_order(self, outputs, sample):
        alpha_t, alpha_s0, (rho_t, rho_s0, rho_s1, rho_s2) = self._rhos(3)
        m0, m1, m2 = outputs[-1], outputs[-2], outputs[-3]
        coef1 = _deis3(rho_t, rho_s0, rho_s1, rho_s2) - _deis3(rho_s0, rho_s0, rho_s1, rho_s2)
        coef2 = _deis3(rho_t, rho_s1, rho_s2, rho_s0) - _deis3(rho_s0, rho_s1, rho_s2, rho_s0)
        coef3 = _deis3(rho_t, rho_s2, rho_s0, rho_s1) - _deis3(rho_s0, rho_s2, rho_s0, rho_s1)
        return alpha_t * (sample / alpha_s0 + coef1 * m0 + coef2 * m1 + coef3 * m2)

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, generator=None) -> np.ndarray:
        if self.num_inference_steps is None:
            raise RuntimeError("set_timesteps must be called before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        c = self.config
        i, n = self._step_index, len(self.timesteps)
        lower_order_final = i == n - 1 and c["lower_order_final"] and n < 15
        lower_order_second = i == n - 2 and c["lower_order_final"] and n < 15
        sample = sample.astype(F32, copy=False)
        m = self.convert_model_output(model_output, sample)
        self.model_outputs = self.model_outputs[1:] + [m]
        order = c["solver_order"]
        if order == 1 or self.lower_order_nums < 1 or lower_order_final:
            prev_sample = self._first_order(m, sample)
        elif order == 2 or self.lower_order_nums < 2 or lower_order_second:
            prev_sample = self._second_order(self.model_outputs, sample)
        else:
            prev_sample = self._third_order(self.model_outputs, sample)
        if self.lower_order_nums < order:
            self.lower_order_nums += 1
        self._step_index += 1
        return prev_sample.astype(F32, copy=False)
