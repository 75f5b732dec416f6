"""DPM-Solver / DPM-Solver++ multistep (Lu et al. 2022, https://arxiv.org/abs/2206.00927 and
https://arxiv.org/abs/2211.01095): exponential-integrator steps in lambda = log(alpha / sigma), reusing the model
outputs of earlier steps for the higher-order terms ("DPM++ 2M" is dpmsolver++ with solver_order 2).

Matches diffusers' ``DPMSolverMultistepScheduler``: algorithm types dpmsolver++, dpmsolver, sde-dpmsolver++ and
sde-dpmsolver, solver orders 1-3, midpoint / heun second-order terms, Karras / exponential / beta / Lu lambda sigmas,
lower-order final steps, and ``final_sigmas_type``. The SDE variants draw one noise tensor per step.
"""

from __future__ import annotations

import numpy as np

from ..errors import UsageError
from . import schedules as S
from .base import SolverScheduler

F32 = S.F32


class DPMSolverMultistepScheduler(SolverScheduler):
    diffusers_class = "DPMSolverMultistepScheduler"
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
        lower_order_final=True,
        euler_at_final=False,
        use_karras_sigmas=False,
        use_exponential_sigmas=False,
        use_beta_sigmas=False,
        use_lu_lambdas=False,
        use_flow_sigmas=False,
        flow_shift=1.0,
        final_sigmas_type="zero",
        lambda_min_clipped=-float("inf"),
        variance_type=None,
        timestep_spacing="linspace",
        steps_offset=0,
        rescale_betas_zero_snr=False,
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
        if c["use_flow_sigmas"] or c["use_dynamic_shifting"]:
            raise UsageError("use_flow_sigmas and use_dynamic_shifting are not supported")
        S.check_sigma_options(c, self.diffusers_class)
        if sum(bool(c[k]) for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_lu_lambdas")) > 1:
            raise UsageError("only one of use_karras_sigmas, use_exponential_sigmas, use_lu_lambdas can be set")
        if c["algorithm_type"] == "deis":
            c["algorithm_type"] = "dpmsolver++"
        if c["algorithm_type"] not in ("dpmsolver", "dpmsolver++", "sde-dpmsolver", "sde-dpmsolver++"):
            raise UsageError(f"algorithm_type {c['algorithm_type']!r} is not supported "
                             "(dpmsolver++, dpmsolver, sde-dpmsolver++, sde-dpmsolver)")
        if c["solver_type"] in ("logrho", "bh1", "bh2"):
            c["solver_type"] = "midpoint"
        if c["solver_type"] not in ("midpoint", "heun"):
            raise UsageError(f"solver_type {c['solver_type']!r} is not supported (midpoint, heun)")
        if c["solver_order"] not in (1, 2, 3):
            raise UsageError(f"solver_order must be 1, 2 or 3, not {c['solver_order']!r}")
        if c["solver_order"] == 3 and c["algorithm_type"] == "sde-dpmsolver":
            raise UsageError("sde-dpmsolver has no third-order steps (use solver_order 2, or sde-dpmsolver++)")
        if c["final_sigmas_type"] not in ("zero", "sigma_min"):
            raise UsageError(f"final_sigmas_type {c['final_sigmas_type']!r} is not supported (zero, sigma_min)")
        if c["algorithm_type"] not in ("dpmsolver++", "sde-dpmsolver++") and c["final_sigmas_type"] == "zero":
            raise UsageError(f"algorithm_type {c['algorithm_type']} needs final_sigmas_type sigma_min")
        alpha_t = np.sqrt(self.alphas_cumprod)
        sigma_t = np.sqrt(F32(1) - self.alphas_cumprod)
        with np.errstate(divide="ignore"):
            self.lambda_t = np.log(alpha_t) - np.log(sigma_t)
        self.sigmas = S.sigmas_of(self.alphas_cumprod)
        T = c["num_train_timesteps"]
        self.timesteps = np.linspace(0, T - 1, T, dtype=F32)[::-1].copy()
        self._reset_state()
        self._reset_step_index()

    def _reset_state(self) -> None:
        self.model_outputs: list[np.ndarray | None] = [None] * self.config["solver_order"]
        self.lower_order_nums = 0

    def set_timesteps(self, num_inference_steps: int) -> None:
        c = self.config
        T = c["num_train_timesteps"]
        n = S.check_steps(num_inference_steps, T)
        clipped_idx = int(np.searchsorted(self.lambda_t[::-1], c["lambda_min_clipped"]))
        timesteps = S.solver_timesteps(c["timestep_spacing"], T, n, c["steps_offset"], last=T - clipped_idx)

        round_t = c["beta_schedule"] != "squaredcos_cap_v2"
        if c["use_lu_lambdas"]:
            log_sigmas = np.log(S.sigmas_of(self.alphas_cumprod))
            lambdas = np.flip(log_sigmas.copy())
            lam_min, lam_max = lambdas[-1].item(), lambdas[0].item()
            ramp = np.linspace(0, 1, n)
            lambdas = lam_max + ramp * (lam_min - lam_max)
            sigmas = np.exp(lambdas)
            timesteps = S.sigma_to_t(sigmas, log_sigmas)
            if round_t:
                timesteps = timesteps.round()
        else:
            timesteps, sigmas = S.solver_sigma_schedule(c, self.alphas_cumprod, timesteps, n, round_karras=round_t)
        sigma_last = S.min_train_sigma(self.alphas_cumprod) if c["final_sigmas_type"] == "sigma_min" else 0.0
        self.sigmas = np.concatenate([sigmas, [sigma_last]]).astype(F32)
        self.timesteps = np.asarray(timesteps).astype(np.int64)
        self.num_inference_steps = len(self.timesteps)
        self._reset_state()
        self._reset_step_index()

    # -------------------------------------------------------------------------------------- pieces
    def convert_model_output(self, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """The model output as the solver wants it: x0 for dpmsolver++, noise for dpmsolver."""
        c = self.config
        pt = c["prediction_type"]
        learned = c["variance_type"] in ("learned", "learned_range")
        sigma = self.sigmas[self._step_index]
        alpha_t, sigma_t = self._alpha_sigma(sigma)
        if c["algorithm_type"] in ("dpmsolver++", "sde-dpmsolver++"):
            if pt == "epsilon":
                if learned:
                    model_output = model_output[:, :3]
                x0 = (sample - sigma_t * model_output) / alpha_t
            elif pt == "sample":
                x0 = model_output
            else:  # v_prediction
                x0 = alpha_t * sample - sigma_t * model_output
            if c["thresholding"]:
                x0 = S.threshold_sample(x0, c["dynamic_thresholding_ratio"], c["sample_max_value"])
            return x0
        if pt == "epsilon":
            eps = model_output[:, :3] if learned else model_output
        elif pt == "sample":
            eps = (sample - alpha_t * model_output) / sigma_t
        else:
            eps = alpha_t * model_output + sigma_t * sample
        if c["thresholding"]:
            x0 = (sample - sigma_t * eps) / alpha_t
            x0 = S.threshold_sample(x0, c["dynamic_thresholding_ratio"], c["sample_max_value"])
            eps = (sample - alpha_t * x0) / sigma_t
        return eps

    def _first_order(self, m0, sample, noise):
        i = self._step_index
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(self.sigmas[i + 1])
        alpha_s, sigma_s, lambda_s = self._alpha_sigma_lambda(self.sigmas[i])
        h = lambda_t - lambda_s
        algo = self.config["algorithm_type"]
        if algo == "dpmsolver++":
            return (sigma_t / sigma_s) * sample - (alpha_t * (S.exp32(-h) - 1.0)) * m0
        if algo == "dpmsolver":
            return (alpha_t / alpha_s) * sample - (sigma_t * (S.exp32(h) - 1.0)) * m0
        if algo == "sde-dpmsolver++":
            return ((sigma_t / sigma_s * S.exp32(-h)) * sample
                    + (alpha_t * (1 - S.exp32(F32(-2.0) * h))) * m0
                    + sigma_t * S.sqrt32(1.0 - S.exp32(F32(-2) * h)) * noise)
        # sde-dpmsolver
        return ((alpha_t / alpha_s) * sample
                - F32(2.0) * (sigma_t * (S.exp32(h) - 1.0)) * m0
                + sigma_t * S.sqrt32(S.exp32(F32(2) * h) - 1.0) * noise)

    def _second_order(self, outputs, sample, noise):
        i = self._step_index
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(self.sigmas[i + 1])
        alpha_s0, sigma_s0, lambda_s0 = self._alpha_sigma_lambda(self.sigmas[i])
        _, _, lambda_s1 = self._alpha_sigma_lambda(self.sigmas[i - 1])
        m0, m1 = outputs[-1], outputs[-2]
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        D0, D1 = m0, (F32(1.0) / r0) * (m0 - m1)
        algo, midpoint = self.config["algorithm_type"], self.config["solver_type"] == "midpoint"
        if algo == "dpmsolver++":
            e = S.exp32(-h) - 1.0
            if midpoint:
                return (sigma_t / sigma_s0) * sample - (alpha_t * e) * D0 - F32(0.5) * (alpha_t * e) * D1
            return (sigma_t / sigma_s0) * sample - (alpha_t * e) * D0 + (alpha_t * (e / h + 1.0)) * D1
        if algo == "dpmsolver":
            e = S.exp32(h) - 1.0
            if midpoint:
                return (alpha_t / alpha_s0) * sample - (sigma_t * e) * D0 - F32(0.5) * (sigma_t * e) * D1
            return (alpha_t / alpha_s0) * sample - (sigma_t * e) * D0 - (sigma_t * (e / h - 1.0)) * D1
        if algo == "sde-dpmsolver++":
            e2 = 1 - S.exp32(F32(-2.0) * h)
            first = (sigma_t / sigma_s0 * S.exp32(-h)) * sample + (alpha_t * e2) * D0
            if midpoint:
                x = first + F32(0.5) * (alpha_t * e2) * D1
            else:
                x = first + (alpha_t * ((F32(1.0) - S.exp32(F32(-2.0) * h)) / (F32(-2.0) * h) + 1.0)) * D1
            return x + sigma_t * S.sqrt32(1.0 - S.exp32(F32(-2) * h)) * noise
        # sde-dpmsolver
        e = S.exp32(h) - 1.0
        first = (alpha_t / alpha_s0) * sample - F32(2.0) * (sigma_t * e) * D0
        if midpoint:
            x = first - (sigma_t * e) * D1
        else:
            x = first - F32(2.0) * (sigma_t * (e / h - 1.0)) * D1
        return x + sigma_t * S.sqrt32(S.exp32(F32(2) * h) - 1.0) * noise

    def _third_order(self, outputs, sample, noise):
        i = self._step_index
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(self.sigmas[i + 1])
        alpha_s0, sigma_s0, lambda_s0 = self._alpha_sigma_lambda(self.sigmas[i])
        _, _, lambda_s1 = self._alpha_sigma_lambda(self.sigmas[i - 1])
        _, _, lambda_s2 = self._alpha_sigma_lambda(self.sigmas[i - 2])
        m0, m1, m2 = outputs[-1], outputs[-2], outputs[-3]
        h, h_0, h_1 = lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
        r0, r1 = h_0 / h, h_1 / h
        D0 = m0
        D1_0, D1_1 = (F32(1.0) / r0) * (m0 - m1), (F32(1.0) / r1) * (m1 - m2)
        D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
        D2 = (F32(1.0) / (r0 + r1)) * (D1_0 - D1_1)
        algo = self.config["algorithm_type"]
        if algo == "dpmsolver++":
            e = S.exp32(-h) - 1.0
            return ((sigma_t / sigma_s0) * sample
                    - (alpha_t * e) * D0
                    + (alpha_t * (e / h + 1.0)) * D1
                    - (alpha_t * ((S.exp32(-h) - 1.0 + h) / (h * h) - 0.5)) * D2)
        if algo == "dpmsolver":
            e = S.exp32(h) - 1.0
            return ((alpha_t / alpha_s0) * sample
                    - (sigma_t * e) * D0
                    - (sigma_t * (e / h - 1.0)) * D1
                    - (sigma_t * ((S.exp32(h) - 1.0 - h) / (h * h) - 0.5)) * D2)
        if algo == "sde-dpmsolver++":
            e2 = F32(1.0) - S.exp32(F32(-2.0) * h)
            two_h = F32(2.0) * h
            return ((sigma_t / sigma_s0 * S.exp32(-h)) * sample
                    + (alpha_t * e2) * D0
                    + (alpha_t * (e2 / (F32(-2.0) * h) + 1.0)) * D1
                    + (alpha_t * ((e2 - two_h) / (two_h * two_h) - 0.5)) * D2
                    + sigma_t * S.sqrt32(1.0 - S.exp32(F32(-2) * h)) * noise)
        raise AssertionError("sde-dpmsolver with solver_order 3 is refused in __init__")

    # -------------------------------------------------------------------------------------- step
    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, generator=None) -> np.ndarray:
        if self.num_inference_steps is None:
            raise RuntimeError("set_timesteps must be called before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        c = self.config
        i, n = self._step_index, len(self.timesteps)
        lower_order_final = (i == n - 1) and (
            c["euler_at_final"] or (c["lower_order_final"] and n < 15) or c["final_sigmas_type"] == "zero")
        lower_order_second = (i == n - 2) and c["lower_order_final"] and n < 15

        model_output_c = self.convert_model_output(model_output, sample)
        self.model_outputs = self.model_outputs[1:] + [model_output_c]
        sample = sample.astype(F32, copy=False)
        noise = None
        if c["algorithm_type"] in ("sde-dpmsolver", "sde-dpmsolver++"):
            noise = S.draw_noise(model_output_c.shape, generator, F32)

        order = c["solver_order"]
        if order == 1 or self.lower_order_nums < 1 or lower_order_final:
            prev_sample = self._first_order(model_output_c, sample, noise)
        elif order == 2 or self.lower_order_nums < 2 or lower_order_second:
            prev_sample = self._second_order(self.model_outputs, sample, noise)
        else:
            prev_sample = self._third_order(self.model_outputs, sample, noise)
        if self.lower_order_nums < order:
            self.lower_order_nums += 1
        self._step_index += 1
        return prev_sample.astype(model_output_c.dtype, copy=False)
