"""Benchmark sdgen's kernels against PyTorch (fp32, CPU) on Stable Diffusion's layer shapes, in one process.

    python scripts/bench_kernels.py [--threads 2] [--repeat 3]
                                    [--only conv|upsample|last|attention|norm|linear|noise|tokenizer] [--quick]

Each case runs every implementation `repeat` times, interleaved (ours, torch, ours, torch, ...), and keeps the
minimum, so that a busy machine disturbs both sides alike. Ratios are ours / torch (below 1: we are faster).
torch is only needed here and in tests, never at run time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONV_SHAPES = [  # (Cin = Cout, H, W, batch)
    (320, 64, 64, 2),
    (640, 32, 32, 2),
    (1280, 16, 16, 2),
    (1280, 8, 8, 2),
    (512, 64, 64, 1),
    (512, 128, 128, 1),
    (256, 256, 256, 1),
    (128, 512, 512, 1),
]
ATTN_SHAPES = [  # (batch, Lq, Lk, C, heads)
    (2, 4096, 4096, 320, 8),
    (2, 1024, 1024, 640, 8),
    (2, 256, 256, 1280, 8),
    (1, 4096, 4096, 512, 1),
    (1, 16384, 16384, 512, 1),  # the VAE at 1024x1024 (SDXL)
    (2, 4096, 77, 320, 8),
    (2, 1024, 77, 640, 8),
    (2, 256, 77, 1280, 8),
    (2, 4096, 4096, 320, 5),  # SD2 / SDXL: head dim 64
    (2, 4096, 77, 320, 5),
    (2, 1024, 77, 640, 10),
]
LINEAR_SHAPES = [  # (rows M, inputs K, outputs N): SD 1.5 with guidance, SDXL at 512x512, the text's 77 tokens
    (8192, 320, 2560),
    (8192, 1280, 320),
    (2048, 640, 5120),
    (512, 1280, 10240),
    (1024, 640, 5120),
    (256, 1280, 10240),
    (256, 5120, 1280),
    (77, 768, 3072),
    (77, 1280, 1280),
]


_PAUSE_S = 0.02
KINDS = ("conv", "upsample", "last", "attention", "norm", "linear", "noise", "tokenizer")


def timed_min(fns: dict, repeat: int) -> dict:
    """`repeat` rounds interleaved; minimum seconds per name. Each timed call comes after a pause and an untimed
    call of the same callable: after a parallel region PyTorch's OpenMP threads (and Numba's) keep spinning for a
    while, and a call of the other side timed right away shared the two cores with them (sdgen's attention on
    256 tokens read 1.3-1.7x slower right after SDPA than right after itself); the untimed call wakes the side's
    own threads, as its previous layer would in a model."""
    best = {name: float("inf") for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            time.sleep(_PAUSE_S)
            fn()
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def bench_conv(torch, repeat: int, quick: bool, variants: list[str]) -> None:
    from sdgen.kernels import Conv2dPlan, conv2d
    from sdgen.kernels.conv import choose_variant

    print("\n3x3 stride-1 conv, Cin = Cout, pad 1 (ms; ratio = ours / torch.nn.functional.conv2d)")
    hdr = f"{'C':>5} {'HxW':>9} {'N':>2} {'torch':>8}" + "".join(f" {v:>16}" for v in variants) + "  auto (kept/model)"
    print(hdr)
    rng = np.random.default_rng(0)
    for c, h, w, n in CONV_SHAPES:
        if quick and h * w * c > 64 * 64 * 640:
            continue
        x = rng.standard_normal((n, h, w, c), dtype=np.float32)
        wt = (rng.standard_normal((c, c, 3, 3), dtype=np.float32) / np.sqrt(9 * c)).astype(np.float32)
        b = rng.standard_normal(c, dtype=np.float32)
        xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        wtt, bt = torch.from_numpy(wt), torch.from_numpy(b)
        fns = {"torch": lambda: torch.nn.functional.conv2d(xt, wtt, bt, padding=1)}
        big = h * w * c >= 256 * 256 * 256
        for v in variants:
            if v == "im2col" and big:
                continue  # minutes on the largest maps; Winograd is the path there
            if v.startswith("model"):  # the models' plans: stored weights only, filters made at each call
                from sdgen.kernels.weights import to_storage
                dtype = {"fp16": np.float16, "bf16": np.uint16}.get(v.split("-")[-1], np.float32)
                forced = v.split("-")[-1] if v.split("-")[-1] in ("f23", "f43", "f63") else None
                plan = Conv2dPlan(to_storage(wt, dtype), b, 1, 1, cache=False, variant=forced,
                                  keep_filters=v == "model-keep")
            else:
                plan = Conv2dPlan(wt, b, 1, 1, variant=v)
            plan.prepare(h, w, n)
            fns[v] = (lambda p: lambda: conv2d(x, p))(plan)
        with torch.no_grad():
            best = timed_min(fns, 1 if big else repeat)
        tt = best["torch"]
        row = f"{c:>5} {h:>4}x{w:<4} {n:>2} {tt * 1e3:>8.1f}"
        for v in variants:
            if v in best:
                row += f" {best[v] * 1e3:>8.1f} ({best[v] / tt:4.2f})"
            else:
                row += f" {'-':>16}"
        row += f"  {choose_variant(c, c, h, w, n)}/{Conv2dPlan(wt, b, 1, 1, cache=False).variant_for(h, w, n)}"
        print(row, flush=True)


def bench_attention(torch, repeat: int, quick: bool) -> None:
    from sdgen.kernels import attention

    print("\nattention (ms; ratio = ours / torch scaled_dot_product_attention on (B, heads, L, d))")
    print(f"{'B':>2} {'Lq':>5} {'Lk':>5} {'C':>5} {'heads':>5} {'torch':>8} {'ours':>8} {'ratio':>6}")
    rng = np.random.default_rng(0)
    for b, lq, lk, c, hd in ATTN_SHAPES:
        if quick and lq * lk > 1024 * 1024:
            continue
        d = c // hd
        q = rng.standard_normal((b, lq, c), dtype=np.float32)
        k = rng.standard_normal((b, lk, c), dtype=np.float32)
        v = rng.standard_normal((b, lk, c), dtype=np.float32)
        # torch gets the layout it wants, made outside the timing
        qt = torch.from_numpy(q).view(b, lq, hd, d).transpose(1, 2).contiguous()
        kt = torch.from_numpy(k).view(b, lk, hd, d).transpose(1, 2).contiguous()
        vt = torch.from_numpy(v).view(b, lk, hd, d).transpose(1, 2).contiguous()
        sdpa = torch.nn.functional.scaled_dot_product_attention
        fns = {"torch": lambda: sdpa(qt, kt, vt), "ours": lambda: attention(q, k, v, hd)}
        with torch.no_grad():
            best = timed_min(fns, repeat)
        tt, to = best["torch"], best["ours"]
        print(f"{b:>2} {lq:>5} {lk:>5} {c:>5} {hd:>5} {tt * 1e3:>8.1f} {to * 1e3:>8.1f} {to / tt:>6.2f}", flush=True)


def bench_linear(torch, repeat: int, quick: bool) -> None:
    from sdgen.kernels import linear, linear_tiles, panels
    from sdgen.kernels.weights import to_storage

    if not panels.AVAILABLE:
        print("\nlinear: the register tiles need AVX-512VL; skipped")
        return
    print("\nlinear (ms; ratio = ours / torch F.linear fp32): OpenBLAS (--linear-panels off), the tiles from W as it "
          "lies (auto; fp32 and fp16 weights), from panels kept for the run (on)")
    print(f"{'M':>5} {'K':>5} {'N':>6} {'torch':>8} {'openblas':>15} {'auto':>15} {'auto fp16':>15} {'on':>15}")
    rng = np.random.default_rng(0)
    for m, k, n in LINEAR_SHAPES:
        if quick and m * k * n > 2e9:
            continue
        x = rng.standard_normal((m, k), dtype=np.float32)
        w = rng.standard_normal((n, k), dtype=np.float32) / np.float32(np.sqrt(k))
        b = rng.standard_normal(n, dtype=np.float32)
        w16 = to_storage(w, np.float16)
        wp = linear_tiles.empty_panels(n, k)
        linear_tiles.linear(x, wp, b, weight=w)
        xt, wt, bt = torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b)
        fns = {"torch": lambda: torch.nn.functional.linear(xt, wt, bt), "openblas": lambda: linear(x, w, b),
               "auto": lambda: linear_tiles.linear(x, None, b, weight=w),
               "auto fp16": lambda: linear_tiles.linear(x, None, b, weight=w16),
               "on": lambda: linear_tiles.linear(x, wp, b)}
        with torch.no_grad():
            best = timed_min(fns, repeat)
        t = best["torch"]
        print(f"{m:>5} {k:>5} {n:>6} {t * 1e3:>8.2f}" + "".join(
            f" {best[v] * 1e3:>8.2f} ({best[v] / t:.2f})" for v in ("openblas", "auto", "auto fp16", "on")),
            flush=True)


def bench_norm(torch, repeat: int) -> None:
    from sdgen.kernels import geglu, group_norm, layer_norm

    print("\nnorms and activations (ms; ratio = ours / torch)")
    rng = np.random.default_rng(0)
    F = torch.nn.functional
    cases = []
    x = rng.standard_normal((2, 64, 64, 320), dtype=np.float32)
    g, bb = rng.standard_normal(320, dtype=np.float32), rng.standard_normal(320, dtype=np.float32)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    gt, bt = torch.from_numpy(g), torch.from_numpy(bb)
    cases.append(("group_norm+silu 2x64x64x320", lambda: group_norm(x, 32, g, bb, 1e-5, True),
                  lambda: F.silu(F.group_norm(xt, 32, gt, bt, 1e-5))))
    t = rng.standard_normal((2, 4096, 320), dtype=np.float32)
    tt = torch.from_numpy(t)
    cases.append(("layer_norm 2x4096x320", lambda: layer_norm(t, g, bb, 1e-5),
                  lambda: F.layer_norm(tt, (320,), gt, bt, 1e-5)))
    z = rng.standard_normal((2, 4096, 2560), dtype=np.float32)
    zt = torch.from_numpy(z)

    def tgeglu():
        a, gate = zt.chunk(2, dim=-1)
        return a * F.gelu(gate)

    cases.append(("geglu 2x4096x2560", lambda: geglu(z), tgeglu))
    print(f"{'case':<30} {'torch':>8} {'ours':>8} {'ratio':>6}")
    for name, ours, theirs in cases:
        with torch.no_grad():
            best = timed_min({"ours": ours, "torch": theirs}, repeat)
        print(f"{name:<30} {best['torch'] * 1e3:>8.1f} {best['ours'] * 1e3:>8.1f} "
              f"{best['ours'] / best['torch']:>6.2f}", flush=True)


def bench_upsample(torch, repeat: int, quick: bool) -> None:
    """The upsamplers: nearest x2 then a 3x3 conv, as the UNet and VAE run them (weights stored, filters made at
    each call), against torch's interpolate + conv2d; "up+conv" is sdgen upsampling, then its own conv2d."""
    from sdgen.kernels import Conv2dPlan, conv2d, upsample2x, upsample_conv2d

    print("\nnearest x2 upsampling + 3x3 conv (ms; ratios to torch's interpolate + conv2d)")
    print(f"{'C':>5} {'HxW in':>9} {'N':>2} {'torch':>8} {'up+conv':>15} {'ours':>15}")
    rng = np.random.default_rng(0)
    F = torch.nn.functional
    shapes = [(640, 32, 2), (512, 64, 1), (512, 128, 1), (256, 256, 1)]
    for c, hw, n in shapes[:3] if quick else shapes:
        x = rng.standard_normal((n, hw, hw, c), dtype=np.float32)
        w = rng.standard_normal((c, c, 3, 3), dtype=np.float32) * 0.02
        b = rng.standard_normal(c, dtype=np.float32)
        plan = Conv2dPlan(w, b, 1, 1, cache=False)
        xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        wt, bt = torch.from_numpy(w), torch.from_numpy(b)
        with torch.no_grad():
            best = timed_min({"torch": lambda: F.conv2d(F.interpolate(xt, scale_factor=2.0, mode="nearest"), wt, bt,
                                                         padding=1),
                              "up+conv": lambda: conv2d(upsample2x(x), plan),
                              "ours": lambda: upsample_conv2d(x, plan)}, repeat)
        t = best["torch"]
        print(f"{c:>5} {hw:>4}x{hw:<4} {n:>2} {t * 1e3:>8.1f} {best['up+conv'] * 1e3:>8.1f} ({best['up+conv'] / t:.2f})"
              f" {best['ours'] * 1e3:>8.1f} ({best['ours'] / t:.2f})", flush=True)


def bench_last(torch, repeat: int, quick: bool) -> None:
    """The models' last convolutions (few output channels, stride 1: kn2row), against torch's conv2d and im2col."""
    from sdgen.kernels import Conv2dPlan, conv2d

    print("\nlast convolutions, 3x3 pad 1, few outputs (ms; ratios to torch.nn.functional.conv2d)")
    print(f"{'Cin->Cout':>10} {'HxW':>9} {'N':>2} {'torch':>8} {'im2col':>15} {'kn2row':>15}")
    rng = np.random.default_rng(0)
    shapes = [(128, 3, 512, 1), (320, 4, 64, 2), (320, 4, 128, 2), (128, 3, 1024, 1)]
    for cin, cout, hw, n in shapes[:2] if quick else shapes:
        x = rng.standard_normal((n, hw, hw, cin), dtype=np.float32)
        w = (rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(9 * cin)).astype(np.float32)
        b = rng.standard_normal(cout, dtype=np.float32)
        plans = {v: Conv2dPlan(w, b, 1, 1, cache=False, variant=v) for v in ("im2col", "kn2row")}
        xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        wt, bt = torch.from_numpy(w), torch.from_numpy(b)
        fns = {"torch": lambda: torch.nn.functional.conv2d(xt, wt, bt, padding=1)}
        fns.update({v: (lambda p: lambda: conv2d(x, p))(p) for v, p in plans.items()})
        with torch.no_grad():
            best = timed_min(fns, repeat)
        t = best["torch"]
        print(f"{cin:>5}->{cout:<4} {hw:>4}x{hw:<4} {n:>2} {t * 1e3:>8.1f}"
              + "".join(f" {best[v] * 1e3:>8.1f} ({best[v] / t:.2f})" for v in plans), flush=True)


def bench_noise(torch, repeat: int) -> None:
    """The initial noise: sdgen.rng.TorchGenerator.randn (torch.randn's numbers, from numpy) against torch.randn."""
    from sdgen.rng import TorchGenerator

    print("\nnoise: randn with a CPU generator, torch's numbers (ms; ratio = ours / torch)")
    print(f"{'shape':<16} {'torch':>8} {'ours':>8} {'ratio':>6}")
    for shape in ((1, 4, 64, 64), (1, 4, 128, 128), (4, 4, 128, 128)):
        ours, theirs = TorchGenerator(0), torch.Generator().manual_seed(0)
        best = timed_min({"ours": lambda: ours.randn(shape), "torch": lambda: torch.randn(shape, generator=theirs)},
                         repeat)
        print(f"{'x'.join(map(str, shape)):<16} {best['torch'] * 1e3:>8.2f} {best['ours'] * 1e3:>8.2f} "
              f"{best['ours'] / best['torch']:>6.2f}", flush=True)


def bench_tokenizer(repeat: int) -> None:
    """Prompts to CLIP token ids: sdgen.tokenizer against transformers' CLIPTokenizer on the same vocabulary, each
    prompt once per round (after a warm-up round, which fills both sides' caches of words)."""
    import tempfile

    import transformers

    from sdgen.tokenizer import CLIPTokenizer, write_vocab_files

    words = ("a photograph of an astronaut riding a horse, highly detailed, 8k, trending on artstation, "
             "(masterpiece:1.2) portrait of an old warrior chief, tribal panther make up, blue on red, side profile, "
             "looking away, serious eyes, 50mm portrait photography, hard rim lighting photography").split()
    rng = np.random.default_rng(0)
    prompts = [" ".join(rng.choice(words, size=rng.integers(3, 60))) for _ in range(200)]
    with tempfile.TemporaryDirectory() as folder:
        write_vocab_files(folder)
        ours, theirs = CLIPTokenizer.from_folder(folder), transformers.CLIPTokenizer.from_pretrained(folder)

    def run(tok):
        return lambda: [tok(p) for p in prompts]

    best = timed_min({"ours": run(ours), "transformers": run(lambda p: theirs(
        p, padding="max_length", max_length=77, truncation=True).input_ids)}, repeat)
    per = {k: v / len(prompts) * 1e6 for k, v in best.items()}
    print(f"\ntokenizer: {len(prompts)} prompts of 3-60 words (us per prompt; ratio = ours / transformers)\n"
          f"transformers {per['transformers']:.1f}, ours {per['ours']:.1f}, "
          f"ratio {per['ours'] / per['transformers']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", choices=KINDS, action="append")
    ap.add_argument("--quick", action="store_true", help="skip the largest shapes")
    ap.add_argument("--variants", default="im2col,f23,f43,f63,model",
                    help="conv paths to time, comma separated: im2col, f23, f43, f63 (transformed weights kept), "
                         "model, model-fp16, model-bf16 (what the models run: the stored weights only, at that "
                         "precision, the path chosen per size, Winograd filters made at each call), model-f23, "
                         "model-f43, model-f63 (as model, that path forced), model-keep (as --conv-filters keep)")
    args = ap.parse_args()

    import torch

    from sdgen.memory import fresh_memory_settings
    from sdgen.threads import set_threads

    fresh_memory_settings()  # as the sdgen command does: freed memory reused, not faulted in again at each call
    set_threads(args.threads)
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, torch {torch.__version__}, numpy {np.__version__}; minimum of {args.repeat} runs")
    only = args.only or list(KINDS)
    if "conv" in only:
        bench_conv(torch, args.repeat, args.quick, args.variants.split(","))
    if "upsample" in only:
        bench_upsample(torch, args.repeat, args.quick)
    if "last" in only:
        bench_last(torch, args.repeat, args.quick)
    if "attention" in only:
        bench_attention(torch, args.repeat, args.quick)
    if "norm" in only:
        bench_norm(torch, args.repeat)
    if "linear" in only:
        bench_linear(torch, args.repeat, args.quick)
    if "noise" in only:
        bench_noise(torch, args.repeat)
    if "tokenizer" in only:
        bench_tokenizer(args.repeat)


if __name__ == "__main__":
    main()
