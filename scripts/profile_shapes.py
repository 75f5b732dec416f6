"""Where sdgen's UNet forward spends its time, layer shape by layer shape, and how near each runs to the CPU's peak.

    python scripts/profile_shapes.py --model sd15 --threads 2
    python scripts/profile_shapes.py --model sdxl-turbo --threads 2 --top 15

The same random-weight model and forward as scripts/profile_split.py (batch 2 of different latents; SDXL: 1), after
a warm-up forward; timers around sdgen's convolution (kernels.conv2d, kernels.upsample_conv2d) and linear
(kernels.linear_tiles.linear) entry points gather one forward's calls by shape. For each shape: calls, milliseconds,
and its rate against the float32 multiply-add peak of this machine at these threads (scripts/fp32_peak.py, measured
first):

  linear     (rows, inputs, outputs, with a residual added): GFLOP/s of its multiply-adds, and that over the peak
  conv       (inputs, outputs, height, width, batch, path, GroupNorm + SiLU applied in it): for a Winograd path, the
             multiply-adds of its element-wise products alone (tiles x alpha^2 x Cin x Cout), as GFLOP/s and over
             the peak: the fraction of the convolution's time those products would take at the peak, so what the
             rest (filters made at each call, the tile transforms, memory) and the products' own shortfall cost

The rest of the forward (attention, norms, Python) is what the two kinds leave of its wall time. A throwaway view
for finding the layers furthest from the peak, not a comparison with diffusers (scripts/profile_split.py).
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

WINOGRAD_M = {"f23": 2, "f43": 4, "f63": 6}


def conv_key(name: str, x, plan, out, pre) -> tuple[tuple, float]:
    """(the shape's key, multiply-adds x 2 of its Winograd products, 0 for other paths) of one convolution call."""
    n, h, w, cin = x.shape
    if name == "upsample_conv2d":
        path = "upsample"
    elif plan.stride != 1:
        path = f"stride {plan.stride}"
    else:
        path = plan.variant_for(h, w, n)
    m = WINOGRAD_M.get(path)
    flops = n * -(-h // m) * -(-w // m) * (m + 2) ** 2 * cin * out.shape[-1] * 2.0 if m else 0.0
    return (cin, out.shape[-1], h, w, n, path, pre is not None), flops


def profile(folder: Path, size: int, threads: int) -> tuple[float, dict, dict]:
    """One timed forward: (wall seconds, {linear key: [seconds, calls, flops]}, {conv key: [...]})."""
    from profile_split import sdgen_forward, wrap_timed
    from sdgen import kernels
    from sdgen.kernels import linear_tiles

    forward = sdgen_forward(folder, size, threads)
    linear, conv = (collections.defaultdict(lambda: [0.0, 0, 0.0]) for _ in range(2))

    def timed(module, name: str, record, table: dict) -> None:
        """module.name timed (profile_split.wrap_timed): each call's seconds, count and flops added to table[key],
        (key, flops) = record(...) (no key: not counted)."""
        def add(args, kwargs, out, seconds):
            key, flops = record(name, args, kwargs, out)
            if key is not None:
                entry = table[key]
                entry[0] += seconds
                entry[1] += 1
                entry[2] += flops

        wrap_timed(module, name, add)

    def linear_call(name, args, kwargs, out):
        a, residual = args[0], args[3] if len(args) > 3 else kwargs.get("residual")
        k, n = a.shape[-1], out.shape[-1]
        m = out.size // n
        return (m, k, n, residual is not None), 2.0 * m * k * n

    def conv_call(name, args, kwargs, out):
        if (args[1].kh, args[1].kw) == (1, 1):  # a 1x1 convolution: a linear layer, timed there
            return None, 0.0
        return conv_key(name, args[0], args[1], out, kwargs.get("pre"))

    timed(linear_tiles, "linear", linear_call, linear)
    for name in ("conv2d", "upsample_conv2d"):
        timed(kernels, name, conv_call, conv)

    forward()
    linear.clear()
    conv.clear()
    t0 = time.perf_counter()
    forward()
    return time.perf_counter() - t0, dict(linear), dict(conv)


def table(title: str, rows: dict, peak: float, top: int) -> float:
    """Print the `top` slowest shapes of rows; return their kind's total seconds."""
    total = sum(v[0] for v in rows.values())
    print(f"\n{title}: {total:.3f} s in {sum(v[1] for v in rows.values())} calls")
    for key, (sec, calls, flops) in sorted(rows.items(), key=lambda kv: -kv[1][0])[:top]:
        rate = f"{flops / sec / 1e9:6.0f} GFLOP/s {flops / sec / 1e9 / peak:5.2f} of peak" if flops else ""
        print(f"  {str(key):44s} {calls:3d} calls {sec * 1e3:8.1f} ms  {rate}")
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sd15", help="an architecture in sdgen/data/configs (sd15, sdxl-turbo, ...)")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=12, help="shapes listed per kind (the slowest)")
    ap.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "sdgen" / "random-models")
    args = ap.parse_args()

    from compare_full_size import build_random_model
    from fp32_peak import fma_peak
    from sdgen.threads import set_threads

    # the threads set before the peak's parallel loop, as fp32_peak.py does: with Numba's OpenMP layer, a parallel
    # loop run before set_threads left the forward after it 12-15% slower (sd15, 2 threads, Zen 4: 6.7-7.0 s against
    # 6.0-6.2, linear and convolutions alike; not with the workqueue layer)
    set_threads(args.threads)
    peak = fma_peak(args.threads)  # GFLOP/s
    folder = build_random_model(args.model, args.workdir / args.model)
    wall, linear, conv = profile(folder, args.size, args.threads)
    print(f"{args.model} (random weights), {args.size}x{args.size}, one UNet forward, {args.threads} threads: "
          f"{wall:.2f} s; float32 multiply-add peak {peak:.0f} GFLOP/s")
    lin = table("linear (rows, inputs, outputs, residual)", linear, peak, args.top)
    flops = sum(v[2] for v in linear.values())
    print(f"  all: {flops / lin / 1e9:.0f} GFLOP/s, {flops / lin / 1e9 / peak:.2f} of peak")
    cv = table("convolutions (inputs, outputs, height, width, batch, path, GroupNorm + SiLU in it)", conv, peak,
               args.top)
    wino = [v for k, v in conv.items() if k[5] in WINOGRAD_M]
    if wino:
        sec, flops = sum(v[0] for v in wino), sum(v[2] for v in wino)
        print(f"  Winograd paths: {sec:.3f} s, their products at the peak {flops / peak / 1e9:.3f} s "
              f"({flops / sec / 1e9 / peak:.2f} of their time)")
    print(f"\nthe rest (attention, norms, Python): {wall - lin - cv:.3f} s")


if __name__ == "__main__":
    main()
