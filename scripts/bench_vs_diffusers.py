"""sdgen against diffusers on PyTorch, side by side in one run: same model, same threads, same work.

The model is the real architecture with random weights, built by diffusers and saved as a diffusers folder (shared
with scripts/compare_full_size.py; cached under --workdir), loaded by both. Prints each timing and the ratio
sdgen / diffusers (below 1 means sdgen is faster), plus peak memory of each side measured in its own subprocess.

    python scripts/bench_vs_diffusers.py --model sd15 --what unet,vae,txt2img --threads 2
    python scripts/bench_vs_diffusers.py --model sdxl --what unet --threads 2

Goals (issue #5): SD1.5 UNet forward (batch 2) <= 0.55, SDXL UNet forward (batch 1) <= 0.6, VAE decode <= 0.35,
whole SD1.5 512x512 20-step DPM++ 2M txt2img <= 0.55. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def run_side(side: str, args) -> dict:
    """One implementation's timings, in this process (called in a subprocess per side, so peak RSS is its own)."""
    import resource

    folder = Path(args.folder)
    lat = args.size // 8
    rng = np.random.default_rng(0)
    index = json.loads((folder / "model_index.json").read_text())
    xl = "text_encoder_2" in index
    batch = 1 if xl else 2
    unet_x = rng.standard_normal((batch, 4, lat, lat), dtype=np.float32)
    ctx_dim = 2048 if xl else json.loads((folder / "unet" / "config.json").read_text())["cross_attention_dim"]
    ctx = rng.standard_normal((batch, 77, ctx_dim), dtype=np.float32)
    extra_np = {}
    if xl:
        extra_np = {"text_embeds": rng.standard_normal((batch, 1280), dtype=np.float32),
                    "time_ids": np.tile(np.array([args.size, args.size, 0, 0, args.size, args.size], np.float32),
                                        (batch, 1))}
    z = rng.standard_normal((1, 4, lat, lat), dtype=np.float32)
    out = {}
    t0 = time.perf_counter()
    if side == "diffusers":
        import torch
        import diffusers

        torch.set_num_threads(args.threads)
        pipe = diffusers.DiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        out["load_s"] = time.perf_counter() - t0
        extra = {"added_cond_kwargs": {k: torch.from_numpy(v) for k, v in extra_np.items()}} if xl else {}
        with torch.no_grad():
            if "unet" in args.what:
                out["unet_s"] = best_of(lambda: pipe.unet(torch.from_numpy(unet_x), torch.tensor(500),
                                                          encoder_hidden_states=torch.from_numpy(ctx), **extra),
                                        args.repeat)
            if "vae" in args.what:
                out["vae_s"] = best_of(lambda: pipe.vae.decode(torch.from_numpy(z)), args.repeat)
        if "txt2img" in args.what:
            pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
            t0 = time.perf_counter()
            pipe("portrait photo of a old warrior chief", num_inference_steps=args.steps, guidance_scale=7.5,
                 width=args.size, height=args.size, generator=torch.Generator().manual_seed(0), output_type="np")
            out["txt2img_s"] = time.perf_counter() - t0 + out["load_s"]
    else:
        from sdgen.pipeline import Pipeline
        from sdgen.threads import set_threads

        set_threads(args.threads)
        pipe = Pipeline.load(folder)
        out["load_s"] = time.perf_counter() - t0
        if "unet" in args.what:
            out["unet_s"] = best_of(lambda: pipe.unet(unet_x, 500, ctx, **extra_np), args.repeat)
        if "vae" in args.what:
            out["vae_s"] = best_of(lambda: pipe.vae.decode(z), args.repeat)
        if "txt2img" in args.what:
            t0 = time.perf_counter()
            pipe.txt2img("portrait photo of a old warrior chief", seed=0, steps=args.steps, guidance=7.5,
                         width=args.size, height=args.size, scheduler="dpm++ 2m")
            out["txt2img_s"] = time.perf_counter() - t0 + out["load_s"]
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sd15", help="an architecture in sdgen/data/configs (sd15, sd21-base, sdxl, ...)")
    ap.add_argument("--size", type=int, default=None, help="image size (default: 512, sdxl 1024 -> 64/128 latents)")
    ap.add_argument("--what", default="unet,vae,txt2img")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "sdgen" / "random-models")
    ap.add_argument("--side", choices=["diffusers", "sdgen"], help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.what = args.what.split(",")
    if args.size is None:
        args.size = 1024 if args.model.startswith("sdxl") and args.model != "sdxl-turbo" else 512
    if args.side:
        print(json.dumps(run_side(args.side, args)))
        return

    from compare_full_size import build_random_model

    folder = build_random_model(args.model, args.workdir / args.model)
    results = {}
    for side in ("diffusers", "sdgen"):
        cmd = [sys.executable, __file__, "--side", side, "--folder", str(folder), "--model", args.model,
               "--size", str(args.size), "--what", ",".join(args.what), "--steps", str(args.steps),
               "--threads", str(args.threads), "--repeat", str(args.repeat)]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            sys.exit(f"{side} run failed:\n{proc.stderr[-3000:]}")
        results[side] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{args.model} (random weights), {args.size}x{args.size}, {args.threads} threads; "
          f"command: python scripts/bench_vs_diffusers.py --model {args.model} --what {','.join(args.what)} "
          f"--threads {args.threads}")
    print(f"{'':14s} {'diffusers':>10s} {'sdgen':>10s} {'ratio':>7s}")
    for key in ("load_s", "unet_s", "vae_s", "txt2img_s", "peak_rss_mb"):
        if key in results["diffusers"] and key in results["sdgen"]:
            d, s = results["diffusers"][key], results["sdgen"][key]
            print(f"{key:14s} {d:10.2f} {s:10.2f} {s / d:7.3f}")


if __name__ == "__main__":
    main()
