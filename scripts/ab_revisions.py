"""Two revisions of sdgen side by side: UNet forwards (or VAE decodes) in processes that alternate between them.

For code changes that move a forward's time by a few percent on a machine whose speed changes from minute to
minute (scripts/ab_settings.py compares settings of one revision in one process; a code change needs two
processes). Each revision given is checked out in a temporary git worktree (the working tree as it is stands for
--new by default); each round starts one process per side, the order alternating, and each process times
--forwards forwards after one that warms it up (Numba's cache, first-touch memory). Each side keeps its own
compiled kernels (Numba caches them next to the sources: a worktree's first round compiles them all). Printed:
each round's median per side, their ratio new / base, and the median of those ratios. The model is the
random-weight folder of scripts/bench_vs_diffusers.py (built there, or here if missing; diffusers is needed only
then).

    python scripts/ab_revisions.py --base HEAD~1 --model sd15 --rounds 8
    python scripts/ab_revisions.py --base 5724131 --new HEAD --model sdxl-turbo --rounds 6 --forwards 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def side(folder: Path, what: str, size: int, threads: int, forwards: int) -> list[float]:
    """This process's times (run with the revision to time first on PYTHONPATH): a forward as a guided step's
    (SD 1.x/2.x: the latents once, two contexts; SDXL: batch 1), or a VAE decode, once to warm up, then timed."""
    import sdgen
    from sdgen.memory import fresh_memory_settings
    from sdgen.pipeline import Pipeline
    from sdgen.threads import set_threads

    from ab_settings import run_step, step_inputs  # (this script's folder, first on sys.path)

    wanted = Path(os.environ["PYTHONPATH"]).resolve()
    if Path(sdgen.__file__).resolve().parents[1] != wanted:  # (an installed sdgen that PYTHONPATH did not hide)
        sys.exit(f"sdgen imported from {sdgen.__file__}, not from {wanted}")
    fresh_memory_settings()  # as the sdgen command does
    set_threads(threads)
    pipe = Pipeline.load(folder)
    inputs = step_inputs(pipe, size)
    run_step(pipe, what, inputs)
    times = []
    for _ in range(forwards):
        t0 = time.perf_counter()
        run_step(pipe, what, inputs)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", help="the revision to compare against (git rev)")
    ap.add_argument("--new", help="the revision compared (default: the working tree as it is)")
    ap.add_argument("--model", default="sd15", help="an architecture in sdgen/data/configs (sd15, sdxl-turbo, ...)")
    ap.add_argument("--what", choices=["unet", "vae"], default="unet")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--forwards", type=int, default=3, help="timed forwards (or decodes) per process")
    ap.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "sdgen" / "random-models")
    ap.add_argument("--side", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        print(json.dumps(side(Path(args.folder), args.what, args.size, args.threads, args.forwards)))
        return
    if not args.base:
        ap.error("--base REV is required")

    sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "tests"), str(ROOT)]
    from compare_full_size import build_random_model

    folder = build_random_model(args.model, args.workdir / args.model)
    with tempfile.TemporaryDirectory(prefix="sdgen-ab-") as tmp:
        roots, added = {}, []
        try:
            for name, rev in (("base", args.base), ("new", args.new)):
                if rev is None:
                    roots[name] = ROOT
                    continue
                path = Path(tmp) / name
                subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(path), rev],
                               check=True)
                added.append(path)
                roots[name] = path
            times = {"base": [], "new": []}
            ratios = []
            for r in range(args.rounds):
                med = {}
                for name in (("base", "new") if r % 2 == 0 else ("new", "base")):
                    env = dict(os.environ, PYTHONPATH=str(roots[name]), OMP_NUM_THREADS=str(args.threads))
                    cmd = [sys.executable, __file__, "--side", "--folder", str(folder), "--what", args.what,
                           "--size", str(args.size), "--threads", str(args.threads), "--forwards", str(args.forwards)]
                    # run from the temporary folder: the side imports sdgen from PYTHONPATH, not from this tree
                    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
                    if proc.returncode:
                        sys.exit(f"{name} side failed:\n{proc.stderr[-3000:]}")
                    t = json.loads(proc.stdout.strip().splitlines()[-1])
                    times[name] += t
                    med[name] = float(np.median(t))
                ratios.append(med["new"] / med["base"])
                print(f"round {r + 1}: base {med['base']:.3f} s, new {med['new']:.3f} s, new / base {ratios[-1]:.3f}",
                      flush=True)
        finally:
            for path in added:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], check=False)
    print(f"{args.model} (random weights), {args.size}x{args.size}, {args.what}, {args.threads} threads; command: "
          f"python scripts/ab_revisions.py --base {args.base}" + (f" --new {args.new}" if args.new else "") +
          f" --model {args.model} --what {args.what} --size {args.size} --rounds {args.rounds} "
          f"--forwards {args.forwards}")
    for name in ("base", "new"):
        print(f"{name:>4}: median {np.median(times[name]):.3f} s, least {min(times[name]):.3f} s "
              f"({len(times[name])} timed)")
    print(f"new / base, median of the rounds' ratios: {np.median(ratios):.3f} "
          f"(rounds {min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
