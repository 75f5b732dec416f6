"""Full-size parity check: sdgen against diffusers on the real architecture with random weights.

Builds the model named in sdgen/data/configs/<model> (e.g. the ~860M-parameter SD1.5 UNet, SDXL's 2.6B) with random
weights in diffusers, saves it as a diffusers folder (once; cached under --workdir), then runs diffusers and sdgen,
each in its own process (so the two copies of the weights are never in memory together), with the same prompt, seed
and scheduler, and prints the differences: text embeddings, one UNet forward, one VAE decode and the whole image.
Timings are printed but are not a benchmark (see scripts/bench_vs_diffusers.py).

    python scripts/compare_full_size.py --model sd15 --size 512 --steps 20 --scheduler "dpm++ 2m"
    python scripts/compare_full_size.py --model sd21 --size 768 --steps 20 --scheduler ddim
    python scripts/compare_full_size.py --model sdxl-turbo --size 512 --steps 4 --guidance 0 --scheduler euler_a
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

# sdgen scheduler name -> diffusers class, for the reference run
DIFFUSERS_SCHEDULERS = {
    "pndm": "PNDMScheduler", "ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler", "dpm++ 2m": "DPMSolverMultistepScheduler",
}
PROMPT, NEGATIVE = "portrait photo of a old warrior chief", "blurry"


def build_random_model(model: str, out: Path, seed: int = 0) -> Path:
    """Save a random-weight diffusers folder of the architecture sdgen ships configs for. Where it is saved already,
    nothing is imported: PyTorch loaded into a process that then runs sdgen's kernels (scripts/profile_shapes.py,
    ab_settings.py) brings its own threads and OpenMP runtime beside Numba's."""
    if (out / "model_index.json").exists():
        return out
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    import diffusers
    from sdgen.tokenizer import write_vocab_files
    from tiny_models import randomize

    cfg_dir = ROOT / "sdgen" / "data" / "configs" / model
    read = lambda rel: json.loads((cfg_dir / rel).read_text())  # noqa: E731
    index = read("model_index.json")
    torch.manual_seed(seed)

    def text_encoder(component, s):
        cfg = {k: v for k, v in read(f"{component}/config.json").items() if k not in ("architectures",)}
        cls = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
        return randomize(cls(CLIPTextConfig(**cfg)), s), cfg

    def tokenizer(te_cfg):
        pad = "!" if te_cfg.get("hidden_act") == "gelu" else "<|endoftext|>"
        tok_dir = out.parent / (out.name + ("-tokenizer-bang" if pad == "!" else "-tokenizer-eot"))
        write_vocab_files(tok_dir, pad_token=pad)
        return CLIPTokenizer.from_pretrained(tok_dir)

    unet = randomize(UNet2DConditionModel.from_config(read("unet/config.json")), seed)
    vae = randomize(AutoencoderKL.from_config(read("vae/config.json")), seed + 1)
    te, te_cfg = text_encoder("text_encoder", seed + 2)
    sched_cfg = read("scheduler/scheduler_config.json")
    scheduler = getattr(diffusers, sched_cfg["_class_name"]).from_config(sched_cfg)
    if "text_encoder_2" in index:
        te2, te2_cfg = text_encoder("text_encoder_2", seed + 3)
        pipe = diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=te, tokenizer=tokenizer(te_cfg),
                                                   text_encoder_2=te2, tokenizer_2=tokenizer(te2_cfg), unet=unet,
                                                   scheduler=scheduler)
    else:
        pipe = diffusers.StableDiffusionPipeline(
            vae=vae, text_encoder=te, tokenizer=tokenizer(te_cfg), unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def inputs(folder: Path, size: int) -> dict:
    """The fixed UNet/VAE inputs both sides get."""
    index = json.loads((folder / "model_index.json").read_text())
    unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    xl = "text_encoder_2" in index
    lat = size // 8
    rng = np.random.default_rng(0)
    out = {"x": rng.standard_normal((2, 4, lat, lat), dtype=np.float32),
           "z": rng.standard_normal((1, 4, lat, lat), dtype=np.float32), "xl": xl}
    if xl:
        out["text_embeds"] = rng.standard_normal((2, 1280), dtype=np.float32)
        out["time_ids"] = np.tile(np.array([size, size, 0, 0, size, size], np.float32), (2, 1))
    out["ctx_dim"] = unet_cfg["cross_attention_dim"]
    return out


def run_diffusers(folder: Path, args, out_file: Path) -> None:
    import torch
    import diffusers

    torch.set_num_threads(args.threads)
    inp = inputs(folder, args.size)
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if args.scheduler:
        pipe.scheduler = getattr(diffusers, DIFFUSERS_SCHEDULERS[args.scheduler]).from_config(pipe.scheduler.config)
    res, times = {}, {}
    with torch.no_grad():
        if inp["xl"]:
            emb, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1,
                                                              do_classifier_free_guidance=True,
                                                              negative_prompt=NEGATIVE)
            res["pooled"] = torch.cat([neg_pooled, pooled]).numpy()
        else:
            emb, neg = pipe.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE)
        res["context"] = torch.cat([neg, emb]).numpy()
        ctx = torch.from_numpy(res["context"])
        extra = {}
        if inp["xl"]:
            extra = {"added_cond_kwargs": {"text_embeds": torch.from_numpy(inp["text_embeds"]),
                                           "time_ids": torch.from_numpy(inp["time_ids"])}}
        t0 = time.perf_counter()
        res["unet"] = pipe.unet(torch.from_numpy(inp["x"]), torch.tensor(500), encoder_hidden_states=ctx,
                                **extra).sample.numpy()
        times["unet"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        res["vae"] = pipe.vae.decode(torch.from_numpy(inp["z"])).sample.numpy()
        times["vae"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = pipe(PROMPT, negative_prompt=NEGATIVE if args.guidance > 1 else None, num_inference_steps=args.steps,
               guidance_scale=args.guidance, width=args.size, height=args.size,
               generator=torch.Generator().manual_seed(args.seed), output_type="np")
    times["image"] = time.perf_counter() - t0
    res["image"] = (out.images[0] * 255).round().astype(np.uint8)
    np.savez(out_file, **res, **{f"time_{k}": v for k, v in times.items()})


def run_sdgen(folder: Path, args, ref_file: Path) -> None:
    from sdgen.pipeline import Pipeline
    from sdgen.threads import set_threads

    set_threads(args.threads)
    ref = np.load(ref_file)
    inp = inputs(folder, args.size)
    pipe = Pipeline.load(folder)
    cond = pipe.encode_prompt([PROMPT], [NEGATIVE], guided=True)
    print(f"text embeddings      rel err {rel(cond.context, ref['context']):.2e}"
          + (f"  (pooled {rel(cond.pooled, ref['pooled']):.2e})" if inp["xl"] else ""))
    extra = {"text_embeds": inp["text_embeds"], "time_ids": inp["time_ids"]} if inp["xl"] else {}
    t0 = time.perf_counter()
    unet_out = pipe.unet(inp["x"], 500, ref["context"], **extra)
    t_unet = time.perf_counter() - t0
    print(f"UNet forward         rel err {rel(unet_out, ref['unet']):.2e}  "
          f"(diffusers {float(ref['time_unet']):.1f} s, sdgen {t_unet:.1f} s)")
    t0 = time.perf_counter()
    vae_out = pipe.vae.decode(inp["z"])
    t_vae = time.perf_counter() - t0
    print(f"VAE decode           rel err {rel(vae_out, ref['vae']):.2e}  "
          f"(diffusers {float(ref['time_vae']):.1f} s, sdgen {t_vae:.1f} s)")
    t0 = time.perf_counter()
    image = pipe.txt2img(PROMPT, negative_prompt=NEGATIVE if args.guidance > 1 else None, seed=args.seed,
                         steps=args.steps, guidance=args.guidance, width=args.size, height=args.size,
                         scheduler=args.scheduler)
    t_image = time.perf_counter() - t0
    diff = np.abs(image.astype(np.int16) - ref["image"].astype(np.int16))
    print(f"whole image          max diff {diff.max()} grey levels, {100 * (diff <= 1).mean():.3f}% of values within "
          f"1, {100 * (diff == 0).mean():.3f}% equal; image std {ref['image'].std():.1f}  "
          f"(diffusers {float(ref['time_image']):.1f} s, sdgen {t_image:.1f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sd15")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--scheduler", default=None, choices=sorted(DIFFUSERS_SCHEDULERS),
                    help="default: the model's own scheduler config")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "sdgen" / "random-models")
    ap.add_argument("--side", choices=["diffusers", "sdgen"], help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    folder = args.workdir / args.model
    if args.side == "diffusers":
        return run_diffusers(folder, args, args.data)
    if args.side == "sdgen":
        return run_sdgen(folder, args, args.data)

    build_random_model(args.model, folder)
    print(f"model {args.model} (random weights) at {folder}; {args.size}x{args.size}, {args.steps} steps "
          f"{args.scheduler or 'default scheduler'}, guidance {args.guidance}, seed {args.seed}, {args.threads} threads")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "diffusers.npz"
        base = [sys.executable, __file__] + sys.argv[1:] + ["--data", str(data)]
        for side in ("diffusers", "sdgen"):
            proc = subprocess.run(base + ["--side", side], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            if proc.returncode:
                sys.exit(f"{side} side failed:\n{proc.stderr[-4000:]}")
            sys.stdout.write(proc.stdout)


if __name__ == "__main__":
    main()
