"""Full-size parity check: sdgen against diffusers on the real architecture with random weights.

Builds the model named in sdgen/data/configs/<model> (e.g. the ~860M-parameter SD1.5 UNet) with random weights in
diffusers, saves it as a diffusers folder (once; cached under --workdir), then runs both implementations with the
same prompt, seed and scheduler and prints the differences: text embeddings, one UNet forward, one VAE decode and the
whole image. Timings are printed too but are not a benchmark (see scripts/bench_vs_diffusers.py).

    python scripts/compare_full_size.py --model sd15 --size 512 --steps 20 --scheduler "dpm++ 2m"

Needs the test extra (torch, diffusers, transformers) and ~12 GB of memory for SD1.5 at 512x512.
"""

from __future__ import annotations

import argparse
import json
import sys
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


def build_random_model(model: str, out: Path, seed: int = 0) -> Path:
    """Save a random-weight diffusers folder of the architecture sdgen ships configs for."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    import diffusers
    from sdgen.tokenizer import write_vocab_files
    from tiny_models import randomize

    if (out / "model_index.json").exists():
        return out
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sd15")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--scheduler", default="dpm++ 2m", choices=sorted(DIFFUSERS_SCHEDULERS))
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "sdgen" / "random-models")
    args = ap.parse_args()

    import torch
    import diffusers
    from sdgen.pipeline import Pipeline
    from sdgen.threads import set_threads

    torch.set_num_threads(args.threads)
    set_threads(args.threads)
    folder = build_random_model(args.model, args.workdir / args.model)
    prompt, negative = "portrait photo of a old warrior chief", "blurry"
    print(f"model {args.model} (random weights) at {folder}; {args.size}x{args.size}, {args.steps} steps "
          f"{args.scheduler}, guidance {args.guidance}, seed {args.seed}, {args.threads} threads")

    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    ref.scheduler = getattr(diffusers, DIFFUSERS_SCHEDULERS[args.scheduler]).from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    ours = Pipeline.load(folder)

    # 1. text embeddings
    with torch.no_grad():
        ref_emb, ref_neg = ref.encode_prompt(prompt, "cpu", 1, True, negative)
    cond = ours.encode_prompt([prompt], [negative], guided=True)
    print(f"text embeddings      rel err {rel(cond.context[1], ref_emb[0].numpy()):.2e}  "
          f"(negative {rel(cond.context[0], ref_neg[0].numpy()):.2e})")

    # 2. one UNet forward (batch 2, as with guidance)
    lat = args.size // ours.vae_scale_factor
    x = np.random.default_rng(0).standard_normal((2, 4, lat, lat), dtype=np.float32)
    ctx = cond.context
    t0 = time.perf_counter()
    with torch.no_grad():
        ref_out = ref.unet(torch.from_numpy(x), torch.tensor(500), encoder_hidden_states=torch.from_numpy(ctx)).sample
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    our_out = ours.unet(x, 500, ctx)
    t_ours = time.perf_counter() - t0
    print(f"UNet forward         rel err {rel(our_out, ref_out.numpy()):.2e}  (diffusers {t_ref:.1f} s, sdgen {t_ours:.1f} s)")

    # 3. one VAE decode
    z = np.random.default_rng(1).standard_normal((1, 4, lat, lat), dtype=np.float32)
    t0 = time.perf_counter()
    with torch.no_grad():
        ref_img = ref.vae.decode(torch.from_numpy(z)).sample.numpy()
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    our_img = ours.vae.decode(z)
    t_ours = time.perf_counter() - t0
    print(f"VAE decode           rel err {rel(our_img, ref_img):.2e}  (diffusers {t_ref:.1f} s, sdgen {t_ours:.1f} s)")

    # 4. the whole image
    t0 = time.perf_counter()
    out = ref(prompt, negative_prompt=negative, num_inference_steps=args.steps, guidance_scale=args.guidance,
              width=args.size, height=args.size, generator=torch.Generator().manual_seed(args.seed), output_type="np")
    t_ref = time.perf_counter() - t0
    ref_px = (out.images[0] * 255).round().astype(np.uint8)
    t0 = time.perf_counter()
    our_px = ours.txt2img(prompt, negative_prompt=negative, seed=args.seed, steps=args.steps, guidance=args.guidance,
                          width=args.size, height=args.size, scheduler=args.scheduler)
    t_ours = time.perf_counter() - t0
    diff = np.abs(our_px.astype(np.int16) - ref_px.astype(np.int16))
    print(f"whole image          max diff {diff.max()} grey levels, {100 * (diff <= 1).mean():.3f}% of values within 1, "
          f"{100 * (diff == 0).mean():.3f}% equal; image std {ref_px.std():.1f}  "
          f"(diffusers {t_ref:.1f} s, sdgen {t_ours:.1f} s)")


if __name__ == "__main__":
    main()
