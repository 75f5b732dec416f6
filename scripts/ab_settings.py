"""Two sdgen settings side by side in one process: UNet forwards (or VAE decodes) alternating between them.

For changes that move a forward's time by a few percent on a machine whose speed changes from minute to minute:
both settings run in the same process, one right after the other, the order alternating each round; printed are
each side's times, their medians (the first round left out: it includes Numba's cache loads and first-touch
memory) and the ratio b / a. The model is the random-weight folder of scripts/bench_vs_diffusers.py (built there,
or here if missing; diffusers is needed only then).

    python scripts/ab_settings.py --model sdxl-turbo --linear-panels off,auto
    python scripts/ab_settings.py --model sd15 --weights-dtype fp32,fp16 --rounds 7
    python scripts/ab_settings.py --model sd15 --weights-dtype fp32,fp16 --what vae
    python scripts/ab_settings.py --model sd15 --conv-filters make,keep --rounds 7

--linear-panels A,B: one model, the setting switched before each forward (`on` packs its layers for good at the
first forward, so it gets a model of its own). --weights-dtype A,B and --conv-filters A,B: two models, one per
value (keep makes its filters in the first forward, which the medians leave out).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def step_inputs(pipe, size: int) -> tuple:
    """(latents, contexts, SDXL's extra inputs) of a forward as a guided step's (SD 1.x/2.x: the latents once, two
    contexts; SDXL: batch 1); the latents are also what a VAE decode takes."""
    rng = np.random.default_rng(0)
    xl = pipe.family == "sdxl"
    lat = size // 8
    x = rng.standard_normal((1, 4, lat, lat), dtype=np.float32)
    ctx = rng.standard_normal((1 if xl else 2, 77, pipe.unet.cfg.cross_attention_dim), dtype=np.float32)
    extra = {}
    if xl:
        extra = {"text_embeds": rng.standard_normal((1, 1280), dtype=np.float32),
                 "time_ids": np.array([[size, size, 0, 0, size, size]], np.float32)}
    return x, ctx, extra


def run_step(pipe, what: str, inputs: tuple):
    """One UNet forward (what "unet") or VAE decode ("vae") of step_inputs' inputs."""
    x, ctx, extra = inputs
    if what == "vae":
        return pipe.vae.decode(x)
    pipe.unet.forget_context()  # the cross-attention keys made again at each forward
    return pipe.unet(x, 500, ctx, **extra)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="sd15", help="an architecture in sdgen/data/configs (sd15, sdxl-turbo, ...)")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--what", choices=["unet", "vae"], default="unet",
                    help="unet: a forward as a guided step's (SD 1.x/2.x: the latents once, two contexts; SDXL: "
                         "batch 1); vae: a decode")
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--linear-panels", help="two --linear-panels values, a,b")
    group.add_argument("--weights-dtype", help="two --weights-dtype values, a,b")
    group.add_argument("--conv-filters", help="two --conv-filters values, a,b")
    ap.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "sdgen" / "random-models")
    args = ap.parse_args()

    sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "tests"), str(ROOT)]
    from compare_full_size import build_random_model

    from sdgen.memory import fresh_memory_settings
    from sdgen.models.layers import set_conv_filters, set_linear_panels
    from sdgen.pipeline import Pipeline
    from sdgen.threads import set_threads

    folder = build_random_model(args.model, args.workdir / args.model)
    fresh_memory_settings()  # as the sdgen command does
    set_threads(args.threads)
    values = (args.linear_panels or args.weights_dtype or args.conv_filters).split(",")
    if len(values) != 2:
        ap.error("two values, comma separated")
    if args.weights_dtype:
        sides = {v: (Pipeline.load(folder, weights_dtype=v), "auto") for v in values}
    elif args.conv_filters:
        sides = {}
        for v in values:
            set_conv_filters(v)  # for the models built from now on
            sides[v] = (Pipeline.load(folder), "auto")
        set_conv_filters(None)
    else:
        shared = Pipeline.load(folder)
        sides = {v: (Pipeline.load(folder) if v == "on" else shared, v) for v in values}

    inputs = step_inputs(next(iter(sides.values()))[0], args.size)
    times = {v: [] for v in values}
    for r in range(args.rounds):
        for v in (values if r % 2 == 0 else values[::-1]):
            pipe, mode = sides[v]
            set_linear_panels(mode)
            t0 = time.perf_counter()
            run_step(pipe, args.what, inputs)
            times[v].append(time.perf_counter() - t0)
    set_linear_panels(None)
    med = {v: float(np.median(times[v][1:] if len(times[v]) > 1 else times[v])) for v in values}
    what = ("--linear-panels" if args.linear_panels else "--weights-dtype" if args.weights_dtype
            else "--conv-filters")
    print(f"{args.model} (random weights), {args.size}x{args.size}, {args.what}, {args.threads} threads; command: "
          f"python scripts/ab_settings.py --model {args.model} --size {args.size} --what {args.what} {what} "
          f"{','.join(values)} --rounds {args.rounds}")
    for v in values:
        print(f"{v:>6}: " + " ".join(f"{t:6.2f}" for t in times[v]) + f"   median of rounds 2-: {med[v]:.3f} s")
    print(f"{values[1]} / {values[0]}: {med[values[1]] / med[values[0]]:.3f}")


if __name__ == "__main__":
    main()
