"""Where a UNet forward's time goes, by kind of work, for diffusers on PyTorch and for sdgen, side by side.

Same random-weight model as scripts/bench_vs_diffusers.py (cached under --workdir), same threads, each side in its
own process, after a warm-up forward. The kinds:

  linear      matrix products by weights: nn.Linear, 1x1 convolutions (diffusers' proj_in / proj_out and ResNet
              shortcuts of SD 1.x are 1x1 Conv2d; sdgen runs them as GEMMs)
  conv3x3     every other convolution (3x3, stride 1 or 2; sdgen's fused upsample + convolution too)
  attention   scaled dot-product attention (PyTorch's SDPA; sdgen's kernels.attention), projections excluded
  other       the rest of the forward's wall time (norms, activations, adds, copies, Python; sdgen's ResNet blocks
              apply GroupNorm + SiLU in their convolutions' input transforms, which count as conv3x3, and take
              only the statistics here)

Each side's time per kind is read from timers around the functions that do that work (diffusers: PyTorch's
F.linear, F.conv2d and F.scaled_dot_product_attention, which its layers call; sdgen: its kernels), in a forward of
its own; its total is that forward's wall time, and each side's best of two forwards without timers is printed
too. Printed: seconds per kind on each side, the ratio, each side's GFLOP/s on the linear products (multiply-adds x 2 /
time), and sdgen's linear seconds over diffusers' untimed forward: the ratio sdgen's forward cannot go below while its
linear products run at the same rate (the GEMMs are the same work on both sides, and near the machine's peak).

    python scripts/profile_split.py --model sd15 --threads 2
    python scripts/profile_split.py --model sdxl-turbo --threads 2
"""

from __future__ import annotations

import argparse
import collections
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

KINDS = ("linear", "conv3x3", "attention", "other")


def inputs(folder: Path, size: int) -> dict:
    """The forward's inputs, as bench_vs_diffusers' unet job: batch 2 of different latents (SDXL: 1)."""
    rng = np.random.default_rng(0)
    xl = "text_encoder_2" in json.loads((folder / "model_index.json").read_text())
    batch = 1 if xl else 2
    ctx_dim = 2048 if xl else json.loads((folder / "unet" / "config.json").read_text())["cross_attention_dim"]
    out = {"sample": rng.standard_normal((batch, 4, size // 8, size // 8), dtype=np.float32),
           "context": rng.standard_normal((batch, 77, ctx_dim), dtype=np.float32)}
    if xl:
        out["text_embeds"] = rng.standard_normal((batch, 1280), dtype=np.float32)
        out["time_ids"] = np.tile(np.array([size, size, 0, 0, size, size], np.float32), (batch, 1))
    return out


def best_of(fn, n: int) -> float:
    """fn once to warm up, then the least wall time of n calls."""
    fn()
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def wrap_timed(module, name: str, record) -> None:
    """module.name replaced by a wrapper that times each call, then hands record(args, kwargs, out, seconds) the
    call's arguments, its result and its seconds (the call alone: what record does is not timed)."""
    fn = getattr(module, name)

    def run(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        record(args, kwargs, out, time.perf_counter() - t0)
        return out

    setattr(module, name, run)


def split(forward, targets: list) -> dict:
    """The forward's untimed best of 2 ("plain"), then its time by kind: for each (module, kinds) of targets, the
    module's functions named in kinds wrapped in timers (kinds[name](args, out) -> (kind, flops of a linear product,
    else 0)), one forward to warm up and one measured ("total"; "other" is what the kinds leave of it)."""
    plain = best_of(forward, 2)
    seconds = collections.Counter()
    flops = [0.0]

    def timed(module, name: str, kind_of) -> None:
        def record(args, kwargs, out, sec):
            kind, f = kind_of(args, out)
            seconds[kind] += sec
            flops[0] += f

        wrap_timed(module, name, record)

    for module, kinds in targets:
        for name, kind_of in kinds.items():
            timed(module, name, kind_of)
    forward()
    seconds.clear()
    flops[0] = 0.0
    t0 = time.perf_counter()
    forward()
    total = time.perf_counter() - t0
    seconds["other"] = total - sum(seconds[k] for k in KINDS[:3])
    return {"total": total, "plain": plain, **{k: seconds[k] for k in KINDS}, "linear_flops": flops[0]}


def diffusers_side(folder: Path, size: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F
    import diffusers

    torch.set_num_threads(threads)
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")
    x = {k: torch.from_numpy(v) for k, v in inputs(folder, size).items()}
    extra = {}
    if "time_ids" in x:
        extra["added_cond_kwargs"] = {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}

    def forward():
        with torch.no_grad():
            return unet(x["sample"], torch.tensor(500), encoder_hidden_states=x["context"], **extra)

    def conv_kind(args, out):  # (input, weight OIHW, ...)
        if tuple(args[1].shape[2:]) == (1, 1):
            return "linear", 2.0 * out.numel() * args[1].shape[1]
        return "conv3x3", 0.0

    # nn.Linear, nn.Conv2d and diffusers' attention processor call these through the module, by name
    return split(forward, [(F, {"linear": lambda args, out: ("linear", 2.0 * out.numel() * args[1].shape[1]),
                                "conv2d": conv_kind,
                                "scaled_dot_product_attention": lambda args, out: ("attention", 0.0)})])


def sdgen_forward(folder: Path, size: int, threads: int):
    """sdgen's UNet of the model in folder, loaded with the sdgen command's memory settings and threads: a function
    that runs one forward on inputs(folder, size)."""
    from sdgen.memory import fresh_memory_settings
    from sdgen.pipeline import Pipeline
    from sdgen.threads import set_threads

    fresh_memory_settings()  # as the sdgen command does
    set_threads(threads)
    unet = Pipeline.load(folder).unet
    x = inputs(folder, size)
    extra = {k: x[k] for k in ("text_embeds", "time_ids") if k in x}

    def forward():
        unet.forget_context()  # the cross-attention keys made again, as diffusers does at every forward
        return unet(x["sample"], 500, x["context"], **extra)

    return forward


def sdgen_side(folder: Path, size: int, threads: int) -> dict:
    from sdgen import kernels
    from sdgen.kernels import linear_tiles

    forward = sdgen_forward(folder, size, threads)

    def conv_kind(args, out):  # (input NHWC, Conv2dPlan)
        if (args[1].kh, args[1].kw) == (1, 1):
            return "linear", 2.0 * out.size * args[0].shape[-1]
        return "conv3x3", 0.0

    # the models call the kernels through the package (and the linear layers' tiles through linear_tiles), by name
    return split(forward, [(kernels, {"linear": lambda args, out: ("linear", 2.0 * out.size * args[1].shape[1]),
                                      "conv2d": conv_kind,
                                      "upsample_conv2d": lambda args, out: ("conv3x3", 0.0),
                                      "attention": lambda args, out: ("attention", 0.0)}),
                           (linear_tiles, {"linear": lambda args, out: ("linear",
                                                                        2.0 * out.size * args[0].shape[-1])})])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sd15", help="an architecture in sdgen/data/configs (sd15, sdxl-turbo, ...)")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--linear-panels", default="auto", choices=["auto", "on", "off"],
                    help="sdgen's --linear-panels")
    ap.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "sdgen" / "random-models")
    ap.add_argument("--side", choices=["diffusers", "sdgen"], help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        side = diffusers_side if args.side == "diffusers" else sdgen_side
        if args.side == "sdgen":
            from sdgen.models.layers import set_linear_panels
            set_linear_panels(args.linear_panels)
        print(json.dumps(side(Path(args.folder), args.size, args.threads)))
        return

    from compare_full_size import build_random_model

    folder = build_random_model(args.model, args.workdir / args.model)
    res = {}
    for side in ("diffusers", "sdgen"):
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        cmd = [sys.executable, __file__, "--side", side, "--folder", str(folder), "--size", str(args.size),
               "--threads", str(args.threads), "--linear-panels", args.linear_panels]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            sys.exit(f"{side} side failed:\n{proc.stderr[-3000:]}")
        res[side] = json.loads(proc.stdout.strip().splitlines()[-1])
    d, s = res["diffusers"], res["sdgen"]
    print(f"{args.model} (random weights), {args.size}x{args.size}, one UNet forward, {args.threads} threads; "
          f"command: python scripts/profile_split.py --model {args.model} --size {args.size} --threads {args.threads} "
          f"--linear-panels {args.linear_panels}")
    print(f"{'':12s} {'diffusers s':>12s} {'sdgen s':>10s} {'ratio':>7s}")
    for k in (*KINDS, "total"):
        print(f"{k:12s} {d[k]:12.2f} {s[k]:10.2f} {s[k] / d[k]:7.2f}")
    print(f"{'untimed':12s} {d['plain']:12.2f} {s['plain']:10.2f} {s['plain'] / d['plain']:7.2f}  (best of 2 "
          "forwards without timers)")
    print(f"linear products: diffusers {d['linear_flops'] / d['linear'] / 1e9:.0f} GFLOP/s, "
          f"sdgen {s['linear_flops'] / s['linear'] / 1e9:.0f} GFLOP/s")
    print(f"sdgen's linear time alone / diffusers' untimed forward: {s['linear'] / d['plain']:.2f}")

if __name__ == "__main__":
    main()
