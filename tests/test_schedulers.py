"""sdgen.schedulers against diffusers' schedulers, side by side.

Each scheduler is driven by a cheap synthetic denoiser (a fixed function of the model input and the timestep, no
network) for 4, 20 and 50 steps; diffusers' scheduler of the same name, converted from the Stable Diffusion 1.5
scheduler config with ``from_config`` as users do, is driven the same way with torch tensors, and every model input
and every intermediate latent must agree to 1e-5 relative (max |ours - theirs| / max |theirs|).

The denoiser is evaluated in numpy on both sides, so only the schedulers' arithmetic is compared. Stochastic
schedulers draw their noise from a generator: on our side a thin wrapper around a torch generator (so the draw order
and shapes are checked whether or not sdgen.rng is there), and in separate tests sdgen.rng.TorchGenerator itself.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sdgen.errors import UsageError  # noqa: E402
from sdgen.schedulers import make_scheduler, scheduler_names  # noqa: E402
from sdgen.schedulers import schedules as S  # noqa: E402

torch.set_num_threads(1)
F32 = np.float32
RTOL = 1e-5

SD15 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

# our name (+ our overrides) -> diffusers class (+ overrides as a user would pass them to from_config / step)
CASES = {
    "pndm": ("pndm", {}, "PNDMScheduler", {}, {}),
    "pndm_prk": ("pndm", {"skip_prk_steps": False}, "PNDMScheduler", {"skip_prk_steps": False}, {}),
    "ddim": ("ddim", {}, "DDIMScheduler", {}, {}),
    "ddim_eta": ("ddim", {"eta": 0.7}, "DDIMScheduler", {}, {"eta": 0.7}),
    "euler": ("euler", {}, "EulerDiscreteScheduler", {}, {}),
    "euler_karras": ("euler karras", {}, "EulerDiscreteScheduler", {"use_karras_sigmas": True}, {}),
    "euler_a": ("Euler A", {}, "EulerAncestralDiscreteScheduler", {}, {}),
    "dpmpp_2m": ("dpm++ 2m", {}, "DPMSolverMultistepScheduler", {}, {}),
    "dpmpp_2m_karras": ("dpm++ 2m karras", {}, "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, {}),
    "dpmpp_2m_sde": ("dpmpp_2m_sde", {}, "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, {}),
    "dpmpp_3m": ("dpmpp_2m", {"solver_order": 3}, "DPMSolverMultistepScheduler", {"solver_order": 3}, {}),
}
STOCHASTIC = {"ddim_eta", "euler_a", "dpmpp_2m_sde"}


# ------------------------------------------------------------------------------------------------ harness

def denoiser(x: np.ndarray, t) -> np.ndarray:
    """A deterministic stand-in for the UNet: eps = 0.1 x + sin(t / 100) cos(x)."""
    x = np.asarray(x, F32)
    return (F32(0.1) * x + F32(np.sin(float(t) / 100)) * np.cos(x)).astype(F32)


class TorchBackedGenerator:
    """randn(shape) from a torch CPU generator: the same stream diffusers sees, to check draw order and shapes."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def randn(self, shape):
        return torch.randn(tuple(shape), generator=self.g).numpy()


def model_config(prediction_type=None, spacing=None, **extra) -> dict:
    cfg = dict(SD15, **extra)
    if prediction_type is not None:
        cfg["prediction_type"] = prediction_type
    if spacing is not None:
        cfg["timestep_spacing"] = spacing
    return cfg


def diffusers_scheduler(class_name: str, cfg: dict, **overrides):
    base = diffusers.PNDMScheduler.from_config(cfg)  # as loaded from the model folder
    return getattr(diffusers, class_name).from_config(base.config, **overrides)


def rel_err(ours, theirs) -> float:
    ours = np.asarray(ours, np.float64)
    theirs = np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape
    return float(np.max(np.abs(ours - theirs)) / max(np.max(np.abs(theirs)), 1e-30))


def initial_noise(shape=(1, 4, 8, 8), seed=0) -> np.ndarray:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).numpy()


def run_side_by_side(ours, theirs, steps, our_gen=None, their_gen=None, step_kwargs=None, shape=(1, 4, 8, 8),
                     sigma_rtol=1e-6, timestep_atol=1e-5, rtol=RTOL):
    """Run both loops as StableDiffusionPipeline does; return the worst relative error seen."""
    step_kwargs = dict(step_kwargs or {})
    if "generator" in inspect.signature(theirs.step).parameters:  # as the pipeline's prepare_extra_step_kwargs
        step_kwargs["generator"] = their_gen
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    assert ours.timesteps.dtype == theirs.timesteps.numpy().dtype
    if ours.timesteps.dtype.kind == "i":
        np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy())
    else:  # Karras / exponential timesteps come from log(sigma), where torch's float32 sqrt may differ by 1 ulp
        np.testing.assert_allclose(ours.timesteps, theirs.timesteps.numpy(), rtol=1e-6, atol=timestep_atol)
    sig = getattr(theirs, "sigmas", None)
    if sig is not None:
        np.testing.assert_allclose(ours.sigmas, sig.numpy(), rtol=sigma_rtol)
    assert rel_err(ours.init_noise_sigma, float(theirs.init_noise_sigma)) < 1e-6

    noise = initial_noise(shape)
    lat_o = (noise * F32(ours.init_noise_sigma)).astype(F32)
    lat_t = torch.from_numpy(noise) * theirs.init_noise_sigma
    worst = rel_err(lat_o, lat_t.numpy())
    for i, (t_o, t_t) in enumerate(zip(ours.timesteps, theirs.timesteps)):
        x_o = ours.scale_model_input(np.concatenate([lat_o, lat_o]), t_o)[: shape[0]]
        x_t = theirs.scale_model_input(torch.cat([lat_t, lat_t]), t_t)[: shape[0]]
        assert x_o.dtype == np.float32
        worst = max(worst, rel_err(x_o, x_t.numpy()))
        eps_o = denoiser(x_o, t_o)
        eps_t = torch.from_numpy(denoiser(x_t.numpy(), t_t.item()))
        lat_o = ours.step(eps_o, t_o, lat_o, generator=our_gen)
        lat_t = theirs.step(eps_t, t_t, lat_t, **step_kwargs).prev_sample
        assert lat_o.dtype == np.float32 and lat_o.shape == shape
        err = rel_err(lat_o, lat_t.numpy())
        assert err < rtol, f"step {i} (t={t_o}): relative error {err:.3g}"
        worst = max(worst, err)
    assert np.isfinite(lat_o).all()
    return worst


def check_case(case, steps, prediction_type=None, spacing=None, seed=1234, sigma_rtol=1e-6, **extra_cfg):
    our_name, our_over, cls_name, their_over, step_kwargs = CASES[case]
    cfg = model_config(prediction_type, spacing, **extra_cfg)
    if case in STOCHASTIC:
        our_gen, their_gen = TorchBackedGenerator(seed), torch.Generator().manual_seed(seed)
    else:
        our_gen = their_gen = None
    ours = make_scheduler(our_name, cfg, **our_over)
    theirs = diffusers_scheduler(cls_name, cfg, **their_over)
    assert type(ours).__name__ == type(theirs).__name__
    return run_side_by_side(ours, theirs, steps, our_gen, their_gen, step_kwargs, sigma_rtol=sigma_rtol)


# ------------------------------------------------------------------------------------------------ side by side

@pytest.mark.parametrize("steps", [4, 20, 50])
@pytest.mark.parametrize("spacing", [None, "leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_diffusers(case, prediction_type, spacing, steps):
    check_case(case, steps, prediction_type, spacing)


@pytest.mark.parametrize("case", ["ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras"])
def test_zero_terminal_snr_trailing(case):
    # the SD 2.x "fixed" recipe: v-prediction, zero terminal SNR, trailing timesteps. The rescale takes square roots
    # of alphas_cumprod, where torch's float32 sqrt may be 1 ulp off, so the sigmas agree a little less closely.
    check_case(case, 20, "v_prediction", "trailing", sigma_rtol=1e-5, rescale_betas_zero_snr=True)


@pytest.mark.parametrize("case,schedule", [
    (case, schedule)
    for case in ["pndm", "ddim", "euler_karras", "dpmpp_2m", "dpmpp_2m_karras", "euler_a"]
    for schedule in ["linear", "squaredcos_cap_v2"]
    # diffusers itself runs off the end of its sigmas there: Karras timesteps of the cosine schedule repeat 998
    if (case, schedule) != ("dpmpp_2m_karras", "squaredcos_cap_v2")
])
def test_other_beta_schedules(case, schedule):
    check_case(case, 20, beta_schedule=schedule, beta_start=0.0001, beta_end=0.02)


@pytest.mark.parametrize("case", ["ddim", "dpmpp_2m"])
def test_sample_prediction(case):
    check_case(case, 20, "sample")


def test_dpm_variants():
    cfg = model_config()
    for over in ({"solver_type": "heun"}, {"solver_order": 3, "algorithm_type": "sde-dpmsolver++"},
                 {"use_exponential_sigmas": True}, {"use_lu_lambdas": True}, {"euler_at_final": True},
                 {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},
                 {"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min"},
                 {"lower_order_final": False, "final_sigmas_type": "sigma_min"},
                 {"lambda_min_clipped": -5.1, "final_sigmas_type": "sigma_min"}):
        for steps in (8, 25):
            ours = make_scheduler("dpmpp_2m", cfg, **over)
            theirs = diffusers_scheduler("DPMSolverMultistepScheduler", cfg, **over)
            run_side_by_side(ours, theirs, steps, TorchBackedGenerator(5), torch.Generator().manual_seed(5))


def test_euler_variants():
    cfg = model_config()
    for over in ({"use_exponential_sigmas": True}, {"final_sigmas_type": "sigma_min"},
                 {"interpolation_type": "log_linear"}):
        ours = make_scheduler("euler", cfg, **over)
        theirs = diffusers_scheduler("EulerDiscreteScheduler", cfg, **over)
        run_side_by_side(ours, theirs, 15)
    cfg_v = model_config("v_prediction")
    ours = make_scheduler("euler", cfg_v, timestep_type="continuous")
    theirs = diffusers_scheduler("EulerDiscreteScheduler", cfg_v, timestep_type="continuous")
    run_side_by_side(ours, theirs, 15)
    # "churn": fresh noise inside the Euler step
    cfg_s = {"s_churn": 0.8, "s_tmin": 0.5, "s_tmax": 10.0}
    ours, theirs = make_scheduler("euler", cfg), diffusers_scheduler("EulerDiscreteScheduler", cfg)
    step = ours.step
    ours.step = lambda *a, **k: step(*a, **k, **cfg_s)
    run_side_by_side(ours, theirs, 12, TorchBackedGenerator(3), torch.Generator().manual_seed(3), cfg_s)


def test_batch_with_generator_list():
    """A list of generators draws one (1, ...) slice per batch item, like diffusers' randn_tensor."""
    cfg = model_config()
    ours, theirs = make_scheduler("euler_a", cfg), diffusers_scheduler("EulerAncestralDiscreteScheduler", cfg)
    our_gens = [TorchBackedGenerator(s) for s in (7, 8)]
    their_gens = [torch.Generator().manual_seed(s) for s in (7, 8)]
    run_side_by_side(ours, theirs, 10, our_gens, their_gens, shape=(2, 4, 8, 8))


@pytest.mark.parametrize("case", sorted(STOCHASTIC))
def test_stochastic_with_sdgen_rng(case):
    rng = pytest.importorskip("sdgen.rng")
    our_name, our_over, cls_name, their_over, step_kwargs = CASES[case]
    cfg = model_config()
    for steps, seed in ((4, 0), (20, 42)):
        ours = make_scheduler(our_name, cfg, **our_over)
        theirs = diffusers_scheduler(cls_name, cfg, **their_over)
        run_side_by_side(ours, theirs, steps, rng.TorchGenerator(seed), torch.Generator().manual_seed(seed),
                         step_kwargs)


# ------------------------------------------------------------------------------------------------ pieces

@pytest.mark.parametrize("start,end,n", [(0.00085 ** 0.5, 0.012 ** 0.5, 1000), (0.0001, 0.02, 1000), (0.1, 0.7, 17),
                                         (-3.0, 5.5, 4001), (1.0, 1.0, 3), (2.0, 3.0, 1)])
def test_torch_linspace_exact(start, end, n):
    expected = torch.linspace(start, end, n, dtype=torch.float32).numpy()
    np.testing.assert_array_equal(S.torch_linspace_f32(start, end, n), expected)


@pytest.mark.parametrize("cfg", [
    SD15,
    dict(SD15, beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    dict(SD15, beta_schedule="squaredcos_cap_v2"),
    dict(SD15, rescale_betas_zero_snr=True),
])
def test_alphas_cumprod_exact(cfg):
    theirs = diffusers_scheduler("DDIMScheduler", cfg)
    ours = make_scheduler("ddim", cfg)
    if cfg.get("rescale_betas_zero_snr"):
        # goes through torch's float32 sqrt, which may differ by 1 ulp; the betas (1 - ratio of nearly equal
        # numbers) magnify that, the alphas_cumprod do not
        np.testing.assert_allclose(ours.alphas_cumprod, theirs.alphas_cumprod.numpy(), rtol=1e-5)
    else:  # bit for bit
        np.testing.assert_array_equal(ours.betas, theirs.betas.numpy())
        np.testing.assert_array_equal(ours.alphas_cumprod, theirs.alphas_cumprod.numpy())


@pytest.mark.parametrize("case", ["pndm", "ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras"])
def test_add_noise(case):
    our_name, our_over, cls_name, their_over, _ = CASES[case]
    ours = make_scheduler(our_name, SD15, **our_over)
    theirs = diffusers_scheduler(cls_name, SD15, **their_over)
    ours.set_timesteps(30)
    theirs.set_timesteps(30)
    x0 = initial_noise((2, 4, 8, 8), 1)
    noise = initial_noise((2, 4, 8, 8), 2)
    t = theirs.timesteps[[3, 17]]
    expected = theirs.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), t).numpy()
    got = ours.add_noise(x0, noise, t.numpy())
    assert got.dtype == np.float32
    assert rel_err(got, expected) < 1e-6


# ------------------------------------------------------------------------------------------------ names, config

def test_default_is_the_config_class():
    s = make_scheduler(None, SD15)
    assert type(s).__name__ == "PNDMScheduler"
    assert s.config["skip_prk_steps"] is True and s.config["steps_offset"] == 1
    with pytest.raises(UsageError):
        make_scheduler(None, dict(SD15, _class_name="DPMSolverSDEScheduler"))


@pytest.mark.parametrize("name,cls,key,value", [
    ("PNDM", "PNDMScheduler", None, None),
    ("plms", "PNDMScheduler", None, None),
    ("ddim", "DDIMScheduler", None, None),
    ("Euler", "EulerDiscreteScheduler", "use_karras_sigmas", False),
    ("euler_karras", "EulerDiscreteScheduler", "use_karras_sigmas", True),
    ("euler_a", "EulerAncestralDiscreteScheduler", None, None),
    ("Euler Ancestral", "EulerAncestralDiscreteScheduler", None, None),
    ("euler-ancestral", "EulerAncestralDiscreteScheduler", None, None),
    ("DPM++ 2M", "DPMSolverMultistepScheduler", "use_karras_sigmas", False),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", "algorithm_type", "dpmsolver++"),
    ("dpmsolver++", "DPMSolverMultistepScheduler", "solver_order", 2),
    ("DPMSolverMultistepScheduler", "DPMSolverMultistepScheduler", None, None),
    ("dpm++ 2m karras", "DPMSolverMultistepScheduler", "use_karras_sigmas", True),
    ("DPM++ 2M SDE", "DPMSolverMultistepScheduler", "algorithm_type", "sde-dpmsolver++"),
])
def test_names_and_aliases(name, cls, key, value):
    s = make_scheduler(name, SD15)
    assert type(s).__name__ == cls
    if key is not None:
        assert s.config[key] == value


def test_from_config_semantics():
    # keys the target does not know are ignored; keys the model config only had as defaults are not shared
    loaded = dict(diffusers.PNDMScheduler.from_config(SD15).config)
    assert "timestep_spacing" in loaded["_use_default_values"]
    for name, cls in (("euler", "EulerDiscreteScheduler"), ("dpmpp_2m", "DPMSolverMultistepScheduler"),
                      ("ddim", "DDIMScheduler")):
        ours = make_scheduler(name, loaded)
        theirs = getattr(diffusers, cls).from_config(loaded)
        for k, v in ours.config.items():
            if k != "eta":
                assert theirs.config[k] == v, k
    # explicit keys are shared, overrides win
    s = make_scheduler("euler", dict(SD15, timestep_spacing="trailing", prediction_type="v_prediction"))
    assert s.config["timestep_spacing"] == "trailing" and s.config["prediction_type"] == "v_prediction"
    s = make_scheduler("euler", SD15, timestep_spacing="leading")
    assert s.config["timestep_spacing"] == "leading"
    with pytest.raises(UsageError):
        make_scheduler("euler", SD15, not_an_option=1)


def test_unknown_name_suggests():
    with pytest.raises(UsageError) as e:
        make_scheduler("eulr a", SD15)
    msg = str(e.value)
    assert "euler_a" in msg and "\n" not in msg
    with pytest.raises(UsageError) as e:
        make_scheduler("dpm++ 2m karas", SD15)
    assert "dpmpp_2m_karras" in str(e.value)


def test_scheduler_names():
    names = scheduler_names()
    assert {"pndm", "ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras"} <= {n for n, _, _ in names}
    for name, aliases, desc in names:
        assert isinstance(aliases, list) and desc and "\n" not in desc
        for n in [name, *aliases]:
            make_scheduler(n, SD15)


def test_bad_values():
    for over in ({"timestep_spacing": "sideways"}, {"prediction_type": "flow"}, {"beta_schedule": "quadratic"}):
        with pytest.raises(UsageError):
            make_scheduler("euler", SD15, **over)
    s = make_scheduler("ddim", SD15)
    with pytest.raises(UsageError):
        s.set_timesteps(0)
