"""Train sdgen's ``toy`` model: a tiny Stable Diffusion 1.x (CLIP text encoder, UNet, VAE) on the pictures of
``scripts/toy_data.py``, on the CPU, and save it in the diffusers layout (safetensors, fp16 storage).

Dev-only: needs torch, diffusers and transformers (sdgen itself needs none of them).

    nice -n 10 python scripts/train_toy.py --out sdgen/data/toy --work /tmp/toy_train

Phases: (1) render the data set; (2) train the VAE for reconstruction (MSE + a small KL term); (3) encode every
picture once, set the VAE's ``scaling_factor`` to 1 / std of the latents; (4) train the UNet and the text
encoder together with the standard epsilon-prediction loss on the scaled latents, dropping 10% of the captions
to "" so that classifier-free guidance works; keep an EMA of both; (5) save the pipeline.  Loss and elapsed time
go to ``<work>/log.txt``; the UNet phase checkpoints to ``<work>/pipeline`` every ``--save-every`` steps (and
``--out`` is rewritten then too), so a run that is stopped early still leaves a usable model.
"""

from __future__ import annotations

import argparse
import copy
import gzip
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
        norm_num_groups=32,
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
        norm_num_groups=int(__import__("os").environ.get("VAE_GROUPS", 4)),
        sample_size=toy_data.RESOLUTION,
        scaling_factor=1.0,  # set from the data after the VAE is trained
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
# Tokenizer files: the real CLIP BPE vocabulary.


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _write_vocab_from_open_clip(folder: Path) -> None:
    """vocab.json / merges.txt / tokenizer_config.json from open_clip's copy of the CLIP BPE merges."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("neither sdgen.tokenizer.write_vocab_files nor open_clip's BPE file is available")
    gz = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(gz, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    units = list(_bytes_to_unicode().values())
    vocab = units + [u + "</w>" for u in units] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 77,
        "do_lower_case": True,
        "errors": "replace",
        "clean_up_tokenization_spaces": True,
        "add_prefix_space": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(
        json.dumps({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, indent=2) + "\n"
    )


def write_tokenizer(folder: Path) -> None:
    """sdgen's own vocabulary files when sdgen.tokenizer has them, else the same vocabulary from open_clip."""
    try:
        from sdgen.tokenizer import write_vocab_files  # type: ignore[attr-defined]
    except ImportError:
        write_vocab_files = None
    if write_vocab_files is not None:
        folder.mkdir(parents=True, exist_ok=True)
        write_vocab_files(folder, pad_token="<|endoftext|>")
    else:
        _write_vocab_from_open_clip(folder)


# ---------------------------------------------------------------------------------------------------------------


class Log:
    def __init__(self, path: Path):
        self.path = path
        self.t0 = time.time()
        path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, msg: str) -> None:
        line = f"[{time.time() - self.t0:8.1f}s] {msg}"
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def train_vae(
    images: np.ndarray, steps: int, batch: int, lr: float, kl_weight: float, crop: int, log: Log, seed: int
):
    """MSE + kl_weight * KL on random crop x crop windows (at multiples of 8, so the latent grid stays aligned):
    the VAE is convolutional, and crops cost a fraction of whole pictures."""
    torch.manual_seed(seed)
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * s / steps)))
    )
    rng = np.random.default_rng(seed)
    size = images.shape[1]
    vae.train()
    avg = None
    for step in range(steps):
        idx = rng.integers(0, len(images), batch)
        oy, ox = 8 * rng.integers(0, (size - crop) // 8 + 1, 2)
        x = to_tensor(images[idx, oy : oy + crop, ox : ox + crop])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        mse = F.mse_loss(rec, x)
        kl = post.kl().mean()
        loss = mse + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        avg = mse.item() if avg is None else 0.95 * avg + 0.05 * mse.item()
        if step % 25 == 0 or step == steps - 1:
            log(f"vae step {step} mse {mse.item():.5f} (avg {avg:.5f}) kl {kl.item():.1f}")
    vae.eval()
    return vae


@torch.no_grad()
def encode_all(vae, images: np.ndarray, batch: int = 128):
    means, stds = [], []
    for i in range(0, len(images), batch):
        d = vae.encode(to_tensor(images[i : i + batch])).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1.0 - decay)


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
    card = folder / "README.md"
    if card.exists():
        shutil.copy(card, tmp / "README.md")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("sdgen/data/toy"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/toy_train"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-images", type=int, default=12288)
    # One thread: on a 2-core machine shared with other jobs, two torch threads ran 5-8x slower than one.
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vae-steps", type=int, default=600)
    ap.add_argument("--vae-batch", type=int, default=32)
    ap.add_argument("--vae-lr", type=float, default=2e-3)
    ap.add_argument("--vae-crop", type=int, default=32)
    ap.add_argument("--kl-weight", type=float, default=1e-6)
    ap.add_argument("--vae-from", type=Path, default=None, help="reuse a trained VAE folder instead of phase 2")
    ap.add_argument("--unet-steps", type=int, default=8000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--uncond-p", type=float, default=0.1)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--save-every", type=int, default=1000)
    ap.add_argument("--minutes", type=float, default=45.0, help="stop the UNet phase (and save) at this wall time")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    log = Log(args.work / "log.txt")
    log(f"args: {vars(args)}")
    deadline = log.t0 + 60.0 * args.minutes

    # (1) data
    images, captions = toy_data.make_dataset(args.n_images, seed=args.seed)
    log(f"data: {len(images)} pictures, {len(set(captions))} captions")

    # (2) VAE
    from diffusers import AutoencoderKL, DDPMScheduler

    if args.vae_from is not None:
        vae = AutoencoderKL.from_pretrained(args.vae_from)
        vae.eval()
    else:
        vae = train_vae(
            images, args.vae_steps, args.vae_batch, args.vae_lr, args.kl_weight, args.vae_crop, log, args.seed
        )
        vae.save_pretrained(args.work / "vae")

    # (3) latents and their scale
    mean, std = encode_all(vae, images)
    g = torch.Generator().manual_seed(args.seed)
    sample = mean + std * torch.randn(mean.shape, generator=g)
    scale = float(1.0 / sample.std())
    vae.register_to_config(scaling_factor=scale)
    with torch.no_grad():
        rec = vae.decode(mean[:256]).sample
    rec_mse = F.mse_loss(rec, to_tensor(images[:256])).item()
    log(f"latents {tuple(mean.shape)} mean {mean.mean():.3f} std {sample.std():.3f} -> scaling_factor {scale:.5f}; "
        f"reconstruction mse {rec_mse:.5f}")
    vae.save_pretrained(args.work / "vae")

    # (4) UNet + text encoder
    from transformers import CLIPTextModel, CLIPTokenizer

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
        f"{sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f}M, vae {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M")
    noise_sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    acp = noise_sched.alphas_cumprod
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    steps = args.unet_steps
    warm = 200
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    )
    ema_unet, ema_te = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    for p in list(ema_unet.parameters()) + list(ema_te.parameters()):
        p.requires_grad_(False)
    unet.train()
    text_encoder.train()
    avg = None
    rng = torch.Generator().manual_seed(args.seed + 2)

    def checkpoint(step: int) -> None:
        save_pipeline(args.work / "pipeline", vae, ema_te, ema_unet)
        save_pipeline(args.out, vae, ema_te, ema_unet)
        log(f"saved step {step} to {args.work / 'pipeline'} and {args.out}")

    step = 0
    for step in range(steps):
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
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        ema_update(ema_unet, unet, decay)
        ema_update(ema_te, text_encoder, decay)
        avg = loss.item() if avg is None else 0.99 * avg + 0.01 * loss.item()
        if step % 50 == 0:
            log(f"unet step {step} loss {loss.item():.4f} (avg {avg:.4f}) lr {sched.get_last_lr()[0]:.2e}")
        if step > 0 and step % args.save_every == 0:
            checkpoint(step)
        if time.time() > deadline:
            log(f"time budget reached at step {step}")
            break
    log(f"unet done: {step + 1} steps, final avg loss {avg:.4f}")
    checkpoint(step + 1)
    log("done")


if __name__ == "__main__":
    main()
