"""sdgen against diffusers on PyTorch, side by side in one run: same model, same threads, same work.

The model is the real architecture with random weights, built by diffusers and saved as a diffusers folder (shared
with scripts/compare_full_size.py; cached under --workdir), loaded by both. Prints each timing and the ratio
sdgen / diffusers (below 1 means sdgen is faster), plus peak memory of each side measured in its own subprocess.

    python scripts/bench_vs_diffusers.py --model sd15 --what unet,vae,txt2img --threads 2
    python scripts/bench_vs_diffusers.py --model sdxl --what unet --threads 2
    python scripts/bench_vs_diffusers.py --model sdxl-turbo --what unet --weights-dtype fp16

--weights-dtype fp16 holds sdgen's weights at fp16, as when its files are fp16 (the usual SDXL and turbo
checkpoints); diffusers stays fp32, as it loads fp16 files unless told a torch_dtype.

--what unet: one UNet forward on a batch of 2 different latents (SDXL: 1); unet_guided: the forward each side's
pipeline makes at a step with guidance (SD 1.x/2.x: batch 2 of the same latents with two contexts; sdgen passes the
latents once and runs the layers before the first cross-attention once); unet_one: one latent and one context, the
forward of a step without guidance (the turbo models': `--model sd-turbo --what unet_one,vae`; SDXL's unet is that).
txt2img: --steps steps of DPM++ 2M at --guidance (default 7.5; `--steps 1 --guidance 0` as SD-Turbo runs).

Goals (issue #5): SD1.5 UNet forward (batch 2) <= 0.55, SDXL UNet forward (batch 1) <= 0.6, VAE decode <= 0.35,
whole SD1.5 512x512 20-step DPM++ 2M txt2img <= 0.55. Run it on an otherwise idle machine.

unet, unet_guided and vae are timed with both sides loaded at once, each in its own process, one right after the
other job by job (the order alternating), so that a machine whose speed changes from minute to minute (a shared
host: the same diffusers forward measured 12.3-18.0 s within an hour) favours neither side; not for SDXL, whose two
fp32 copies would not fit in 24 GB (--interleave). txt2img runs one process per side (the load included).
--rounds N repeats it all and reports each side's best and the range of the rounds' own ratios.

--memory: peak RSS of one whole run per side, each in its own process (issue #6): diffusers' pipeline on the random
folder (fp32, or --torch-dtype float16; --vae-tiling / --vae-slicing as its enable_* options) next to
`sdgen bench --random-weights` of the same architecture and run (--weights-dtype; --decode-only: only a VAE
decode of random latents of the size).

    python scripts/bench_vs_diffusers.py --model sd15 --memory --steps 2 --weights-dtype fp16
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

# as the user's shell had it: importing sdgen sets OMP_WAIT_POLICY=PASSIVE for its own process (sdgen/__init__.py);
# the diffusers side runs with PyTorch's OpenMP as it would without sdgen
_OMP_WAIT = os.environ.get("OMP_WAIT_POLICY")

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


def memory_side(side: str, args) -> dict:
    """One whole run in this process (a subprocess per side), its peak RSS."""
    t0 = time.perf_counter()
    if side == "diffusers":
        import torch
        import diffusers

        torch.set_num_threads(args.threads)
        dtype = getattr(torch, args.torch_dtype)
        pipe = diffusers.DiffusionPipeline.from_pretrained(args.folder, safety_checker=None,
                                                           requires_safety_checker=False, torch_dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        if args.vae_tiling:
            pipe.vae.enable_tiling()
        if args.vae_slicing:
            pipe.vae.enable_slicing()
        with torch.no_grad():
            if args.decode_only:
                lat = args.size // 8
                z = torch.randn((args.batch, 4, lat, lat), generator=torch.Generator().manual_seed(0), dtype=dtype)
                pipe.vae.decode(z)
            else:
                guidance = {} if args.guidance is None else {"guidance_scale": args.guidance}
                pipe(["a photograph of an astronaut riding a horse"] * args.batch, num_inference_steps=args.steps,
                     width=args.size, height=args.size, generator=torch.Generator().manual_seed(0),
                     output_type="np", **guidance)
        out = {"dtype": args.torch_dtype}
    else:
        cmd = [sys.executable, "-m", "sdgen.cli", "bench", "--model", args.model, "--random-weights", "--json",
               "--steps", str(args.steps), "--batch", str(args.batch), "--width", str(args.size),
               "--height", str(args.size), "--threads", str(args.threads), "--vae-tiling",
               "on" if args.vae_tiling else "auto"]
        if args.weights_dtype:
            cmd += ["--weights-dtype", args.weights_dtype]
        cmd += ["--conv-filters", args.conv_filters, "--linear-panels", args.linear_panels]
        if args.guidance is not None:
            cmd += ["--guidance", str(args.guidance)]
        if args.decode_only:
            cmd.append("--decode-only")
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            sys.exit(f"sdgen bench failed:\n{proc.stderr[-3000:]}")
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        out["command"] = " ".join(cmd[2:])
        return out
    out["total_s"] = time.perf_counter() - t0
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def load_side(side: str, args) -> tuple[float, dict]:
    """Load one implementation's pipeline in this process: (seconds, {timing name: a callable doing that work
    once}) for the names in args.what (txt2img: the whole run, after the load)."""
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
    guidance = 7.5 if args.guidance is None else args.guidance  # txt2img's
    jobs = {}
    t0 = time.perf_counter()
    if side == "diffusers":
        import torch
        import diffusers

        torch.set_num_threads(args.threads)
        pipe = diffusers.DiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        load_s = time.perf_counter() - t0
        extra = {"added_cond_kwargs": {k: torch.from_numpy(v) for k, v in extra_np.items()}} if xl else {}
        doubled = torch.from_numpy(np.concatenate([unet_x[:1]] * batch))

        def no_grad(fn):
            def run():
                with torch.no_grad():
                    return fn()
            return run

        jobs["unet_s"] = no_grad(lambda: pipe.unet(torch.from_numpy(unet_x), torch.tensor(500),
                                                   encoder_hidden_states=torch.from_numpy(ctx), **extra))
        jobs["unet_guided_s"] = no_grad(lambda: pipe.unet(doubled, torch.tensor(500),
                                                          encoder_hidden_states=torch.from_numpy(ctx), **extra))
        # one latent, one context (SDXL's extra is for one already)
        jobs["unet_one_s"] = no_grad(lambda: pipe.unet(torch.from_numpy(unet_x[:1]), torch.tensor(500),
                                                       encoder_hidden_states=torch.from_numpy(ctx[:1]), **extra))
        jobs["vae_s"] = no_grad(lambda: pipe.vae.decode(torch.from_numpy(z)))

        def txt2img():
            pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
            pipe("portrait photo of a old warrior chief", num_inference_steps=args.steps, guidance_scale=guidance,
                 width=args.size, height=args.size, generator=torch.Generator().manual_seed(0), output_type="np")
    else:
        from sdgen.memory import fresh_memory_settings
        from sdgen.models.layers import set_conv_filters, set_linear_panels
        from sdgen.pipeline import Pipeline
        from sdgen.threads import set_threads

        fresh_memory_settings()  # as the sdgen command does
        set_threads(args.threads)
        set_conv_filters(args.conv_filters)
        set_linear_panels(args.linear_panels)
        pipe = Pipeline.load(folder, weights_dtype=args.weights_dtype)
        load_s = time.perf_counter() - t0

        def forward():  # a whole forward: the cross-attention keys of ctx made again, as diffusers does
            pipe.unet.forget_context()
            return pipe.unet(unet_x, 500, ctx, **extra_np)

        def guided():  # the latents once, both contexts (Pipeline.generate_latents)
            pipe.unet.forget_context()
            return pipe.unet(unet_x[:1], 500, ctx, **extra_np)

        def one():  # one latent, one context: a step without guidance (SDXL's extra is for one already)
            pipe.unet.forget_context()
            return pipe.unet(unet_x[:1], 500, ctx[:1], **extra_np)

        jobs.update(unet_s=forward, unet_guided_s=guided, unet_one_s=one, vae_s=lambda: pipe.vae.decode(z))

        def txt2img():
            pipe.txt2img("portrait photo of a old warrior chief", seed=0, steps=args.steps, guidance=guidance,
                         width=args.size, height=args.size, scheduler="dpm++ 2m")
    jobs["txt2img_s"] = txt2img
    return load_s, {k: fn for k, fn in jobs.items() if k[:-2] in args.what}


def _peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM; not ru_maxrss, which Linux carries over an exec from the parent: this
    script's, when it built the random model in the same run). As sdgen.bench.peak_rss_mb, without importing sdgen
    on the diffusers side."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_side(side: str, args) -> dict:
    """One implementation's timings, in this process (called in a subprocess per side, so peak RSS is its own):
    the best of args.repeat of each, txt2img once (load included)."""
    load_s, jobs = load_side(side, args)
    out = {"load_s": load_s}
    for name, fn in jobs.items():
        if name == "txt2img_s":
            t0 = time.perf_counter()
            fn()
            out[name] = time.perf_counter() - t0 + load_s
        else:
            out[name] = best_of(fn, args.repeat)
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def serve_side(side: str, args) -> None:
    """Load, then time one job per line read from stdin (its name; "quit" ends), a JSON line each on stdout: the
    parent alternates the two sides job by job (interleaved mode)."""
    load_s, jobs = load_side(side, args)
    print(json.dumps({"load_s": load_s}), flush=True)
    for line in sys.stdin:
        name = line.strip()
        if name == "quit":
            break
        t0 = time.perf_counter()
        jobs[name]()
        print(json.dumps({name: time.perf_counter() - t0}), flush=True)
    print(json.dumps({"peak_rss_mb": _peak_rss_mb()}), flush=True)


class _Server:
    """A side's serve_side process."""

    def __init__(self, side: str, cmd: list[str], env: dict):
        import tempfile

        self.side = side
        self.err = tempfile.TemporaryFile(mode="w+")  # not a pipe: a chatty side would fill it and stall
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True,
                                     env=env)

    def reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.err.seek(0)
            sys.exit(f"{self.side} run failed:\n{self.err.read()[-3000:]}")
        return json.loads(line)

    def time(self, name: str) -> float:
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()
        return self.reply()[name]

    def close(self) -> dict:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        out = self.reply()
        self.proc.wait()
        return out


def _side_env(side: str, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if side == "diffusers" and _OMP_WAIT is None:
        env.pop("OMP_WAIT_POLICY", None)
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sd15",
                    help="an architecture in sdgen/data/configs (sd15, sd21-base, sdxl, ...)")
    ap.add_argument("--size", type=int, default=None, help="image size (default: 512, sdxl 1024 -> 64/128 latents)")
    ap.add_argument("--what", default="unet,vae,txt2img")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2, help="timings per side process (its best is kept)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat the measurement this many times, alternating which side goes first, and report "
                         "each side's best and the range of the rounds' ratios")
    ap.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "sdgen" / "random-models")
    ap.add_argument("--memory", action="store_true", help="peak RSS of one whole run per side (see above)")
    ap.add_argument("--batch", type=int, default=1, help="--memory: images per run")
    ap.add_argument("--weights-dtype", default=None,
                    help="sdgen's --weights-dtype (default: the folder's fp32); diffusers stays fp32, as it loads "
                         "fp16 files by default")
    ap.add_argument("--torch-dtype", default="float32", help="--memory: diffusers' torch_dtype")
    ap.add_argument("--vae-tiling", action="store_true", help="--memory: tiled VAE decode on both sides")
    ap.add_argument("--vae-slicing", action="store_true", help="--memory: diffusers' enable_slicing (sdgen: always)")
    ap.add_argument("--decode-only", action="store_true", help="--memory: only a VAE decode of random latents")
    ap.add_argument("--guidance", type=float, default=None,
                    help="guidance scale on both sides: txt2img's (default 7.5); --memory's (default: each side's "
                         "default for the model)")
    ap.add_argument("--sides", default="diffusers,sdgen", help="--memory: which sides to run")
    ap.add_argument("--conv-filters", default="make", choices=["make", "keep"], help="sdgen's --conv-filters")
    ap.add_argument("--linear-panels", default="auto", choices=["auto", "on", "off"],
                    help="sdgen's --linear-panels (on: the layers packed at the first forward, which the best of "
                         "--repeat leaves out)")
    ap.add_argument("--interleave", default="auto", choices=["auto", "on", "off"],
                    help="time unet/unet_guided/vae with both sides loaded at once, alternating job by job (auto: "
                         "not for SDXL, whose two fp32 copies would not fit in 24 GB); off: one process per side")
    ap.add_argument("--side", choices=["diffusers", "sdgen"], help=argparse.SUPPRESS)
    ap.add_argument("--serve", choices=["diffusers", "sdgen"], help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.what = args.what.split(",")
    if "unet_guided" in args.what and args.model.startswith("sdxl"):
        ap.error("--what unet_guided: SD 1.x/2.x only (SDXL's pooled text embeddings reach its first layer)")
    if args.size is None:
        args.size = 1024 if args.model.startswith("sdxl") and args.model != "sdxl-turbo" else 512
    if args.side:
        print(json.dumps(memory_side(args.side, args) if args.memory else run_side(args.side, args)))
        return
    if args.serve:
        serve_side(args.serve, args)
        return
    if args.memory:
        results = {}
        for side in args.sides.split(","):
            folder = ""
            if side == "diffusers":
                from compare_full_size import build_random_model
                folder = str(build_random_model(args.model, args.workdir / args.model))
            cmd = [sys.executable, __file__, "--memory", "--side", side, "--folder", folder, "--model", args.model,
                   "--size", str(args.size), "--steps", str(args.steps), "--threads", str(args.threads),
                   "--batch", str(args.batch), "--torch-dtype", args.torch_dtype]
            cmd += ["--weights-dtype", args.weights_dtype] if args.weights_dtype else []
            cmd += ["--conv-filters", args.conv_filters, "--linear-panels", args.linear_panels]
            cmd += ["--guidance", str(args.guidance)] if args.guidance is not None else []
            cmd += [f for f, on in (("--vae-tiling", args.vae_tiling), ("--vae-slicing", args.vae_slicing),
                                    ("--decode-only", args.decode_only)) if on]
            env = _side_env(side, args.threads)
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode:
                sys.exit(f"{side} run failed:\n{proc.stderr[-3000:]}")
            results[side] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{side:10s} peak RSS {results[side]['peak_rss_mb']:8.1f} MB  ({json.dumps(results[side])})",
                  flush=True)
        return

    from compare_full_size import build_random_model

    folder = build_random_model(args.model, args.workdir / args.model)
    keys = ("load_s", "unet_s", "unet_guided_s", "unet_one_s", "vae_s", "txt2img_s", "peak_rss_mb")

    def side_cmd(side: str, what: list[str], mode: str) -> list[str]:
        return [sys.executable, __file__, mode, side, "--folder", str(folder), "--model", args.model,
                "--size", str(args.size), "--what", ",".join(what), "--steps", str(args.steps),
                "--threads", str(args.threads), "--repeat", str(args.repeat), "--conv-filters", args.conv_filters,
                "--linear-panels", args.linear_panels] + (["--weights-dtype", args.weights_dtype] if args.weights_dtype
                                                         else []) + (["--guidance", str(args.guidance)]
                                                                     if args.guidance is not None else [])

    interleave = args.interleave == "on" or (args.interleave == "auto" and not args.model.startswith("sdxl"))
    step_what = [w for w in args.what if w != "txt2img"] if interleave else []
    rounds = [{"diffusers": {}, "sdgen": {}} for _ in range(args.rounds)]
    if step_what:
        # both sides loaded at once, each in its own process; each round times every job on both, one side
        # right after the other (the order alternating), so a change in the machine's load favours neither
        servers = {}
        for side in ("diffusers", "sdgen"):
            servers[side] = _Server(side, side_cmd(side, step_what, "--serve"), _side_env(side, args.threads))
            rounds[0][side]["load_s"] = servers[side].reply()["load_s"]
        for r in range(args.rounds):
            for i, name in enumerate(f"{w}_s" for w in step_what):
                order = ("diffusers", "sdgen") if (r + i) % 2 == 0 else ("sdgen", "diffusers")
                for _ in range(args.repeat):
                    for side in order:
                        t = servers[side].time(name)
                        rounds[r][side][name] = min(rounds[r][side].get(name, float("inf")), t)
        for side, server in servers.items():
            rounds[0][side]["peak_rss_mb"] = server.close()["peak_rss_mb"]
    whole_what = [w for w in args.what if w not in step_what]
    if whole_what:  # one process per side and round (txt2img includes the load), the order alternating
        for r in range(args.rounds):
            for side in ("diffusers", "sdgen") if r % 2 == 0 else ("sdgen", "diffusers"):
                proc = subprocess.run(side_cmd(side, whole_what, "--side"), capture_output=True, text=True,
                                      env=_side_env(side, args.threads))
                if proc.returncode:
                    sys.exit(f"{side} run failed:\n{proc.stderr[-3000:]}")
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                for k, v in res.items():
                    rounds[r][side][k] = max(v, rounds[r][side].get(k, 0.0)) if k == "peak_rss_mb" else v
    if args.rounds > 1:
        for r, res in enumerate(rounds):
            print(f"round {r + 1}: " + ", ".join(
                f"{k} {res['diffusers'][k]:.2f}/{res['sdgen'][k]:.2f} = {res['sdgen'][k] / res['diffusers'][k]:.3f}"
                for k in keys if k in res["diffusers"] and k in res["sdgen"]), flush=True)
    print(f"{args.model} (random weights), {args.size}x{args.size}, {args.threads} threads, "
          f"{'interleaved' if step_what else 'one process per side'}; command: python scripts/bench_vs_diffusers.py "
          f"--model {args.model} --what {','.join(args.what)} --steps {args.steps} --threads {args.threads} "
          f"--repeat {args.repeat} "
          f"--rounds {args.rounds} --conv-filters {args.conv_filters} --linear-panels {args.linear_panels}"
          + (f" --weights-dtype {args.weights_dtype}" if args.weights_dtype else "")
          + (f" --guidance {args.guidance:g}" if args.guidance is not None else ""))
    if args.rounds > 1:
        print(f"best of {args.rounds} rounds per side (peak RSS: the largest); range: the rounds' own ratios")
    print(f"{'':14s} {'diffusers':>10s} {'sdgen':>10s} {'ratio':>7s}" + ("  range" if args.rounds > 1 else ""))
    for key in keys:
        have = [res for res in rounds if key in res["diffusers"] and key in res["sdgen"]]
        if have:
            pick = max if key == "peak_rss_mb" else min
            d = pick(res["diffusers"][key] for res in have)
            s = pick(res["sdgen"][key] for res in have)
            per = [res["sdgen"][key] / res["diffusers"][key] for res in have]
            print(f"{key:14s} {d:10.2f} {s:10.2f} {s / d:7.3f}"
                  + (f"  {min(per):.3f}-{max(per):.3f}" if len(have) > 1 else ""))

if __name__ == "__main__":
    main()
