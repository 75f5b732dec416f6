"""UniPC: unified predictor-corrector multistep sampling (Zhao et al. 2023, https://arxiv.org/abs/2302.04867).

Every step first corrects the sample it is given (UniC: the previous prediction is redone with the model output just
evaluated at its end), then predicts the next sample (UniP, a multistep exponential integrator of up to
``solver_order``, its coefficients from a small linear system in the lambda ratios). The corrector costs no extra
model evaluation.

Matches diffusers' ``UniPCMultistepScheduler``: bh1 / bh2 variants, x0 or noise prediction (``predict_x0``),
``disable_corrector``, orders 1-3, Karras / exponential / beta sigmas (honouring ``sigma_min`` / ``sigma_max``),
``final_sigmas_type``, lower-order final steps and zero terminal SNR. A ``solver_p`` scheduler is not supported.
"""

from __future__ import annotations

import numpy as np

from ..errors import UsageError
from . import schedules as S
from .base import SolverScheduler

F32 = S.F32


class UniPCMultistepScheduler(SolverScheduler):
    diffusers_class = "UniPCMultistepScheduler"
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
        predict_x0=True,
        solver_type="bh2",
        lower_order_final=True,
        disable_corrector=[],
        solver_p=None,
        use_karras_sigmas=False,
        use_exponential_sigmas=False,
        use_beta_sigmas=False,
        use_flow_sigmas=False,
        flow_shift=1.0,
        timestep_spacing="linspace",
        steps_offset=0,
        final_sigmas_type="zero",
        rescale_betas_zero_snr=False,
        use_dynamic_shifting=False,
        time_shift_type="exponential",
        sigma_min=None,
        sigma_max=None,
        shift_terminal=None,
    )
    order = 1

    @classmethod
    def _prediction_types(cls):
        return ("epsilon", "sample", "v_prediction")

    def __init__(self, **config):
        super().__init__(**config)
        c = self.config
        S.check_sigma_options(c, self.diffusers_class)
        if c["use_flow_sigmas"] or c["use_dynamic_shifting"] or c["shift_terminal"] is not None:
            raise UsageError("UniPCMultistepScheduler: flow sigmas, dynamic shifting and shift_terminal are not "
                             "supported")
        if c["solver_p"] is not None:
            raise UsageError("UniPCMultistepScheduler: solver_p is not supported")
        if c["solver_type"] in ("midpoint", "heun", "logrho"):
            c["solver_type"] = "bh2"
        if c["solver_type"] not in ("bh1", "bh2"):
            raise UsageError(f"UniPCMultistepScheduler: solver_type {c['solver_type']!r} is not supported (bh1, bh2)")
        if c["final_sigmas_type"] not in ("zero", "sigma_min"):
            raise UsageError(f"final_sigmas_type {c['final_sigmas_type']!r} is not supported (zero, sigma_min)")
        if not isinstance(c["solver_order"], int) or c["solver_order"] < 1:
            raise UsageError(f"solver_order must be a positive integer, not {c['solver_order']!r}")
        self.predict_x0 = bool(c["predict_x0"])
        self.disable_corrector = list(c["disable_corrector"] or [])
        self.sigmas = S.sigmas_of(self.alphas_cumprod)
        T = c["num_train_timesteps"]
        self.timesteps = np.linspace(0, T - 1, T, dtype=F32)[::-1].copy()
        self._reset_state()
        self._reset_step_index()

    def _reset_state(self) -> None:
        order = self.config["solver_order"]
        self.model_outputs: list[np.ndarray | None] = [None] * order
        self.lower_order_nums = 0
        self.last_sample: np.ndarray | None = None
        self.this_order = 1

    def set_timesteps(self, num_inference_steps: int) -> None:
        self._set_spaced_timesteps(num_inference_steps, zero_final=self.config["final_sigmas_type"] == "zero")

    def convert_model_output(self, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """x0 (predict_x0) or the noise, from whatever the model predicts."""
        c = self.config
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[self._step_index])
        pt = c["prediction_type"]
        if self.predict_x0:
            if pt == "epsilon":
                x0 = (sample - sigma_t * model_output) / alpha_t
            elif pt == "sample":
                x0 = model_output
            else:  # v_prediction
                x0 = alpha_t * sample - sigma_t * model_output
            if c["thresholding"]:
                x0 = S.threshold_sample(x0, c["dynamic_thresholding_ratio"], c["sample_max_value"])
            return x0
        if pt == "epsilon":
            return model_output
        if pt == "sample":
            return (sample - alpha_t * model_output) / sigma_t
        return alpha_t * model_output + sigma_t * sample

    # -------------------------------------------------------------------------------------- shared maths
    def _coefficients(self, t_index: int, s0_index: int, order: int, offset: int, outputs):
        """The pieces UniP and UniC share, for the step from sigmas[s0_index] to sigmas[t_index]:
        (alpha_t, sigma_t, alpha_s0, sigma_s0, h_phi_1, B_h, R, b, D1s) with D1s the scaled differences of the
        older model outputs (outputs[-(k + 1)] taken at sigmas[step_index - k - offset])."""
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(self.sigmas[t_index])
        alpha_s0, sigma_s0, lambda_s0 = self._alpha_sigma_lambda(self.sigmas[s0_index])
        h = lambda_t - lambda_s0
        m0 = outputs[-1]
        rks, D1s = [], []
        for k in range(1, order):
            _, _, lambda_si = self._alpha_sigma_lambda(self.sigmas[self._step_index - k - offset])
            rk = (lambda_si - lambda_s0) / h
            rks.append(rk)
            D1s.append((outputs[-(k + 1)] - m0) / rk)
        rks.append(F32(1.0))
        rks = np.array(rks, dtype=F32)
        hh = -h if self.predict_x0 else h
        h_phi_1 = np.expm1(hh)
        # hh = 0 where the last two sigmas are equal (Karras sigmas ending at sigma_min): b is then nan, as in
        # diffusers, and no step uses it (the latents stay finite); numpy would warn of the 0 / 0 on stderr
        with np.errstate(invalid="ignore", divide="ignore"):
            h_phi_k = h_phi_1 / hh - F32(1)
            factorial = 1
            B_h = hh if self.config["solver_type"] == "bh1" else np.expm1(hh)
            R, b = [], []
            power = np.ones_like(rks)
            for k in range(1, order + 1):
                R.append(power)  # rks ** (k - 1), multiplied out as torch.pow does for small integer exponents
                power = power * rks
                b.append(h_phi_k * F32(factorial) / B_h)
                factorial *= k + 1
                h_phi_k = h_phi_k / hh - F32(1 / factorial)
        return alpha_t, sigma_t, alpha_s0, sigma_s0, h_phi_1, B_h, np.stack(R), np.array(b, F32), D1s

    @staticmethod
    def _weighted(rhos: np.ndarray, D1s: list[np.ndarray]):
        """sum_k rhos[k] D1s[k] (diffusers' einsum over the stacked differences)."""
        total = rhos[0] * D1s[0]
        for r, d in zip(rhos[1:], D1s[1:]):
            total = total + r * d
        return total

    def _predict(self, sample: np.ndarray, order: int) -> np.ndarray:
        """UniP: from sigmas[i] to sigmas[i + 1]."""
        i = self._step_index
        m0 = self.model_outputs[-1]
        alpha_t, sigma_t, alpha_s0, sigma_s0, h_phi_1, B_h, R, b, D1s = self._coefficients(
            i + 1, i, order, 0, self.model_outputs)
        if D1s:
            if order == 2:
                rhos_p = np.array([0.5], F32)
            else:
                rhos_p = np.linalg.solve(R[:-1, :-1], b[:-1]).astype(F32)
            pred_res = self._weighted(rhos_p, D1s)
        else:
            pred_res = F32(0)
        if self.predict_x0:
            x_t_ = (sigma_t / sigma_s0) * sample - (alpha_t * h_phi_1) * m0
            return x_t_ - (alpha_t * B_h) * pred_res
        x_t_ = (alpha_t / alpha_s0) * sample - (sigma_t * h_phi_1) * m0
        return x_t_ - (sigma_t * B_h) * pred_res

    def _correct(self, this_output: np.ndarray, last_sample: np.ndarray, this_sample: np.ndarray,
                 order: int) -> np.ndarray:
        """UniC: redo the step from sigmas[i - 1] to sigmas[i] with the model output at its end."""
        i = self._step_index
        m0 = self.model_outputs[-1]
        alpha_t, sigma_t, alpha_s0, sigma_s0, h_phi_1, B_h, R, b, D1s = self._coefficients(
            i, i - 1, order, 1, self.model_outputs)
        if order == 1:
            rhos_c = np.array([0.5], F32)
        else:
            rhos_c = np.linalg.solve(R, b).astype(F32)
        corr_res = self._weighted(rhos_c[:-1], D1s) if D1s else F32(0)
        D1_t = this_output - m0
        if self.predict_x0:
            x_t_ = (sigma_t / sigma_s0) * last_sample - (alpha_t * h_phi_1) * m0
            return x_t_ - (alpha_t * B_h) * (corr_res + rhos_c[-1] * D1_t)
        x_t_ = (alpha_t / alpha_s0) * last_sample - (sigma_t * h_phi_1) * m0
        return x_t_ - (sigma_t * B_h) * (corr_res + rhos_c[-1] * D1_t)

    # -------------------------------------------------------------------------------------- step
    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, generator=None) -> np.ndarray:
        if self.num_inference_steps is None:
            raise RuntimeError("set_timesteps must be called before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        c = self.config
        i = self._step_index
        sample = sample.astype(F32, copy=False)
        use_corrector = i > 0 and (i - 1) not in self.disable_corrector and self.last_sample is not None
        m = self.convert_model_output(model_output, sample)
        if use_corrector:
            sample = self._correct(m, self.last_sample, sample, self.this_order).astype(F32, copy=False)
        self.model_outputs = self.model_outputs[1:] + [m]
        order = c["solver_order"]
        if c["lower_order_final"]:
            order = min(order, len(self.timesteps) - i)
        self.this_order = min(order, self.lower_order_nums + 1)
        self.last_sample = sample
        prev_sample = self._predict(sample, self.this_order)
        if self.lower_order_nums < c["solver_order"]:
            self.lower_order_nums += 1
        self._step_index += 1
        return prev_sample.astype(F32, copy=False)
