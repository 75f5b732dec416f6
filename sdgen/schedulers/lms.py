"""LMS: the linear multistep method of k-diffusion's ``sample_lms`` in sigma space. The derivative
d_i = (x_i - x0_pred) / sigma_i of the last (up to 4) steps is extrapolated by its Lagrange polynomial in sigma and
integrated from sigma_i to sigma_{i+1}.

Matches diffusers' ``LMSDiscreteScheduler``, Karras / exponential / beta sigmas included.

The coefficients: diffusers integrates each Lagrange basis polynomial with ``scipy.integrate.quad`` (epsrel 1e-4)
over an integrand it evaluates in float32 torch arithmetic. For a polynomial of degree < 4 quad accepts its first
21-point Gauss-Kronrod estimate, so here that fixed rule (QUADPACK's ``qk21`` abscissae and weights, no scipy) is
applied to the same float32 integrand values: from the same sigmas the coefficients come out bit for bit as
diffusers' (our sigma table can differ from torch's by an ulp, as torch's float32 sqrt is not always correctly
rounded, which moves them by ~1e-7). The exact closed
form (``lagrange_integral``, via ``numpy.polynomial``) differs from them by ~1e-7 relative, which is the float32
rounding of the integrand; tests/test_schedulers_more.py checks both.
"""

from __future__ import annotations

import numpy as np
from numpy.polynomial import polynomial as P

from ..errors import UsageError
from . import schedules as S
from .base import SigmaScheduler

F32 = S.F32

# QUADPACK dqk21: the 21-point Kronrod abscissae (xgk[1::2] are the 10-point Gauss ones) and weights, on [-1, 1]
_XGK = (0.995657163025808080735527280689003, 0.973906528517171720077964012084452,
        0.930157491355708226001207180059508, 0.865063366688984510732096688423493,
        0.780817726586416897063717578345042, 0.679409568299024406234327365114874,
        0.562757134668604683339000099272694, 0.433395394129247190799265943165784,
        0.294392862701460198131126603103866, 0.148874338981631210884826001129720, 0.0)
_WGK = (0.011694638867371874278064396062192, 0.032558162307964727478818972459390,
        0.054755896574351996031381300244580, 0.075039674810919952767043140916190,
        0.093125454583697605535065465083366, 0.109387158802297641899210590325805,
        0.123491976262065851077208525417215, 0.134709217311473325928054001771707,
        0.142775938577060080797094273138717, 0.147739104901338491374841515972068,
        0.149445554002916905664936468389821)


def kronrod21(f, a: float, b: float) -> float:
    """QUADPACK's 21-point Gauss-Kronrod estimate of the integral of f from a to b, summed in dqk21's order.
    f maps a float64 array of abscissae to a float64 array of values."""
    centr, hlgth = 0.5 * (a + b), 0.5 * (b - a)
    offsets = [hlgth * x for x in _XGK[:10]]
    taus = np.array([centr] + [centr - o for o in offsets] + [centr + o for o in offsets], dtype=np.float64)
    values = f(taus)
    fc, lower, upper = values[0], values[1:11], values[11:]
    resk = _WGK[10] * fc
    for k in [1, 3, 5, 7, 9] + [0, 2, 4, 6, 8]:  # the Gauss abscissae first, then the Kronrod-only ones
        resk = resk + _WGK[k] * (lower[k] + upper[k])
    return float(resk * hlgth)


def lagrange_basis_f32(nodes, j: int):
    """The Lagrange basis polynomial that is 1 at nodes[j] and 0 at the others, evaluated as diffusers' LMS does:
    float32 factors (tau - s_k) / (s_j - s_k) multiplied in order."""
    nodes = [F32(x) for x in nodes]

    def f(taus: np.ndarray) -> np.ndarray:
        tau = taus.astype(F32)
        prod = np.ones_like(tau)
        for k, x in enumerate(nodes):
            if k != j:
                prod = prod * ((tau - x) / (nodes[j] - x))
        return prod.astype(np.float64)

    return f


def lagrange_integral(nodes, j: int, a: float, b: float) -> float:
    """The exact integral from a to b of the Lagrange basis polynomial that is 1 at nodes[j] and 0 at the other
    nodes (closed form, float64)."""
    nodes = [float(x) for x in nodes]
    others = [x for k, x in enumerate(nodes) if k != j]
    denom = 1.0
    for x in others:
        denom *= nodes[j] - x
    antiderivative = P.polyint(P.polyfromroots(others) if others else np.ones(1))
    return float((P.polyval(b, antiderivative) - P.polyval(a, antiderivative)) / denom)


class LMSDiscreteScheduler(SigmaScheduler):
    diffusers_class = "LMSDiscreteScheduler"
    defaults = dict(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        trained_betas=None,
        use_karras_sigmas=False,
        use_exponential_sigmas=False,
        use_beta_sigmas=False,
        prediction_type="epsilon",
        timestep_spacing="linspace",
        steps_offset=0,
    )
    order = 1
    #: how many past derivatives the extrapolation uses (diffusers' ``step(order=4)``)
    lms_order = 4

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
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(F32)
        self.timesteps = np.asarray(timesteps).astype(F32)
        self.derivatives: list[np.ndarray] = []
        self._reset_step_index()

    def lms_coefficient(self, order: int, t: int, current_order: int) -> float:
        """Weight of the derivative from step t - current_order in the step from sigma_t to sigma_{t+1}."""
        nodes = [self.sigmas[t - k] for k in range(order)]
        return kronrod21(lagrange_basis_f32(nodes, current_order), float(self.sigmas[t]), float(self.sigmas[t + 1]))

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, generator=None) -> np.ndarray:
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        sigma = self.sigmas[i]
        sample = sample.astype(F32, copy=False)
        pt = self.config["prediction_type"]
        if pt == "epsilon":
            pred_x0 = sample - sigma * model_output
        elif pt == "v_prediction":
            s2 = sigma * sigma + F32(1)
            pred_x0 = model_output * (-sigma / S.sqrt32(s2)) + (sample / s2)
        else:
            pred_x0 = model_output

        self.derivatives.append((sample - pred_x0) / sigma)
        if len(self.derivatives) > self.lms_order:
            self.derivatives.pop(0)
        order = min(i + 1, self.lms_order)
        # newest derivative first; the coefficients multiply in float32, as torch does with a Python float
        total = None
        for k, derivative in enumerate(reversed(self.derivatives[-order:])):
            term = F32(self.lms_coefficient(order, i, k)) * derivative
            total = term if total is None else total + term
        prev_sample = (sample + total).astype(F32, copy=False)
        self._step_index += 1
        return prev_sample
