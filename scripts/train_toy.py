"""Train sdgen's ``toy`` model: a tiny Stable Diffusion 1.x (CLIP text encoder, UNet, VAE) on the pictures of
``scripts/toy_data.py``, on the CPU, and save it in the diffusers layout (safetensors, fp16 storage).

Dev-only: needs torch, diffusers and transformers (sdgen itself needs none of them).

    nice -n 10 python scripts/train_toy.py --out sdgen/data/toy --work /tmp/toy_train            # both stages
    nice -n 10 python scripts/train_toy.py --stage vae --work /tmp/toy_train                     # stage 1 only
    nice -n 10 python scripts/train_toy.py --stage unet --work /tmp/toy_train --out sdgen/data/toy   # stage 2 only

Stage 1 (VAE, -> <work>/vae): (a) render the data set; (b) train the VAE for reconstruction (MSE + a tiny KL term
+ an anchor that makes latent channels 0-2 the mean colour of each 8x8 block, channel 3 being free) on 32x32
crops; (c) train its decoder alone on whole pictures (the encoder fixed); (d) fold a whitening of the latents into
the VAE's 1x1 ``quant_conv`` / ``post_quant_conv`` so that the latents come out zero-mean, uncorrelated and of equal
spread (std 1 / scaling_factor per channel, scaling_factor = SD's 0.18215): the decoder's output is unchanged, and
every latent direction -- colour included -- then gets the same share of the diffusion noise.

Stage 2 (UNet + text encoder, -> --out): encode every picture once, then train the UNet and the text encoder together
with the standard epsilon-prediction loss (min-SNR-5 weighted) on the scaled latents, with 10% of the captions
dropped to "" so that classifier-free guidance works; keep an EMA of both, which is what gets saved.  The learning
rate follows a cosine planned over ``--unet-steps`` (5000); training stops after ``--stop-step`` (3500: the shipped
model).  Checkpoints go to ``<work>/pipeline`` and ``--out`` every ``--save-every`` steps, so a run stopped early
leaves a usable model; the end measures the held-out prompts as the test does (``--eval`` does only that).

The defaults are the settings of the shipped model; its model card (sdgen/data/toy/README.md) has the numbers.

Loss, wall time and process CPU time go to ``<work>/log.txt``.  Torch runs one thread: on a 2-core machine shared
with other jobs, two torch threads ran 5-8x slower than one.  ``--cpu-minutes`` stops a stage early when its process
has used that much CPU time.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import toy_data  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------
# Architecture: the SD1.x classes and block types, tiny widths.

TEXT_HIDDEN = 32
SCALING_FACTOR = 0.18215  # SD1.x's; the whitening makes the raw latents' std 1 / SCALING_FACTOR
GUIDANCE = 2.0  # the model's default guidance scale (held-out colours right: 100% at 1.5-2.5, 94% at 3, 0% at 7.5)


def text_encoder_config():
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=TEXT_HIDDEN,
    )


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=toy_data.RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=4,  # SD1.x's misnomer: the number of heads
        norm_num_groups=8,  # 4..8 channels a group (with 32 groups, 1..2 a group)
    )


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,  # 4..16 channels a group: with 1..4 the colour trained far more slowly
        sample_size=toy_data.RESOLUTION,
        scaling_factor=SCALING_FACTOR,
    )


def make_scheduler():
    """SD1.5's scheduler config (PNDM, scaled_linear 0.00085..0.012, 1000 steps, epsilon)."""
    from diffusers import PNDMScheduler

    return PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
        trained_betas=None,
        timestep_spacing="leading",
    )


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer files: the real CLIP BPE vocabulary, as sdgen bundles it.


def write_tokenizer(folder: Path) -> None:
    """vocab.json / merges.txt / tokenizer_config.json / special_tokens_map.json of SD1.x's CLIP tokenizer."""
    from sdgen.tokenizer import write_vocab_files

    write_vocab_files(folder, pad_token="<|endoftext|>")


# ---------------------------------------------------------------------------------------------------------------


class Log:
    def __init__(self, path: Path):
        self.path = path
        self.t0 = time.time()
        path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, msg: str) -> None:
        line = f"[{time.time() - self.t0:7.0f}s wall {time.process_time() / 60:6.1f} cpu-min] {msg}"
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def cosine(step: int, steps: int, warmup: int, floor: float = 0.05) -> float:
    decay = 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
    return min(1.0, (step + 1) / warmup) * (floor + (1 - floor) * decay)


def out_of_cpu(cpu_minutes: float | None) -> bool:
    return cpu_minutes is not None and time.process_time() > 60.0 * cpu_minutes


# ---------------------------------------------------------------------------------------------------------------
# Stage 1: the VAE


def train_vae(images: np.ndarray, args, log: Log):
    """(b) MSE + kl_weight * KL on random crop x crop windows (at multiples of 8, so the latent grid stays aligned):
    the VAE is convolutional, and crops cost a fraction of whole pictures."""
    torch.manual_seed(args.seed)
    vae = make_vae()
    with torch.no_grad():  # start with a small posterior std (exp(-3) = 0.05) rather than 1: trains faster
        vae.encoder.conv_out.weight[4:].mul_(0.1)
        vae.encoder.conv_out.bias[4:].fill_(-6.0)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    rng = np.random.default_rng(args.seed)
    size, crop, steps = images.shape[1], args.vae_crop, args.vae_steps
    vae.train()
    avg = None
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = args.vae_lr * cosine(step, steps, 20)
        idx = rng.integers(0, len(images), args.vae_batch)
        oy, ox = 8 * rng.integers(0, (size - crop) // 8 + 1, 2)
        x = to_tensor(images[idx, oy : oy + crop, ox : ox + crop])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        mse = F.mse_loss(rec, x)
        kl = post.kl().mean()
        # Anchor: latent channels 0-2 = rgb_scale x the 8x8-block mean colour (channel 3 is free).  Without it
        # the VAE put all eight colours on nearly one line in latent space, 0.3 std apart: hard for diffusion.
        anchor = F.mse_loss(post.mean[:, :3], args.rgb_scale * F.avg_pool2d(x, 8))
        loss = mse + args.kl_weight * kl + args.rgb_weight * anchor
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        avg = mse.item() if avg is None else 0.95 * avg + 0.05 * mse.item()
        if step % 50 == 0 or step == steps - 1:
            log(f"vae step {step} mse {mse.item():.5f} (avg {avg:.5f}) kl {kl.item():.1f} anchor {anchor.item():.4f}")
    vae.eval()
    return vae


def train_decoder(vae, images: np.ndarray, args, log: Log):
    """(c) The encoder fixed, the decoder goes on training on whole pictures, decoding posterior samples."""
    vae.requires_grad_(False)
    trainable = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in trainable:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trainable, lr=args.decoder_lr, weight_decay=0.0)
    rng = np.random.default_rng(args.seed + 3)
    gen = torch.Generator().manual_seed(args.seed + 3)
    avg = None
    steps = args.decoder_steps
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = args.decoder_lr * cosine(step, steps, 20)
        x = to_tensor(images[rng.integers(0, len(images), args.decoder_batch)])
        with torch.no_grad():
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        loss = F.mse_loss(vae.decode(z).sample, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        avg = loss.item() if avg is None else 0.95 * avg + 0.05 * loss.item()
        if step % 50 == 0 or step == steps - 1:
            log(f"decoder step {step} mse {loss.item():.5f} (avg {avg:.5f})")
    vae.requires_grad_(False)
    return vae


@torch.no_grad()
def encode_all(vae, images: np.ndarray, batch: int = 128):
    """Posterior means and stds of every picture (raw latents, before scaling_factor)."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        d = vae.encode(to_tensor(images[i : i + batch])).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def whiten(vae, images: np.ndarray, log: Log):
    """(d) Fold an affine map z' = W (z - m) into the VAE, W = Sigma^-1/2 / SCALING_FACTOR (ZCA, eigenvalues floored
    at 5% of the largest), so that the raw latents of the data have mean 0 and covariance ~ I / SCALING_FACTOR^2.
    quant_conv's mean rows become W (A h + a) - W m; post_quant_conv becomes P W^-1 z' + (P m + p), so
    decode(encode(x)) is what it was.  The posterior variance becomes a constant per channel: the mean over the data
    of the whitened posterior variance."""
    mean, std = encode_all(vae, images)
    z = mean.permute(0, 2, 3, 1).reshape(-1, 4).double()
    m = z.mean(0)
    cov = torch.cov(z.T)
    evals, evecs = torch.linalg.eigh(cov)
    evals = evals.clamp(min=0.05 * float(evals.max()))  # no blowing up of near-empty directions
    w = evecs @ torch.diag(evals.rsqrt()) @ evecs.T / SCALING_FACTOR
    w_inv = torch.linalg.inv(w)
    var = std.permute(0, 2, 3, 1).reshape(-1, 4).double() ** 2
    new_var = (var @ (w**2).T).mean(0)  # diag(W diag(var) W^T), averaged
    q, pq = vae.quant_conv, vae.post_quant_conv
    qw, qb = q.weight[:, :, 0, 0].double(), q.bias.double()
    q.weight[:4, :, 0, 0] = (w @ qw[:4]).float()
    q.bias[:4] = (w @ qb[:4] - w @ m).float()
    q.weight[4:] = 0.0
    q.bias[4:] = new_var.log().float()
    pw, pb = pq.weight[:, :, 0, 0].double(), pq.bias.double()
    pq.weight[:, :, 0, 0] = (pw @ w_inv).float()
    pq.bias[:] = (pw @ m + pb).float()
    vae.register_to_config(scaling_factor=SCALING_FACTOR)
    log(f"whitening: latent mean {m.numpy().round(3)}, std {cov.diagonal().sqrt().numpy().round(3)} -> "
        f"mean 0, std {1 / SCALING_FACTOR:.3f}; posterior std now {new_var.sqrt().numpy().round(3)}")
    return vae


def stage_vae(images: np.ndarray, args, log: Log):
    vae = train_vae(images, args, log)
    vae = train_decoder(vae, images, args, log)
    vae = whiten(vae, images[: args.whiten_images], log)
    with torch.no_grad():
        x = to_tensor(images[:256])
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
    log(f"vae done: reconstruction mse of whole pictures {F.mse_loss(rec, x).item():.5f}")
    vae.save_pretrained(args.work / "vae")
    return vae


# ---------------------------------------------------------------------------------------------------------------
# Stage 2: the UNet and the text encoder


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1.0 - decay)


def stage_unet(vae, images: np.ndarray, captions: list[str], args, log: Log) -> None:
    from diffusers import DDPMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    mean, std = encode_all(vae, images)
    scale = vae.config.scaling_factor
    log(f"latents {tuple(mean.shape)}: scaled mean {mean.mean() * scale:.3f} std {mean.std() * scale:.3f}")

    write_tokenizer(args.work / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(args.work / "tokenizer")
    uniq = sorted(set(captions)) + [""]
    ids = tokenizer(uniq, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    cap_index = {c: i for i, c in enumerate(uniq)}
    cap_idx = torch.tensor([cap_index[c] for c in captions])
    empty = len(uniq) - 1

    torch.manual_seed(args.seed + 1)
    text_encoder = CLIPTextModel(text_encoder_config())
    unet = make_unet()
    log(f"params: unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M, text encoder "
        f"{sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f}M, vae "
        f"{sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M")
    noise_sched = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    acp = noise_sched.alphas_cumprod
    snr = acp / (1 - acp)
    loss_weight = snr.clamp(max=args.snr_gamma) / snr  # min-SNR-gamma weighting (epsilon prediction)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    ema_unet, ema_te = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    for p in list(ema_unet.parameters()) + list(ema_te.parameters()):
        p.requires_grad_(False)
    unet.train()
    text_encoder.train()
    rng = torch.Generator().manual_seed(args.seed + 2)

    used = ids.unique()

    def checkpoint(step: int) -> None:
        zero_unused_embeddings(ema_te, used)
        save_pipeline(args.work / "pipeline", vae, ema_te, ema_unet)
        save_pipeline(args.out, vae, ema_te, ema_unet)
        log(f"saved step {step} to {args.work / 'pipeline'} and {args.out}")

    steps = args.unet_steps
    avg = None
    step = 0
    for step in range(steps):
        if out_of_cpu(args.cpu_minutes):
            log(f"CPU-time budget reached at step {step}")
            break
        if step >= args.stop_step:
            log(f"stop step {step} reached")
            break
        lr = args.lr * cosine(step, steps, 100)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(images), (args.batch,), generator=rng)
        lat = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=rng)) * scale
        tok = cap_idx[idx].clone()
        tok[torch.rand(args.batch, generator=rng) < args.uncond_p] = empty
        t = torch.randint(0, 1000, (args.batch,), generator=rng)
        noise = torch.randn(lat.shape, generator=rng)
        a = acp[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * lat + (1 - a).sqrt() * noise
        cond = text_encoder(ids[tok])[0]
        pred = unet(noisy, t, cond).sample
        per = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
        loss = (per * loss_weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        ema_update(ema_unet, unet, decay)
        ema_update(ema_te, text_encoder, decay)
        mse = per.mean().item()
        avg = mse if avg is None else 0.98 * avg + 0.02 * mse
        if step % 100 == 0:
            log(f"unet step {step} mse {mse:.4f} (avg {avg:.4f}) weighted {loss.item():.4f} lr {lr:.2e}")
        if step > 0 and step % args.save_every == 0:
            checkpoint(step)
    else:
        step = steps
    log(f"unet done: {step} steps, final avg mse {avg:.4f}")
    checkpoint(step)


# ---------------------------------------------------------------------------------------------------------------
# Saving and measuring


@torch.no_grad()
def zero_unused_embeddings(text_encoder, used: torch.Tensor) -> None:
    """Zero the token-embedding rows of the ~49,400 tokens that no caption uses: they were never trained (random
    init, shrunk by weight decay), and zeros make the committed file compress to a tenth."""
    emb = text_encoder.get_input_embeddings().weight
    keep = torch.zeros(emb.shape[0], dtype=torch.bool)
    keep[used] = True
    emb[~keep] = 0.0


def save_pipeline(folder: Path, vae, text_encoder, unet, fp16: bool = True) -> None:
    """Write the diffusers folder (fp32 configs; weights stored as fp16 safetensors when ``fp16``)."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTokenizer

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_tokenizer(tmp / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(tmp / "tokenizer")
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=make_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(tmp / "tokenizer")
    write_tokenizer(tmp / "tokenizer")  # exactly the vocabulary files, nothing that save_pretrained adds
    for f in tmp.rglob("*.safetensors"):
        if fp16:
            sd = load_file(f)
            save_file({k: v.to(torch.float16).contiguous() for k, v in sd.items()}, f, metadata={"format": "pt"})
    for f in list(tmp.rglob("*.bin")):
        f.unlink()
    for f in tmp.rglob("config.json"):  # no paths of the machine that trained it
        cfg = json.loads(f.read_text())
        if cfg.pop("_name_or_path", None) is not None:
            f.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for f in tmp.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)
    card = folder / "README.md"
    if card.exists():
        shutil.copy(card, tmp / "README.md")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def evaluate(folder: Path, log: Log, steps: int = 20, guidance: float = GUIDANCE, seeds=(0, 1, 2)) -> float:
    """The semantic test of tests/test_toy_model.py, with diffusers: the share of (held-out prompt, seed) pictures
    whose centre / border colours are the asked-for shape / background colours."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    ok = total = 0
    misses = []
    for prompt in toy_data.HELD_OUT_PROMPTS:
        want = (prompt.split()[1], prompt.split()[-2])
        for seed in seeds:
            img = pipe(prompt, negative_prompt="", num_inference_steps=steps, guidance_scale=guidance,
                       generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
            got = toy_data.measure_colours((img * 255).round().astype(np.uint8))
            ok += got == want
            total += 1
            if got != want:
                misses.append(f"{prompt!r}/{seed}: {got}")
    rate = ok / total
    log(f"eval {folder} steps {steps} guidance {guidance}: {ok}/{total} = {rate:.3f}; misses: {misses}")
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=["all", "vae", "unet"], default="all")
    ap.add_argument("--out", type=Path, default=Path("sdgen/data/toy"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/toy_train"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-images", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cpu-minutes", type=float, default=None, help="stop a stage at this much process CPU time")
    ap.add_argument("--vae-steps", type=int, default=1500)
    ap.add_argument("--vae-batch", type=int, default=8)
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument("--vae-crop", type=int, default=32)
    ap.add_argument("--kl-weight", type=float, default=1e-6)
    ap.add_argument("--rgb-weight", type=float, default=1.0)
    ap.add_argument("--rgb-scale", type=float, default=2.0)
    ap.add_argument("--decoder-steps", type=int, default=400)
    ap.add_argument("--decoder-batch", type=int, default=8)
    ap.add_argument("--decoder-lr", type=float, default=5e-4)
    ap.add_argument("--whiten-images", type=int, default=2048)
    ap.add_argument("--unet-steps", type=int, default=5000, help="the length the learning-rate schedule plans for")
    ap.add_argument("--stop-step", type=int, default=3500, help="stop (and save) after this many UNet steps")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--uncond-p", type=float, default=0.1)
    ap.add_argument("--snr-gamma", type=float, default=5.0)
    ap.add_argument("--ema", type=float, default=0.995)
    ap.add_argument("--save-every", type=int, default=500)
    ap.add_argument("--eval", action="store_true", help="measure --out (the semantic test, with diffusers) and stop")
    ap.add_argument("--guidance", type=float, nargs="*", default=[GUIDANCE])
    ap.add_argument("--eval-steps", type=int, default=20)
    ap.add_argument("--eval-seeds", type=int, default=3, help="seeds 0..N-1 for each held-out prompt")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.eval:
        log = Log(args.work / "eval_log.txt")
        for g in args.guidance:
            evaluate(args.out, log, steps=args.eval_steps, guidance=g, seeds=range(args.eval_seeds))
        return
    log = Log(args.work / "log.txt")
    log(f"args: {vars(args)}")
    images, captions = toy_data.make_dataset(args.n_images, seed=args.seed)
    log(f"data: {len(images)} pictures, {len(set(captions))} captions")
    if args.stage in ("all", "vae"):
        vae = stage_vae(images, args, log)
    else:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.work / "vae")
    if args.stage in ("all", "unet"):
        vae.eval().requires_grad_(False)
        stage_unet(vae, images, captions, args, log)
        evaluate(args.out, log)
    log("done")


if __name__ == "__main__":
    main()
