"""Prompt weighting (the web UI's syntax), long prompts in 75-token chunks, and clip skip.

diffusers has no prompt weighting and truncates at 77 tokens, so: plain short prompts must give diffusers' embeddings
exactly as before; clip skip is checked against diffusers' ``clip_skip=``; weighting and chunking against their
definition (sdgen/prompt_weights.py) computed from unweighted encodings.
"""

import numpy as np
import pytest
import torch

from sdgen.pipeline import Pipeline
from sdgen.prompt_weights import BREAK, parse_prompt_attention, tokenize_weighted
from test_txt2img_sd1 import assert_images_close
from tiny_models import build_sd_folder, diffusers_pipeline

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One Numba/BLAS thread and one torch thread: on a busy 2-core machine parallel loops on two threads are many
    times slower than on one (see test_cli.py), and these models are tiny."""
    from sdgen.threads import set_threads
    torch_threads = torch.get_num_threads()
    set_threads(1)
    torch.set_num_threads(1)
    yield
    set_threads(None)
    torch.set_num_threads(torch_threads)


def _approx(parsed):
    return [(t, round(w, 6)) for t, w in parsed]


@pytest.mark.parametrize("text,expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55), (", sun, ", 1.1),
      ("sky", 1.4641), (".", 1.1)]),
    ("[faded]", [("faded", round(1 / 1.1, 6))]),
    ("a: b) c]", [("a: b) c]", 1.0)]),
    ("", [("", 1.0)]),
])
def test_parse_prompt_attention(text, expected):
    assert _approx(parse_prompt_attention(text)) == expected


def test_parse_break():
    parsed = parse_prompt_attention("a cat BREAK a (dog)")
    assert parsed[0] == ("a cat", 1.0) and parsed[1][0] is BREAK and _approx(parsed[2:]) == [("a ", 1.0), ("dog", 1.1)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = build_sd_folder(tmp_path_factory.mktemp(family), family)
        return cache[family]
    return get


@pytest.fixture(scope="module")
def sd1(tiny_sd1):
    return Pipeline.load(tiny_sd1)


def test_short_plain_prompt_is_one_chunk_of_the_tokenizer_ids(sd1):
    tok = sd1.tokenizers[0]
    prompt = "a photo of an astronaut riding a horse, 4k"
    chunks = tokenize_weighted(tok, prompt)
    assert chunks.ids.shape == (1, 77) and not chunks.weighted
    assert np.array_equal(chunks.ids[0], tok(prompt, 77))


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_plain_prompt_embeddings_are_diffusers(folders, family):
    folder = folders(family)
    ours = Pipeline.load(folder)
    prompt = "a watercolor painting of a fox in the snow"
    cond = ours.encode_prompt([prompt], ["blurry"], guided=True)
    ref, _ = diffusers_pipeline(folder)
    with torch.no_grad():
        if family == "sdxl":
            pe, ne, pp, npool = ref.encode_prompt(prompt, negative_prompt="blurry", device="cpu",
                                                  num_images_per_prompt=1, do_classifier_free_guidance=True)
            np.testing.assert_allclose(cond.pooled, np.concatenate([npool.numpy(), pp.numpy()]), rtol=1e-4,
                                       atol=1e-5)
        else:
            pe, ne = ref.encode_prompt(prompt, "cpu", 1, True, negative_prompt="blurry")
    np.testing.assert_allclose(cond.context, np.concatenate([ne.numpy(), pe.numpy()]), rtol=1e-4, atol=1e-5)
    # exactly the embeddings of the plain path: the ids the tokenizer gives, the layer diffusers takes
    enc, tok = ours.text_encoders[0], ours.tokenizers[0]
    if family != "sdxl":
        assert np.array_equal(cond.context[1], enc(tok(prompt, 77)[None]).last_hidden_state[0])


def _sd_clip_skip_embeds(ref, prompt, clip_skip):
    """What diffusers' StableDiffusionPipeline.encode_prompt(clip_skip=k) computes: hidden_states[-(k + 1)], then the
    final layer norm. (Its own code reaches the norm as ``text_encoder.text_model.final_layer_norm``, which
    transformers 5's CLIPTextModel no longer has, so the same steps are taken here directly.)"""
    ids = ref.tokenizer(prompt, padding="max_length", max_length=ref.tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
    out = ref.text_encoder(ids, output_hidden_states=True)
    return ref.text_encoder.final_layer_norm(out.hidden_states[-(clip_skip + 1)])


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_clip_skip_matches_diffusers(folders, family):
    folder = folders(family)
    ours = Pipeline.load(folder)
    prompt = "a cinematic photo of a lighthouse"
    cond = ours.encode_prompt([prompt], [None], guided=False, clip_skip=1)
    ref, _ = diffusers_pipeline(folder)
    with torch.no_grad():
        if family == "sdxl":
            pe = ref.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False,
                                   clip_skip=1)[0]
        else:
            pe = _sd_clip_skip_embeds(ref, prompt, 1)
    np.testing.assert_allclose(cond.context, pe.numpy(), rtol=1e-4, atol=1e-5)
    plain = ours.encode_prompt([prompt], [None], guided=False)
    assert np.abs(cond.context - plain.context).max() > 1e-2  # a different layer indeed


def test_clip_skip_image_matches_diffusers(tiny_sd1, sd1):
    sd1.clip_skip = 1
    try:
        ours = sd1.txt2img("a red barn", seed=4, steps=3, guidance=1.0, width=64, height=64)
    finally:
        sd1.clip_skip = 0
    import diffusers
    ref, config = diffusers_pipeline(tiny_sd1)
    ref.scheduler = diffusers.PNDMScheduler.from_config(config)
    with torch.no_grad():
        embeds = _sd_clip_skip_embeds(ref, "a red barn", 1)
    out = ref(prompt_embeds=embeds, num_inference_steps=3, guidance_scale=1.0, width=64, height=64,
              generator=torch.Generator().manual_seed(4), output_type="np")
    assert_images_close(ours, (out.images[0] * 255).round().astype(np.uint8))


def test_long_prompt_is_encoded_in_chunks(sd1):
    words = ["cat", "dog", "bird", "fish", "tree"] * 20     # 100 one-token words
    prompt = " ".join(words)
    tok = sd1.tokenizers[0]
    chunks = tokenize_weighted(tok, prompt)
    assert chunks.ids.shape == (2, 77)
    cond = sd1.encode_prompt([prompt], [None], guided=False)
    assert cond.context.shape == (1, 154, 32)
    first = sd1.encode_prompt([" ".join(words[:75])], [None], guided=False).context
    second = sd1.encode_prompt([" ".join(words[75:])], [None], guided=False).context
    # (a batch of two chunks may round differently from one chunk alone in the last bits)
    np.testing.assert_allclose(cond.context, np.concatenate([first, second], axis=1), rtol=1e-5, atol=1e-5)
    # a short negative prompt is padded with empty chunks to the prompt's length
    guided = sd1.encode_prompt([prompt], ["ugly"], guided=True)
    empty = sd1.encode_prompt([""], [None], guided=False).context
    assert guided.context.shape == (2, 154, 32)
    np.testing.assert_allclose(guided.context[0, 77:], empty[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(guided.context[1], cond.context[0], rtol=1e-5, atol=1e-5)


def test_break_starts_a_new_chunk(sd1):
    cond = sd1.encode_prompt(["a cat BREAK a dog"], [None], guided=False).context
    a = sd1.encode_prompt(["a cat"], [None], guided=False).context
    b = sd1.encode_prompt(["a dog"], [None], guided=False).context
    np.testing.assert_allclose(cond, np.concatenate([a, b], axis=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_weights_scale_tokens_and_keep_the_mean(folders, family):
    pipe = Pipeline.load(folders(family))
    plain = pipe.encode_prompt(["a cat and a dog"], [None], guided=False)
    weighted = pipe.encode_prompt(["a (cat:1.5) and a [dog]"], [None], guided=False)
    # the same tokens: "a ", "cat", " and a ", "dog" tokenise as the whole text does
    tok = pipe.tokenizers[0]
    chunks = tokenize_weighted(tok, "a (cat:1.5) and a [dog]")
    assert np.array_equal(chunks.ids[0], tok("a cat and a dog", 77))
    w = chunks.weights[0]
    assert np.allclose(w[:7], [1, 1, 1.5, 1, 1, 1 / 1.1, 1])
    widths = [enc.cfg.hidden_size for enc in pipe.text_encoders]
    start = 0
    for width in widths:       # SDXL: each encoder's part weighted and re-centred on its own
        h = plain.context[0, :, start:start + width]
        expected = h * w[:, None]
        expected = expected * (h.mean(dtype=np.float32) / expected.mean(dtype=np.float32))
        np.testing.assert_allclose(weighted.context[0, :, start:start + width], expected, rtol=1e-5, atol=1e-6)
        start += width
    if plain.pooled is not None:  # the pooled embedding is not weighted
        np.testing.assert_array_equal(weighted.pooled, plain.pooled)


def test_batch_with_different_chunk_counts(sd1):
    long_prompt = " ".join(["cat"] * 80)
    both = sd1.encode_prompt([long_prompt, "a dog"], [None, None], guided=False).context
    alone = sd1.encode_prompt(["a dog"], [None], guided=False).context
    empty = sd1.encode_prompt([""], [None], guided=False).context
    assert both.shape == (2, 154, 32)
    np.testing.assert_allclose(both[1, :77], alone[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(both[1, 77:], empty[0], rtol=1e-6, atol=1e-6)


def test_repeated_prompts_are_encoded_once_and_no_python_runs_inside_numpy(sd1, monkeypatch):
    """Each distinct 77-token chunk is encoded once, on its own, and its rows repeated where it repeats. Finding them
    runs no Python code from inside numpy's C code: np.unique(axis=0) compared rows as structured arrays, whose
    promotion calls numpy._core._internal._promote_fields, and a Ctrl-C or SIGTERM handled there came out as a
    TypeError instead of the KeyboardInterrupt sdgen stops on (seen once in test_cli's SIGTERM test)."""
    import sys

    alone = sd1.encode_prompt(["a dog"], [None], guided=False).context
    encoder = type(sd1.text_encoders[0])
    original, calls = encoder.__call__, []

    def counted(self, ids, *args, **kwargs):
        calls.append(len(ids))
        return original(self, ids, *args, **kwargs)

    monkeypatch.setattr(encoder, "__call__", counted)
    promoted = []
    sys.setprofile(lambda frame, event, arg: promoted.append(1)
                   if event == "call" and frame.f_code.co_name == "_promote_fields" else None)
    try:
        three = sd1.encode_prompt(["a dog", "a cat", "a dog"], [None] * 3, guided=False).context
    finally:
        sys.setprofile(None)
    assert not promoted
    assert calls == [1, 1]
    assert np.array_equal(three[0], alone[0]) and np.array_equal(three[2], alone[0])
    assert not np.array_equal(three[1], alone[0])


def test_long_prompt_generates(sd1):
    image = sd1.txt2img(" ".join(["a (red:1.2) circle"] * 30), negative_prompt="blurry", seed=1, steps=2,
                        guidance=7.0, width=32, height=32)
    assert image.shape == (32, 32, 3)


def test_clip_skip_too_deep_is_a_usage_error(sd1):
    from sdgen.errors import UsageError
    with pytest.raises(UsageError):
        sd1.encode_prompt(["x"], [None], guided=False, clip_skip=10)
