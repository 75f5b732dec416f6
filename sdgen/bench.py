"""`sdgen bench`: time each stage of a generation (load, text encoding, UNet steps, VAE decode) and peak memory.

A registry name whose weights are not on this machine can be benchmarked with random weights of the real
architecture (configs shipped in sdgen/data/configs): the same compute cost, clearly marked as "random".
"""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import kernel_compiles, registry, relaid_cache
from .errors import ModelNotFoundError, UsageError

CONFIGS = Path(__file__).resolve().parent / "data" / "configs"
# registry family -> the architecture config used when only the family is known
_FAMILY_CONFIGS = {"sd1": "sd15", "sd2": "sd21-base", "sdxl": "sdxl"}


@dataclass
class BenchResult:
    model: str
    family: str
    width: int
    height: int
    steps: int
    batch: int
    guidance: float
    threads: int
    weights: str            # "file" or "random"
    load_s: float
    text_encode_s: float
    unet_step_s: float      # mean per step, first step excluded when there are several
    first_step_s: float
    vae_decode_s: float
    total_s: float
    peak_rss_mb: float
    weights_dtype: str = "auto"
    vae_tiling: bool = False
    attention_slicing: str | None = None
    conv_filters: str = "make"
    linear_panels: bool = False  # linear layers were packed in panels for the run (--linear-panels on; auto
    # packs each chunk of the weights for its use only)
    relaid_cached: int = 0      # convolutions whose re-laid weights came from sdgen.relaid_cache's files
    relaid_made: int = 0        # ... and those re-laid in this run (0 and 0: the cache is off or not used)
    estimate_mb: float = 0.0    # sdgen.memory's estimate of the peak, for comparison with peak_rss_mb
    stages: str = "txt2img"     # "txt2img", or "decode" (VAE decode of random latents only)
    compile_s: float = 0.0      # of total_s: Numba compiling kernels (a first run; 0 when all came from its cache)
    compiled_kernels: int = 0   # functions it compiled (sdgen.kernel_compiles)
    unet_steps_s: list = field(default_factory=list)  # each UNet evaluation's time, in order: one per step (PNDM
    # one more, as diffusers' runs); unet_step_s is their mean after the first, first_step_s the first


def architecture_dir(name: str, spec: registry.ModelSpec | None) -> Path:
    """The shipped config folder for a registry model (by name, else by family)."""
    for candidate in (name, {"sd14": "sd15"}.get(name)):
        if candidate and (CONFIGS / candidate / "model_index.json").exists():
            return CONFIGS / candidate
    if spec is not None and spec.family in _FAMILY_CONFIGS:
        return CONFIGS / _FAMILY_CONFIGS[spec.family]
    known = ", ".join(sorted(p.name for p in CONFIGS.iterdir()))
    raise UsageError(f"no architecture config for {name!r}; known: {known}")


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB: /proc/self/status's VmHWM where there is one. Not getrusage's
    ru_maxrss, which Linux carries over an exec from the parent process: a bench started by a script that had just
    built a 14 GB model reported the script's peak as its own."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def run(model: str, width: int | None = None, height: int | None = None, steps: int | None = None, batch: int = 1,
        guidance: float | None = None, threads: int | None = None, random_weights: bool = False,
        scheduler: str | None = None, seed: int = 0, on_step=None, weights_dtype: str | None = None,
        vae_tiling: bool | None = None, attention_slicing: str | None = None, decode_only: bool = False,
        memory_check: bool = True, conv_filters: str = "make", linear_panels: str | None = None) -> BenchResult:
    """One run as the CLI makes it (one batch: one-shot, each model built when needed and released when done),
    timed by stage; peak_rss_mb is the whole process's. decode_only: only the VAE decode of random latents of
    the size (the VAE alone in memory)."""
    import dataclasses

    import numpy as np

    from . import memory
    from .models.layers import linear_layers_packed, set_attention_slicing, set_conv_filters, set_linear_panels
    from .pipeline import Pipeline, open_model
    from .threads import set_threads

    threads = set_threads(threads)
    packed_before = linear_layers_packed()
    relaid_before = dict(relaid_cache.TOTALS)
    kernel_compiles.watch()
    compiles_before = dict(kernel_compiles.TOTALS)
    t_start = time.perf_counter()
    spec = registry.get_spec(model)
    if random_weights:
        path, weights = architecture_dir(model, spec), "random"
    else:
        try:
            spec, path = registry.resolve_model(model)
        except ModelNotFoundError as e:
            raise ModelNotFoundError(f"{e} -- or benchmark its architecture with --random-weights") from None
        weights = "file"
    set_attention_slicing(memory.attention_slicing(attention_slicing))
    set_conv_filters(conv_filters)
    set_linear_panels(linear_panels)
    steps = steps if steps is not None else (spec.steps if spec else 20)
    guidance = guidance if guidance is not None else (spec.guidance if spec else 7.5)
    scheduler = scheduler or (spec.scheduler if spec else None)
    guided = guidance > 1.0
    rw = 0 if random_weights else None
    src = open_model(Path(path), random_weights=rw)
    vae_cfg = src.components["vae"][0]
    unet_cfg = src.components["unet"][0]
    default = (unet_cfg.get("sample_size") or 64) * 2 ** (len(vae_cfg.get("block_out_channels", [0] * 4)) - 1)
    width = width or (spec.width if spec and spec.width else default)
    height = height or (spec.height if spec and spec.height else default)
    est = memory.estimate({k: c for k, (c, _) in src.components.items()}, src.family, width, height, batch, guided,
                          weights_dtype or "auto", None, True, vae_tiling, conv_filters=conv_filters)
    if decode_only:  # the VAE alone
        est = memory.Estimate(est.stages["decoding"], {"decoding": est.stages["decoding"]},
                              {"vae": est.weights["vae"]}, est.vae_tiled)
    if memory_check:
        memory.check(est, None, weights_dtype or "auto", batch)
    del src
    pipe = Pipeline.load(path, name=spec.name if spec else None, random_weights=rw, weights_dtype=weights_dtype,
                         one_shot=True)
    pipe.vae_tiling = vae_tiling
    pipe.check_request(steps, width, height)
    if decode_only:
        scale = pipe.vae_scale_factor
        z = np.random.default_rng(seed).standard_normal((batch, pipe.vae.cfg.latent_channels, height // scale,
                                                          width // scale), dtype=np.float32)
        pipe.decode(z * np.float32(pipe.vae.cfg.scaling_factor))
    else:
        cond = pipe.encode_prompt(["a photograph of an astronaut riding a horse"] * batch, [None] * batch, guided)
        latents = None
        for latents in pipe.generate_latents(cond, [seed + i for i in range(batch)], steps, guidance, width, height,
                                             scheduler):
            if on_step is not None:
                on_step()
        pipe.decode(latents)
    total = time.perf_counter() - t_start
    compile_s, compiled = kernel_compiles.since(compiles_before)
    t = pipe.timings
    per_step = (t.unet_steps_s[1:] if len(t.unet_steps_s) > 1 else t.unet_steps_s) or [0.0]
    tiled = vae_tiling if vae_tiling is not None else memory.auto_vae_tiling(dataclasses.asdict(pipe.vae.cfg),
                                                                              height, width)
    return BenchResult(
        model=model, family=(spec.family if spec else pipe.family), width=width, height=height, steps=steps,
        batch=batch, guidance=guidance, threads=threads, weights=weights, load_s=round(t.load_s, 3),
        text_encode_s=round(t.text_encode_s, 3), unet_step_s=round(sum(per_step) / len(per_step), 3),
        first_step_s=round((t.unet_steps_s or [0.0])[0], 3), vae_decode_s=round(t.vae_decode_s, 3),
        total_s=round(total, 3), peak_rss_mb=round(peak_rss_mb(), 1), weights_dtype=weights_dtype or "auto",
        vae_tiling=bool(tiled), attention_slicing=attention_slicing, conv_filters=conv_filters,
        linear_panels=linear_layers_packed() > packed_before,
        relaid_cached=relaid_cache.TOTALS["hits"] - relaid_before["hits"],
        relaid_made=relaid_cache.TOTALS["made"] - relaid_before["made"],
        estimate_mb=round(est.peak / 2**20, 1), stages="decode" if decode_only else "txt2img",
        compile_s=round(compile_s, 3), compiled_kernels=compiled,
        unet_steps_s=[round(x, 3) for x in t.unet_steps_s],
    )


def as_dict(result: BenchResult) -> dict:
    return asdict(result)


# (channels in = out, height, width, batch): the 3x3 convolutions SD spends its time in (UNet at 64x64 latents with
# guidance, VAE decoder up to 512x512)
SD_CONV_SHAPES = [(320, 64, 64, 2), (640, 32, 32, 2), (1280, 16, 16, 2), (1280, 8, 8, 2), (512, 64, 64, 1),
                  (512, 128, 128, 1), (256, 256, 256, 1), (128, 512, 512, 1)]


def conv_case(rng, c: int, h: int, w: int, n: int):
    """The input (n, h, w, c), weight (c, c, 3, 3) and bias of one `kernels` shape, drawn from rng in that order."""
    import numpy as np

    x = rng.standard_normal((n, h, w, c), dtype=np.float32)
    weight = rng.standard_normal((c, c, 3, 3), dtype=np.float32) / np.float32(np.sqrt(9 * c))
    bias = rng.standard_normal(c, dtype=np.float32)
    return x, weight, bias


def conv_plans(weight, bias) -> dict:
    """The plans `kernels` times for one weight: "model", the models' own (models.layers.Conv2d: weights held as
    the models hold them, each path's Winograd filters made at each call); each path forced in such a plan ("f43",
    ...); each Winograd path with its filters transformed once and kept ("f43_kept", ...)."""
    from .kernels import conv
    from .models.layers import Conv2d, Params

    c = weight.shape[0]
    plans = {"model": Conv2d(Params({"weight": weight, "bias": bias}), c, c).plan}
    for variant in ("im2col", "f23", "f43", "f63"):
        plans[variant] = conv.Conv2dPlan(weight, bias, 1, 1, cache=False, variant=variant)
    for variant in ("f23", "f43", "f63"):
        plans[f"{variant}_kept"] = conv.Conv2dPlan(weight, bias, 1, 1, variant=variant)
    return plans


def kernels(threads: int | None = None, shapes=None, repeat: int = 2) -> list[dict]:
    """Time the 3x3 convolutions SD spends its time in (`shapes`: (channels, height, width, batch), default
    SD_CONV_SHAPES), plan by plan (conv_plans), in ms: the least of `repeat` calls, each after an untimed one.
    A row: the shape, `chosen` (the path the models take there), `model_ms`, `{path}_ms` (filters made at each
    call), `{path}_kept_ms` (filters kept), and `max_rel_diff`: the largest relative difference (2-norm) of any
    plan's output from the models' plan's (every plan computes the same convolution, rounding apart)."""
    import numpy as np

    from .kernels import conv
    from .threads import set_threads

    set_threads(threads)
    rng = np.random.default_rng(0)
    rows = []
    for c, h, w, n in SD_CONV_SHAPES if shapes is None else shapes:
        x, weight, bias = conv_case(rng, c, h, w, n)
        plans = conv_plans(weight, bias)
        row = {"channels": c, "size": f"{h}x{w}", "batch": n, "chosen": plans["model"].variant_for(h, w, n)}
        ref = None  # the models' plan's output (plans' first), which every other output is compared with
        diff = 0.0  # the largest 2-norm difference from ref: each output compared as made, not kept
        for name, plan in plans.items():
            best = float("inf")
            for r in range(repeat):
                y = conv.conv2d(x, plan)  # untimed: wakes the workers, as the layer before would in a model
                if r == 0 and ref is None:
                    ref = y
                elif r == 0:
                    diff = max(diff, float(np.linalg.norm(y - ref)))
                y = None
                t0 = time.perf_counter()
                conv.conv2d(x, plan)
                best = min(best, time.perf_counter() - t0)
            row[f"{name}_ms"] = round(1000 * best, 3)
        diff /= float(np.linalg.norm(ref)) or 1.0
        row["max_rel_diff"] = float(f"{diff:.2g}")
        rows.append(row)
    return rows
