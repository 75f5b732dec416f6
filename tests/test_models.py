"""Each architecture against its PyTorch original, on tiny random-weight models and awkward sizes.

Tolerance: 1e-4 relative (max abs error / max abs value). Both sides compute in float32 and differ only in the
order of floating-point operations (BLAS blocking, Winograd transforms, fused norms), which costs ~1e-6 per layer;
the tiny UNet stacks ~30 layers, so 1e-4 leaves room without hiding a wrong op (a wrong op gives errors of order 1).
"""

import numpy as np
import pytest
import torch

from sdgen.kernels import panels
from sdgen.models.clip import CLIPTextConfig, CLIPTextModel
from sdgen.models.unet import UNet, UNetConfig
from sdgen.models.vae import AutoencoderKL, VAEConfig
from tiny_models import (SD1_CLIP, SD1_UNET, SD1_VAE, SD2_UNET, SDXL_UNET, make_clip, make_unet, make_vae, rel_err,
                         state_dict_numpy)

TOL = 1e-4


@pytest.mark.parametrize("name,config,hw", [
    ("sd1", SD1_UNET, (8, 8)), ("sd1", SD1_UNET, (8, 10)), ("sd2", SD2_UNET, (6, 12)), ("sdxl", SDXL_UNET, (10, 6)),
])
def test_unet_forward_matches_diffusers(name, config, hw):
    ref_model = make_unet(config, seed=1)
    ours = UNet(UNetConfig.from_dict(dict(ref_model.config)), state_dict_numpy(ref_model))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, *hw), dtype=np.float32)
    ctx = rng.standard_normal((2, 7, config["cross_attention_dim"]), dtype=np.float32)
    kwargs, torch_kwargs = {}, {}
    if name == "sdxl":
        te = rng.standard_normal((2, 32), dtype=np.float32)
        ids = np.array([[80, 48, 0, 0, 80, 48], [64, 64, 8, 4, 80, 48]], np.float32)
        kwargs = dict(text_embeds=te, time_ids=ids)
        torch_kwargs = dict(added_cond_kwargs={"text_embeds": torch.from_numpy(te), "time_ids": torch.from_numpy(ids)})
    for t in (999, 1.5):
        with torch.no_grad():
            ref = ref_model(torch.from_numpy(x), torch.tensor(t), encoder_hidden_states=torch.from_numpy(ctx),
                            **torch_kwargs).sample.numpy()
        assert rel_err(ours(x, t, ctx, **kwargs), ref) < TOL


def _cross_attentions(unet):
    blocks = list(unet.down_blocks) + [unet.mid_block] + list(unet.up_blocks)
    for block in blocks:
        for t2d in getattr(block, "attentions", None) or [getattr(block, "attention", None)]:
            if t2d is not None:
                yield from (b.attn2 for b in t2d.blocks)


def test_unet_computes_cross_attention_keys_once_per_context():
    """The keys and values of the text context are computed at the first step and reused while the context's values
    stay the same; new values (here: the caller's array changed in place) are seen at once. Each result against
    diffusers on the context it was given."""
    ref_model = make_unet(SD1_UNET, seed=1)
    ours = UNet(UNetConfig.from_dict(dict(ref_model.config)), state_dict_numpy(ref_model))
    calls = []
    for attn in _cross_attentions(ours):
        kv = attn.kv
        attn.kv = lambda c, _kv=kv: (calls.append(1), _kv(c))[1]
    n_layers = len(list(_cross_attentions(ours)))
    assert n_layers > 0
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 4, 8, 8), dtype=np.float32)
    ctx = rng.standard_normal((2, 7, SD1_UNET["cross_attention_dim"]), dtype=np.float32)

    def reference(t):
        with torch.no_grad():
            return ref_model(torch.from_numpy(x), torch.tensor(t), encoder_hidden_states=torch.from_numpy(ctx)
                             ).sample.numpy()

    for t in (999, 500, 1):  # three steps, one prompt: each layer's keys made once
        assert rel_err(ours(x, t, ctx.copy()), reference(t)) < TOL
    assert len(calls) == n_layers
    ctx[1] *= np.float32(-0.5)  # another prompt, in the same array
    assert rel_err(ours(x, 500, ctx), reference(500)) < TOL
    assert len(calls) == 2 * n_layers
    again = ours(x, 500, ctx)
    ours.forget_context()
    assert np.array_equal(ours(x, 500, ctx), again)  # kept keys give exactly the numbers of fresh ones
    assert len(calls) == 3 * n_layers


@pytest.mark.parametrize("name,config,batch", [("sd1", SD1_UNET, 1), ("sd2", SD2_UNET, 3), ("sdxl", SDXL_UNET, 2)])
def test_unet_runs_guided_latents_once_until_the_contexts_enter(name, config, batch):
    """Guidance: B latents under 2B context rows give diffusers' result on the latents doubled. Until the first
    cross-attention the layers run on the B latents only (SD 1.x/2.x: conv_in, a ResNet, a self-attention); SDXL's
    time embedding depends on each context's pooled embedding, so there everything after conv_in runs on 2B rows."""
    ref_model = make_unet(config, seed=4)
    ours = UNet(UNetConfig.from_dict(dict(ref_model.config)), state_dict_numpy(ref_model))
    seen = {}  # rows of the batch a ResNet computes on: the first one, and one in the deepest level

    def record(resnet, key):
        conv = resnet.conv2
        resnet.conv2 = lambda x, **k: (seen.setdefault(key, x.shape[0]), conv(x, **k))[1]

    record(ours.down_blocks[0].resnets[0], "first")
    record(ours.down_blocks[-1].resnets[-1], "deep")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((batch, 4, 6, 10), dtype=np.float32)
    ctx = rng.standard_normal((2 * batch, 7, config["cross_attention_dim"]), dtype=np.float32)
    kwargs, torch_kwargs = {}, {}
    if name == "sdxl":
        te = rng.standard_normal((2 * batch, 32), dtype=np.float32)
        ids = np.tile(np.array([48, 80, 0, 0, 48, 80], np.float32), (2 * batch, 1))
        kwargs = dict(text_embeds=te, time_ids=ids)
        torch_kwargs = dict(added_cond_kwargs={"text_embeds": torch.from_numpy(te), "time_ids": torch.from_numpy(ids)})
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(np.concatenate([x, x])), torch.tensor(321),
                        encoder_hidden_states=torch.from_numpy(ctx), **torch_kwargs).sample.numpy()
    got = ours(x, 321, ctx, **kwargs)
    assert got.shape == ref.shape and rel_err(got, ref) < TOL
    assert seen["first"] == (2 * batch if name == "sdxl" else batch)
    assert seen["deep"] == 2 * batch
    with pytest.raises(ValueError, match="context rows"):
        ours(np.concatenate([x, x, x]), 321, ctx, **kwargs)  # 3B samples, 2B contexts


def test_vae_decode_and_encode_match_diffusers():
    ref_model = make_vae(SD1_VAE, seed=2)
    ours = AutoencoderKL(VAEConfig.from_dict(dict(ref_model.config)), state_dict_numpy(ref_model))
    rng = np.random.default_rng(1)
    z = rng.standard_normal((2, 4, 5, 7), dtype=np.float32)
    with torch.no_grad():
        ref = ref_model.decode(torch.from_numpy(z)).sample.numpy()
    assert rel_err(ours.decode(z), ref) < TOL
    images = rng.uniform(-1, 1, (1, 3, 24, 40)).astype(np.float32)
    with torch.no_grad():
        dist = ref_model.encode(torch.from_numpy(images)).latent_dist
    mean, logvar = ours.encode(images)
    assert rel_err(mean, dist.mean.numpy()) < TOL
    assert rel_err(logvar, dist.logvar.numpy()) < TOL


@pytest.mark.parametrize("act,projection", [("quick_gelu", None), ("gelu", 16)])
def test_clip_text_encoder_matches_transformers(act, projection):
    ref_model = make_clip(dict(SD1_CLIP, hidden_act=act), seed=3, projection_dim=projection)
    prefix = "text_model." if projection else ""
    tensors = state_dict_numpy(ref_model, prefix)
    cfg = ref_model.config.to_dict()
    ours = CLIPTextModel(CLIPTextConfig.from_dict(cfg), tensors)
    ids = np.array([[49406, 320, 1125, 539, 49407] + [49407] * 72,
                    [49406, 1929, 268, 49407] + [0] * 73], dtype=np.int64)
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(ids), output_hidden_states=True)
    out = ours(ids, output_hidden_states=True)
    assert rel_err(out.last_hidden_state, ref.last_hidden_state.numpy()) < TOL
    assert rel_err(out.hidden_states[-2], ref.hidden_states[-2].numpy()) < TOL
    pooled_ref = ref.text_embeds if projection else ref.pooler_output
    assert rel_err(out.pooled, pooled_ref.numpy()) < TOL


@pytest.mark.skipif(not panels.AVAILABLE, reason="register tiles need AVX-512VL")
def test_linear_layers_packed_at_their_first_call():
    """With linear_panels on, a float32 Linear whose outputs fill 32-wide panels re-lays its weight in panels
    during its first call (the panels replace W) and multiplies by them at every call, on any number of rows: the
    same numbers as a layer packed by another call (a layer's results never depend on what it ran before); half
    weights in half panels, with the numbers of float32 panels of them widened. Other widths keep W and BLAS.
    Against float64. Under auto (the default) no layer is packed for good: calls of UNPACKED_MIN_ROWS rows and more
    multiply by the tiles from W as it lies, with the numbers of the packed panels bit for bit (float32 and half
    weights), fewer rows by OpenBLAS; with off, every call by OpenBLAS (kernels.linear's numbers)."""
    from sdgen import kernels
    from sdgen.kernels.weights import widen
    from sdgen.models.layers import UNPACKED_MIN_ROWS, Linear, Params, linear_panels, set_linear_panels

    assert linear_panels() == "auto"
    set_linear_panels(True)
    try:
        assert linear_panels() == "on"
        _check_linear_panels(Linear, Params)
    finally:
        set_linear_panels(None)

    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 40, 70), dtype=np.float32)
    few = x[0, :UNPACKED_MIN_ROWS - 1]
    b = rng.standard_normal(96, dtype=np.float32)
    for dtype in (np.float32, np.float16):
        w = rng.standard_normal((96, 70), dtype=np.float32).astype(dtype)

        def fresh():
            return Linear(Params({"weight": w.copy(), "bias": b}), 70, 96)

        lin = fresh()
        y, y_few = lin(x), lin(few)
        assert lin.panels is None and lin.weight is not None  # auto: nothing kept
        assert rel_err(y, x.astype(np.float64) @ widen(w).T.astype(np.float64) + b) < 1e-5
        assert np.array_equal(y_few, kernels.linear(few, widen(w), b))  # few rows: OpenBLAS
        set_linear_panels("on")
        try:
            packed = fresh()
            assert np.array_equal(packed(x), y)  # the same sums as the panels kept for the run
            assert packed.panels is not None and packed.panels.dtype == dtype
        finally:
            set_linear_panels(None)
        set_linear_panels("off")
        try:
            lin = fresh()
            assert np.array_equal(lin(x), kernels.linear(x, widen(w), b))
            assert lin.panels is None and lin.weight is not None
        finally:
            set_linear_panels(None)
    with pytest.raises(ValueError, match="auto, on or off"):
        set_linear_panels("sometimes")


def test_fused_linear_reads_its_layers_weights_in_place():
    """Linear.fused (q, k and v sharing an input) multiplies by its layers' weights where they lie, no copy, under
    every --linear-panels: the numbers of the layers one by one (bit for bit from the tiles; within fp32 rounding
    from OpenBLAS), the biases joined (a missing one as zeros); OpenBLAS's path, and blocks that do not fill
    panels, join the weights once; "on" packs them into one set of panels."""
    from sdgen.models.layers import Linear, Params, set_linear_panels

    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 40, 70), dtype=np.float32)

    def layers(sizes, twins=1):  # twins: that many sets of layers of the same weights
        tensors = [{"weight": rng.standard_normal((n, 70), dtype=np.float32),
                    "bias": rng.standard_normal(n, dtype=np.float32)} for n in sizes]
        sets = [[Linear(Params(dict(t)), 70, t["weight"].shape[0], bias=i != 1) for i, t in enumerate(tensors)]
                for _ in range(twins)]
        return sets if twins > 1 else sets[0]

    for mode in ("auto", "on", "off"):
        set_linear_panels(mode)
        try:
            parts, alone = layers((64, 32, 96), twins=2)
            want = np.concatenate([lin(x) for lin in alone], axis=-1)
            fused = Linear.fused(parts)
            assert fused.out_features == 192 and all(f is p.blocks[0] for f, p in zip(fused.blocks, parts))
            y = fused(x)
            if mode == "off" or not panels.AVAILABLE:
                assert rel_err(y, want) < 1e-6 and len(fused.blocks) == 1 and fused.weight.shape == (192, 70)
            else:
                assert np.array_equal(y, want)
                assert fused.panels is not None if mode == "on" else len(fused.blocks) == 3
            assert np.array_equal(fused(x), y) and fused.out_features == 192

            parts = layers((40, 24))  # 64 outputs, neither block of whole panels
            w = np.concatenate([lin.weight for lin in parts])
            bias = np.concatenate([parts[0].bias, np.zeros(24, np.float32)])
            odd = Linear.fused(parts)
            y = odd(x)
            assert len(odd.blocks) == (0 if odd.panels is not None else 1) and odd.out_features == 64
            assert rel_err(y, x.astype(np.float64) @ w.T.astype(np.float64) + bias) < 1e-5
        finally:
            set_linear_panels(None)


def _check_linear_panels(Linear, Params):
    from sdgen.kernels.weights import to_storage, widen

    rng = np.random.default_rng(0)

    def layer(n, k, dtype=np.float32):  # the layer, its weights widened, its bias
        w = to_storage(rng.standard_normal((n, k), dtype=np.float32), dtype)
        b = rng.standard_normal(n, dtype=np.float32)
        return Linear(Params({"weight": w, "bias": b}), k, n), widen(w), b

    def ref(x, w, b):
        return x.astype(np.float64) @ w.T.astype(np.float64) + b

    few = rng.standard_normal((2, 5, 70), dtype=np.float32)
    many = rng.standard_normal((300, 70), dtype=np.float32)
    lin, w, b = layer(96, 70)
    twin = Linear(Params({"weight": w.copy(), "bias": b}), 70, 96)
    y_few = lin(few)
    assert lin.panels is not None and lin.weight is None and lin.out_features == 96
    assert rel_err(y_few, ref(few, w, b)) < 1e-5
    y_many = lin(many)
    assert rel_err(y_many, ref(many, w, b)) < 1e-5
    assert np.array_equal(twin(many), y_many) and np.array_equal(twin(few), y_few)  # packed by the other call

    lin, w, b = layer(40, 70)  # outputs that do not fill panels
    y = lin(few)
    assert lin.panels is None and lin.weight is not None and lin.out_features == 40
    assert rel_err(y, ref(few, w, b)) < 1e-5
    for dtype in (np.float16, np.uint16):  # half weights: half panels, the numbers of float32 panels of them widened
        lin, w, b = layer(96, 70, dtype)
        assert lin.weight.dtype == dtype
        wide = Linear(Params({"weight": w.copy(), "bias": b}), 70, 96)
        y = lin(many)
        assert lin.panels is not None and lin.panels.dtype == dtype and lin.weight is None
        assert np.array_equal(y, wide(many)) and rel_err(y, ref(many, w, b)) < 1e-5
