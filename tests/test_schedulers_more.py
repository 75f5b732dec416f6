"""The schedulers beyond the first five (DDPM, LMS, Heun, KDPM2, KDPM2 ancestral, DPM-Solver singlestep, DEIS, UniPC,
LCM, TCD), side by side with diffusers' scheduler of the same name and config, with the harness of
test_schedulers.py: a cheap synthetic denoiser, 4, 20 and 50 steps, epsilon and v-prediction, with and without
Karras sigmas, default / leading / trailing spacing; every model input and every intermediate latent must agree to
1e-5 relative. Stochastic schedulers draw their noise from a torch generator on both sides.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from test_schedulers import (  # noqa: E402
    SD15, TorchBackedGenerator, diffusers_scheduler, initial_noise, model_config, rel_err, run_side_by_side,
)

from sdgen.errors import UsageError  # noqa: E402
from sdgen.schedulers import make_scheduler, scheduler_names  # noqa: E402
from sdgen.schedulers import schedules as S  # noqa: E402
from sdgen.schedulers.lms import lagrange_integral  # noqa: E402

# case -> (our name, our overrides, diffusers class, diffusers overrides, step kwargs, stochastic, has karras)
CASES = {
    "ddpm": ("ddpm", {}, "DDPMScheduler", {}, {}, True, False),
    "lms": ("lms", {}, "LMSDiscreteScheduler", {}, {}, False, True),
    "heun": ("heun", {}, "HeunDiscreteScheduler", {}, {}, False, True),
    "dpm2": ("dpm2", {}, "KDPM2DiscreteScheduler", {}, {}, False, True),
    "dpm2_a": ("dpm2 a", {}, "KDPM2AncestralDiscreteScheduler", {}, {}, True, True),
    "dpmpp_2s": ("dpm++ 2s", {}, "DPMSolverSinglestepScheduler", {}, {}, False, True),
    "dpmpp_3s": ("dpmpp_2s", {"solver_order": 3}, "DPMSolverSinglestepScheduler", {"solver_order": 3}, {}, False,
                 True),
    "dpmpp_2s_sde": ("dpmpp_2s", {"algorithm_type": "sde-dpmsolver++"}, "DPMSolverSinglestepScheduler",
                     {"algorithm_type": "sde-dpmsolver++"}, {}, True, True),
    "deis": ("deis", {}, "DEISMultistepScheduler", {}, {}, False, True),
    "deis_3": ("deis", {"solver_order": 3}, "DEISMultistepScheduler", {"solver_order": 3}, {}, False, True),
    "unipc": ("unipc", {}, "UniPCMultistepScheduler", {}, {}, False, True),
    "unipc_3": ("unipc", {"solver_order": 3}, "UniPCMultistepScheduler", {"solver_order": 3}, {}, False, True),
    "lcm": ("lcm", {}, "LCMScheduler", {}, {}, True, False),
    "tcd": ("tcd", {}, "TCDScheduler", {}, {}, True, False),
}

# Where diffusers' float32 arithmetic amplifies a 1-ulp difference of torch's float32 sqrt (MKL; ~17% of results are
# not correctly rounded) far beyond 1e-7, the comparison is looser, case by case:
# * dpm2_a: sigma_down = sqrt(sigma_next^2 - sigma_up^2) cancels catastrophically when sigma_next << sigma (a 1-ulp
#   change of sigma_up moves sigma_down by up to ~1%), so the midpoint timesteps derived from it can differ by up to
#   ~0.01 (of 1000) in the last steps; the latents still agree to 1e-5.
# * third-order DEIS: its float32 coefficients are differences of nearly equal terms; a 1-ulp change of rho moves
#   them by ~1e-4 relative in diffusers itself (they are ~6e-4 off the exact float64 values there), so the
#   latents agree to ~1e-4 only. Second-order DEIS (the default) is within 1e-5.
TOLERANCES = {
    "dpm2_a": dict(timestep_atol=0.05),
    "deis_3": dict(rtol=5e-4),
}

WORST: dict[str, float] = {}


def check(case, steps, prediction_type=None, spacing=None, karras=False, seed=1234, our_extra=None,
          their_extra=None, step_kwargs=None, sigma_rtol=1e-6, tolerances=None, **cfg_extra):
    our_name, our_over, cls_name, their_over, kwargs, stochastic, _ = CASES[case]
    cfg = model_config(prediction_type, spacing, **cfg_extra)
    our_over = dict(our_over, **(our_extra or {}))
    their_over = dict(their_over, **(their_extra or {}))
    if karras:
        our_over["use_karras_sigmas"] = their_over["use_karras_sigmas"] = True
    ours = make_scheduler(our_name, cfg, **our_over)
    theirs = diffusers_scheduler(cls_name, cfg, **their_over)
    assert type(ours).__name__ == type(theirs).__name__
    gens = (TorchBackedGenerator(seed), torch.Generator().manual_seed(seed)) if stochastic else (None, None)
    worst = run_side_by_side(ours, theirs, steps, *gens, dict(kwargs, **(step_kwargs or {})), sigma_rtol=sigma_rtol,
                             **(tolerances or TOLERANCES.get(case, {})))
    return worst


def _matrix():
    for case, (*_, has_karras) in CASES.items():
        for karras in ([False, True] if has_karras else [False]):
            for pt in ("epsilon", "v_prediction"):
                for spacing in (None, "leading", "trailing"):
                    for steps in (4, 20, 50):
                        yield pytest.param(case, pt, spacing, karras, steps,
                                           id=f"{case}-{pt}-{spacing or 'default'}-{'karras' if karras else 'plain'}"
                                              f"-{steps}")


# ------------------------------------------------------------------------------------------------ side by side

@pytest.mark.parametrize("case,prediction_type,spacing,karras,steps", list(_matrix()))
def test_matches_diffusers(case, prediction_type, spacing, karras, steps):
    worst = check(case, steps, prediction_type, spacing, karras)
    WORST[case] = max(WORST.get(case, 0.0), worst)


@pytest.mark.parametrize("case", ["ddpm", "lms", "heun", "dpmpp_2s", "deis", "unipc", "lcm", "tcd"])
def test_sample_prediction(case):
    check(case, 12, "sample")


@pytest.mark.parametrize("case", ["ddpm", "unipc", "lcm", "tcd"])
def test_zero_terminal_snr_trailing(case):
    # the rescale goes through torch's float32 sqrt (1 ulp off at times), hence the looser sigma check
    check(case, 20, "v_prediction", "trailing", sigma_rtol=1e-5, rescale_betas_zero_snr=True)


@pytest.mark.parametrize("case", ["ddpm", "lms", "heun", "dpm2", "dpm2_a", "dpmpp_2s", "deis", "unipc", "lcm"])
@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
def test_other_beta_schedules(case, schedule):
    check(case, 15, beta_schedule=schedule, beta_start=0.0001, beta_end=0.02)


@pytest.mark.parametrize("case", ["lms", "heun", "dpm2", "dpm2_a", "dpmpp_2s", "deis", "unipc"])
@pytest.mark.parametrize("option", ["use_exponential_sigmas", "use_beta_sigmas"])
def test_exponential_and_beta_sigmas(case, option):
    over = {option: True}
    check(case, 10, our_extra=over, their_extra=over)


@pytest.mark.parametrize("name,cls", [("euler", "EulerDiscreteScheduler"), ("dpmpp_2m", "DPMSolverMultistepScheduler"),
                                      ("dpmpp_2m_sde", "DPMSolverMultistepScheduler")])
@pytest.mark.parametrize("steps", [4, 25])
def test_beta_sigmas_first_five(name, cls, steps):
    """Beta sigmas for the schedulers of test_schedulers.py too (diffusers needs scipy for them; we do not)."""
    cfg = model_config("v_prediction")
    ours = make_scheduler(name, cfg, use_beta_sigmas=True)
    theirs = diffusers_scheduler(cls, cfg, use_beta_sigmas=True, **(
        {"algorithm_type": "sde-dpmsolver++"} if name == "dpmpp_2m_sde" else {}))
    run_side_by_side(ours, theirs, steps, TorchBackedGenerator(9), torch.Generator().manual_seed(9))


def test_beta_ppf_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    special = pytest.importorskip("scipy.special")
    qs = np.concatenate([np.linspace(0, 1, 2001), [1e-9, 1e-6, 1 - 1e-6, 1 - 1e-9]])
    # diffusers' call: stats.beta.ppf(q, 0.6, 0.6)
    ours = np.array([S.beta_ppf(float(x), 0.6, 0.6) for x in qs])
    np.testing.assert_allclose(ours, stats.beta.ppf(qs, 0.6, 0.6), rtol=1e-13)
    # other shapes (there stats.beta.ppf itself goes wrong in the far tails; betaincinv does not)
    for a, b in ((0.5, 2.0), (3.0, 1.5)):
        ours = np.array([S.beta_ppf(float(x), a, b) for x in qs[:-1]])
        np.testing.assert_allclose(ours, special.betaincinv(a, b, qs[:-1]), rtol=1e-11)


@pytest.mark.parametrize("over", [
    {"variance_type": "fixed_small_log"}, {"variance_type": "fixed_large"}, {"clip_sample": True},
    {"thresholding": True, "sample_max_value": 1.5}, {"timestep_spacing": "linspace"},
])
def test_ddpm_variants(over):
    check("ddpm", 10, our_extra=over, their_extra=over)


@pytest.mark.parametrize("over", [
    {"solver_type": "heun"}, {"solver_type": "heun", "solver_order": 3},
    {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun", "solver_order": 3},
    {"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
    {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},
    {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "solver_order": 3},
    {"final_sigmas_type": "sigma_min"}, {"final_sigmas_type": "sigma_min", "solver_order": 3},
    {"solver_order": 1}, {"lambda_min_clipped": -5.1, "final_sigmas_type": "sigma_min"},
])
@pytest.mark.parametrize("steps", [7, 12])
def test_singlestep_variants(over, steps):
    # the third-order heun SDE term ((1 - e^-2h) - 2h) / (2h)^2 - 1/2 cancels in float32 (in diffusers too), which
    # turns 1-ulp differences of torch's exp into ~1e-5
    loose = over.get("solver_order") == 3 and over.get("solver_type") == "heun"
    check("dpmpp_2s_sde" if over.get("algorithm_type") == "sde-dpmsolver++" else "dpmpp_2s", steps,
          our_extra=over, their_extra=over, tolerances=dict(rtol=5e-5) if loose else None)


@pytest.mark.parametrize("over", [
    # bh1, noise prediction and full-order final steps need a final sigma > 0: with sigma = 0 at the end diffusers
    # itself ends in nan / inf there (and so does this port)
    {"solver_type": "bh1", "final_sigmas_type": "sigma_min"}, {"predict_x0": False, "final_sigmas_type": "sigma_min"},
    {"predict_x0": False, "solver_type": "bh1", "solver_order": 3, "final_sigmas_type": "sigma_min"},
    {"disable_corrector": [0, 2]}, {"final_sigmas_type": "sigma_min"},
    {"final_sigmas_type": "sigma_min", "use_karras_sigmas": True},
    {"lower_order_final": False, "final_sigmas_type": "sigma_min"},
    {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0},
])
@pytest.mark.filterwarnings("error::RuntimeWarning")  # no numpy warning on stderr (Karras sigmas end in a 0 / 0)
def test_unipc_variants(over):
    check("unipc_3" if over.get("solver_order") == 3 else "unipc", 12, our_extra=over, their_extra=over)


@pytest.mark.parametrize("over", [{"lower_order_final": False}, {"solver_order": 1}, {"thresholding": True}])
def test_deis_variants(over):
    check("deis_3", 16, our_extra=over, their_extra=over)


def test_heun_clip_sample():
    over = {"clip_sample": True, "clip_sample_range": 2.0}
    check("heun", 10, our_extra=over, their_extra=over)


@pytest.mark.parametrize("case,over,kwargs", [
    ("lcm", {"original_inference_steps": 25}, {}),
    ("lcm", {"timestep_scaling": 5.0, "set_alpha_to_one": False}, {}),
    ("lcm", {"clip_sample": True}, {}),
    ("tcd", {"original_inference_steps": 100}, {}),
])
def test_consistency_variants(case, over, kwargs):
    check(case, 8, our_extra=over, their_extra=over, step_kwargs=kwargs)


@pytest.mark.parametrize("eta", [0.0, 0.7, 1.0])
def test_tcd_eta(eta):
    check("tcd", 6, our_extra={"eta": eta}, step_kwargs={"eta": eta})


@pytest.mark.parametrize("case", ["ddpm", "dpm2_a", "dpmpp_2s_sde", "lcm", "tcd"])
def test_stochastic_with_sdgen_rng(case):
    rng = pytest.importorskip("sdgen.rng")
    our_name, our_over, cls_name, their_over, kwargs, _, _ = CASES[case]
    cfg = model_config()
    for steps, seed in ((4, 0), (20, 42)):
        ours = make_scheduler(our_name, cfg, **our_over)
        theirs = diffusers_scheduler(cls_name, cfg, **their_over)
        run_side_by_side(ours, theirs, steps, rng.TorchGenerator(seed), torch.Generator().manual_seed(seed), kwargs,
                         **TOLERANCES.get(case, {}))


@pytest.mark.parametrize("case", ["dpm2_a", "lcm", "ddpm"])
def test_batch_with_generator_list(case):
    our_name, our_over, cls_name, their_over, kwargs, _, _ = CASES[case]
    cfg = model_config()
    ours, theirs = make_scheduler(our_name, cfg, **our_over), diffusers_scheduler(cls_name, cfg, **their_over)
    run_side_by_side(ours, theirs, 6, [TorchBackedGenerator(s) for s in (7, 8)],
                     [torch.Generator().manual_seed(s) for s in (7, 8)], kwargs, shape=(2, 4, 8, 8),
                     **TOLERANCES.get(case, {}))


def test_worst_errors_report(capsys):
    """Prints the worst relative error of test_matches_diffusers per case (shown with -s)."""
    if WORST:
        with capsys.disabled():
            print("\nworst relative error per scheduler case over the step / prediction / spacing / sigma matrix:",
                  ", ".join(f"{k} {v:.2g}" for k, v in sorted(WORST.items())))


# ------------------------------------------------------------------------------------------------ pieces

@pytest.mark.parametrize("case", ["ddpm", "lms", "heun", "dpm2", "dpm2_a", "dpmpp_2s", "deis", "unipc", "lcm",
                                  "tcd"])
def test_add_noise(case):
    our_name, our_over, cls_name, their_over, *_ = CASES[case]
    ours = make_scheduler(our_name, SD15, **our_over)
    theirs = diffusers_scheduler(cls_name, SD15, **their_over)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    x0 = initial_noise((2, 4, 8, 8), 1)
    noise = initial_noise((2, 4, 8, 8), 2)
    t = theirs.timesteps[[0, 5]]
    expected = theirs.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), t).numpy()
    got = ours.add_noise(x0, noise, t.numpy())
    assert got.dtype == np.float32
    assert rel_err(got, expected) < 1e-6


@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("steps", [4, 20, 50])
def test_lms_coefficients_agree_with_quad(karras, steps):
    """LMS coefficients, three ways: the scheduler's (QUADPACK's 21-point Gauss-Kronrod rule on the float32 integrand)
    equal diffusers' get_lms_coefficient (scipy.integrate.quad on that integrand) bit for bit given the same sigmas,
    and to a few 1e-6 from our own sigma table; the exact closed form
    agrees with a float64 quad to ~1e-12, and with diffusers' to ~1e-6 (the float32 rounding of the integrand)."""
    integrate = pytest.importorskip("scipy.integrate")
    ours = make_scheduler("lms", SD15, use_karras_sigmas=karras)
    theirs = diffusers_scheduler("LMSDiscreteScheduler", SD15, use_karras_sigmas=karras)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    sig = ours.sigmas.astype(np.float64)
    same_sigmas = make_scheduler("lms", SD15, use_karras_sigmas=karras)
    same_sigmas.set_timesteps(steps)
    same_sigmas.sigmas = theirs.sigmas.numpy().copy()
    worst_exact_vs_quad = worst_exact_vs_theirs = 0.0
    for t in range(steps):
        order = min(t + 1, 4)
        for j in range(order):
            nodes = [sig[t - k] for k in range(order)]

            def basis(tau, nodes=nodes, j=j):
                prod = 1.0
                for k, x in enumerate(nodes):
                    if k != j:
                        prod *= (tau - x) / (nodes[j] - x)
                return prod

            theirs_c = float(theirs.get_lms_coefficient(order, t, j))
            exact = lagrange_integral(nodes, j, sig[t], sig[t + 1])
            quad = integrate.quad(basis, sig[t], sig[t + 1], epsabs=0, epsrel=1e-13)[0]
            scale = max(abs(quad), abs(sig[t + 1] - sig[t]))
            # bit for bit from the same sigmas; from ours (an ulp off torch's here and there: its float32 sqrt is
            # not always correctly rounded) to a few 1e-6 of the step
            assert same_sigmas.lms_coefficient(order, t, j) == theirs_c
            assert abs(ours.lms_coefficient(order, t, j) - theirs_c) <= 1e-5 * scale
            worst_exact_vs_quad = max(worst_exact_vs_quad, abs(exact - quad) / scale)
            worst_exact_vs_theirs = max(worst_exact_vs_theirs, abs(exact - theirs_c) / scale)
    assert worst_exact_vs_quad < 1e-10
    assert worst_exact_vs_theirs < 1e-5


def test_kdpm2_timesteps_and_sigmas():
    """The interleaved midpoint timesteps (float32 arithmetic in diffusers) and sigma tables."""
    for name, cls in (("dpm2", "KDPM2DiscreteScheduler"), ("dpm2_a", "KDPM2AncestralDiscreteScheduler")):
        for karras in (False, True):
            ours = make_scheduler(name, SD15, use_karras_sigmas=karras)
            theirs = diffusers_scheduler(cls, SD15, use_karras_sigmas=karras)
            for n in (1, 2, 7, 30):
                ours.set_timesteps(n)
                theirs.set_timesteps(n)
                assert ours.timesteps.dtype == theirs.timesteps.numpy().dtype
                np.testing.assert_allclose(ours.timesteps, theirs.timesteps.numpy(), rtol=1e-6,
                                           atol=TOLERANCES.get(name, {}).get("timestep_atol", 1e-5))
                np.testing.assert_allclose(ours.sigmas, theirs.sigmas.numpy(), rtol=1e-6)
                mid = theirs.sigmas_interpol.numpy()
                ok = np.isfinite(mid)
                np.testing.assert_array_equal(np.isfinite(ours.sigmas_interpol), ok)
                # dpm2_a: sigma_down's cancellation (see TOLERANCES) reaches the midpoints, by up to ~1%
                np.testing.assert_allclose(ours.sigmas_interpol[ok], mid[ok], rtol=1e-6 if name == "dpm2" else 2e-2)


def test_singlestep_order_list_and_config():
    for order in (1, 2, 3):
        for lof in (False, True):
            for fst in ("zero", "sigma_min"):
                for n in (1, 2, 3, 4, 5, 6, 7, 10, 11):
                    over = {"solver_order": order, "lower_order_final": lof, "final_sigmas_type": fst}
                    ours = make_scheduler("dpmpp_2s", SD15, **over)
                    theirs = diffusers_scheduler("DPMSolverSinglestepScheduler", SD15, **over)
                    ours.set_timesteps(n)
                    theirs.set_timesteps(n)
                    assert ours.order_list == theirs.order_list
                    assert ours.config["lower_order_final"] == theirs.config.lower_order_final
                    np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy())


@pytest.mark.parametrize("n", [1, 2, 3, 7, 26, 50])
def test_consistency_timesteps(n):
    for name, cls in (("lcm", "LCMScheduler"), ("tcd", "TCDScheduler")):
        for orig in (50, 4, 100):
            if n > orig:
                with pytest.raises(UsageError):
                    make_scheduler(name, SD15, original_inference_steps=orig).set_timesteps(n)
                continue
            ours = make_scheduler(name, SD15, original_inference_steps=orig)
            theirs = diffusers_scheduler(cls, SD15, original_inference_steps=orig)
            ours.set_timesteps(n)
            theirs.set_timesteps(n)
            np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy())


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("n", [1, 3, 10, 49, 999])
def test_solver_timesteps(spacing, n):
    for cls in ("DEISMultistepScheduler", "UniPCMultistepScheduler"):
        theirs = diffusers_scheduler(cls, SD15, timestep_spacing=spacing)
        theirs.set_timesteps(n)
        np.testing.assert_array_equal(S.solver_timesteps(spacing, 1000, n, 1), theirs.timesteps.numpy())


def test_from_config_of_each_class():
    """Loading a model whose scheduler config names one of the new classes builds that class with its keys."""
    for cls in ("DDPMScheduler", "LMSDiscreteScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
                "KDPM2AncestralDiscreteScheduler", "DPMSolverSinglestepScheduler", "DEISMultistepScheduler",
                "UniPCMultistepScheduler", "LCMScheduler", "TCDScheduler"):
        theirs = diffusers_scheduler(cls, SD15)
        cfg = dict(theirs.config)
        cfg["_class_name"] = cls
        ours = make_scheduler(None, cfg)
        assert type(ours).__name__ == cls
        for k, v in ours.config.items():
            if k != "eta":
                assert theirs.config[k] == v, (cls, k)


# ------------------------------------------------------------------------------------------------ names

@pytest.mark.parametrize("name,cls,key,value", [
    ("DDPM", "DDPMScheduler", None, None),
    ("LMS", "LMSDiscreteScheduler", "use_karras_sigmas", False),
    ("LMS Karras", "LMSDiscreteScheduler", "use_karras_sigmas", True),
    ("k_lms", "LMSDiscreteScheduler", None, None),
    ("Heun", "HeunDiscreteScheduler", None, None),
    ("heun karras", "HeunDiscreteScheduler", "use_karras_sigmas", True),
    ("DPM2", "KDPM2DiscreteScheduler", "use_karras_sigmas", False),
    ("DPM2 Karras", "KDPM2DiscreteScheduler", "use_karras_sigmas", True),
    ("DPM2 a", "KDPM2AncestralDiscreteScheduler", "use_karras_sigmas", False),
    ("DPM2 a Karras", "KDPM2AncestralDiscreteScheduler", "use_karras_sigmas", True),
    ("dpm++ 2s", "DPMSolverSinglestepScheduler", "solver_order", 2),
    ("dpmpp_2s_karras", "DPMSolverSinglestepScheduler", "use_karras_sigmas", True),
    ("dpm++ 3m", "DPMSolverMultistepScheduler", "solver_order", 3),
    ("DEIS", "DEISMultistepScheduler", None, None),
    ("UniPC", "UniPCMultistepScheduler", None, None),
    ("unipc karras", "UniPCMultistepScheduler", "use_karras_sigmas", True),
    ("deis exponential", "DEISMultistepScheduler", "use_exponential_sigmas", True),
    ("dpm++ 3m karras", "DPMSolverMultistepScheduler", "use_karras_sigmas", True),
    ("euler beta", "EulerDiscreteScheduler", "use_beta_sigmas", True),
    ("LCM", "LCMScheduler", None, None),
    ("TCD", "TCDScheduler", "eta", 0.3),
])
def test_names_and_aliases(name, cls, key, value):
    s = make_scheduler(name, SD15)
    assert type(s).__name__ == cls
    if key is not None:
        assert s.config[key] == value


def test_no_false_a1111_aliases():
    # A1111's "DPM++ SDE" (DPMSolverSDEScheduler, Brownian tree) and "DPM++ 2S a" are different samplers
    for name in ("dpm++ sde", "dpm++ sde karras", "dpm++ 2s a", "dpm++ 2s a karras"):
        with pytest.raises(UsageError):
            make_scheduler(name, SD15)
    # a suffix only where the scheduler has that option
    for name in ("ddpm karras", "lcm karras", "euler a karras", "lms karras karras"):
        with pytest.raises(UsageError):
            make_scheduler(name, SD15)


def test_every_class_is_named():
    named = {type(make_scheduler(n, SD15)).__name__ for n, _, _ in scheduler_names()}
    assert named == {"PNDMScheduler", "DDIMScheduler", "DDPMScheduler", "LMSDiscreteScheduler",
                     "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
                     "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
                     "DPMSolverSinglestepScheduler", "DEISMultistepScheduler", "UniPCMultistepScheduler",
                     "LCMScheduler", "TCDScheduler"}


def test_refusals():
    for name in ("lms", "heun", "dpm2", "dpmpp_2s", "deis", "unipc", "euler", "dpmpp_2m"):
        with pytest.raises(UsageError, match="only one of"):
            make_scheduler(name, SD15, use_beta_sigmas=True, use_karras_sigmas=True)
    for name, over in (("dpm2", {"prediction_type": "sample"}), ("ddpm", {"variance_type": "learned_range"}),
                       ("unipc", {"solver_type": "nope"}), ("tcd", {"eta": 1.5}),
                       ("lms", {"use_karras_sigmas": True, "use_exponential_sigmas": True})):
        with pytest.raises(UsageError):
            make_scheduler(name, SD15, **over)
    with pytest.raises(UsageError):
        make_scheduler("lcm", SD15).set_timesteps(51)
