"""sdgen.tokenizer against transformers' CLIPTokenizer (the Rust `tokenizers` pipeline in transformers 5).

Run: python -m pytest tests/test_tokenizer.py -q
"""

from __future__ import annotations

import json
import random
import shutil
import unicodedata

import numpy as np
import pytest

from sdgen import tokenizer as T
from sdgen.tokenizer import CLIPTokenizer, write_vocab_files

PADS = ("<|endoftext|>", "!")

# ----------------------------------------------------------------------------------------------------------------
# Corpus

HAND_WRITTEN = [
    "",
    " ",
    "\t\n  \r\n",
    "a photo of a cat",
    "a photograph of an astronaut riding a horse on mars",
    "A Photograph Of An ASTRONAUT Riding A Horse",
    "masterpiece, best quality, ultra-detailed, 8k, trending on artstation, by greg rutkowski",
    "(masterpiece:1.2), (best quality:1.1), [lowres], ((blurry)), {cute} <lora:foo_bar:0.8>",
    "((((extremely detailed)))), [[[bad hands]]], (cat:dog:0.5)",
    "portrait of a woman, (freckles:0.7), 85mm, f/1.8, bokeh, golden hour",
    "1024x768, 4k uhd, 16:9 aspect, 3.14159, -42, +7, 1e-5, 0x1F, 2024-01-31, 12:30pm, #1, 100%",
    "123456789012345678901234567890",
    "don't stop, it's fine, I'M HERE, you're, we've, they'll, he'd, ma'am, o'clock, rock'n'roll",
    "DON'T IT'S 'S 'T 'RE 'VE 'M 'LL 'D ''s '''t",
    "what?!?! no... yes!!! ok;;; --- ___ *** ~~~ ``` ''' \"\"\" ||| \\\\ // <<>> @@ $$$ ^^^ &&&",
    "hello!world?foo.bar,baz;qux:quux",
    "wow!! nice! !!! ! ! !a! a!b !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!",
    "multiple   spaces\tand\ttabs\nand\nnewlines\r\nand\x0bvertical\x0cfeeds",
    "nbsp\u00a0here, ideographic\u3000space, thin\u2009space, line\u2028sep, para\u2029sep, nel\x85x",
    "ogham\u1680space en\u2002em\u2003 narrow\u202fnbsp math\u205fspace",
    "café, naïve, résumé, crème brûlée, Ångström, Øresund, Æsir, façade, jalapeño, São Paulo",
    "CAFÉ NAÏVE ÅNGSTRÖM ÉCOLE ÑANDÚ",
    "cafe\u0301 e\u0300 a\u030a n\u0303 decomposed accents",
    "Straße STRASSE ẞ ß ǅ ǈ ǋ ﬁ ﬂ ﬃ",
    "ΟΔΟΣ Σ ΣΑΣ ὈΔΥΣΣΕΎΣ σς",
    "İstanbul ISTANBUL ıi İ i̇",
    "Москва, ПРИВЕТ мир, Ёлка",
    "東京タワー at night, 富士山, 桜の木の下で, 猫",
    "中文提示词：一只可爱的猫，高清，杰作",
    "한국어 프롬프트: 귀여운 고양이, ᄀ ᅡ ᆨ jamo",
    "ภาษาไทย สวัสดี",
    "हिन्दी: एक सुंदर बिल्ली",
    "العربية: قطة جميلة، ١٢٣",
    "עברית: חתול יפה",
    "🐱 cute cat 🐶🐕‍🦺 👩‍👩‍👧‍👦 👍🏽 🇯🇵 🏳️‍🌈 ❤️ ✨✨✨ 🔥💯",
    "emoji🙂inside🙃words",
    "ｆｕｌｌｗｉｄｔｈ ＦＵＬＬＷＩＤＴＨ １２３ ！？",
    "superscripts x² y³ ½ ¾ ⅓ Ⅻ ⅻ ① ⑳ ∞ π ∑",
    "math: ∀x∈ℝ, x²≥0 ⇒ √x ∈ ℝ₊",
    "zero\u200bwidth\u200cjoiner\u200dmarks\ufeffbom",
    "controls\x00\x01\x07\x1b\x1c\x1d\x1e\x1f\x7f\x80\x9f end",
    "ascii controls\x1c\x1d x\x1ey\x1f \x00\x7f end",
    "soft\u00adhyphen and \u00a9 \u00ae \u2122 \u00b0C",
    "private use \ue000\uf8ff and noncharacters \ufdd0\uffff",
    "astral 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝐁𝐨𝐥𝐝 𓀀 𠀀 🀄",
    "<|startoftext|>", "<|endoftext|>", "x<|endoftext|>y", "a <|startoftext|> b <|endoftext|> c",
    "<|ENDOFTEXT|> <|StartOfText|>", "<|endoftext", "endoftext|>", "<||>", "<|<|endoftext|>|>",
    "https://example.com/path?query=1&x=y#frag",
    "user@example.com, @handle, #hashtag, $100, €50, £20, ¥1000",
    "snake_case_name camelCaseName kebab-case-name PascalCase",
    "a" * 200,
    "ab" * 150,
    "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis",
    "x " * 100,
    ", ".join(["beautiful detailed landscape"] * 20),
    "(" * 40 + "deep" + ")" * 40,
    "1 2 3 4 5 6 7 8 9 0 " * 10,
]

WORDS = (
    "a the of and with in on by at from cat dog woman man girl boy portrait landscape city forest mountain river "
    "ocean sky sunset sunrise night neon cyberpunk steampunk fantasy castle dragon knight robot astronaut horse "
    "painting photo photograph illustration render concept art digital oil watercolor sketch anime manga "
    "detailed intricate sharp focus cinematic lighting volumetric octane unreal engine hdr bokeh dramatic "
    "masterpiece quality lowres blurry ugly deformed extra fingers bad anatomy watermark signature text "
    "greg rutkowski artgerm alphonse mucha studio ghibli trending artstation pixiv deviantart behance"
).split()
UNICODE_BITS = [
    "é", "ü", "ñ", "ø", "å", "ç", "ß", "Σ", "σ", "ς", "İ", "ı", "Ж", "ж", "東", "京", "猫", "タ", "ワ", "한",
    "글", "ก", "ि", "ع", "ש", "🐱", "👍🏽", "🇫🇷", "❤️", "✨", "\u0301", "\u0327", "\u200d", "\u00a0", "\u3000",
    "①", "²", "½", "Ⅻ", "𝔘", "ｆ", "！", "—", "–", "…", "“", "”", "‘", "’", "«", "»", "·", "•", "€",
]
PUNCT = list("!?.,;:'\"()[]{}<>/\\|@#$%^&*-_=+~`")
SPACES = [" ", "  ", "\t", "\n", " \n ", "\r\n", "\u00a0", "\u3000", "\u2009"]
CONTRACTIONS = ["don't", "it's", "I'M", "you're", "we've", "they'll", "she'd", "can't", "WON'T", "'s", "'t"]


def generated_prompts(n: int, seed: int = 20240611) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 40)):
            r = rng.random()
            if r < 0.55:
                w = rng.choice(WORDS)
                w = rng.choice([w, w, w.upper(), w.capitalize(), w.swapcase()])
            elif r < 0.65:
                w = f"({rng.choice(WORDS)}:{rng.choice(['0.5', '1.2', '1.25', '2', '0.8'])})"
            elif r < 0.73:
                w = rng.choice([str(rng.randint(0, 10 ** rng.randint(1, 7))), f"{rng.choice([512, 768, 1024])}x"
                                f"{rng.choice([512, 768, 1024])}", f"{rng.random() * 10:.3f}", "8k", "4K", "3d"])
            elif r < 0.80:
                w = "".join(rng.choice(PUNCT) for _ in range(rng.randint(1, 5)))
            elif r < 0.85:
                w = rng.choice(CONTRACTIONS)
            else:
                w = "".join(rng.choice(UNICODE_BITS) for _ in range(rng.randint(1, 4)))
                if rng.random() < 0.5:
                    w = rng.choice(WORDS) + w
            parts.append(w)
            parts.append(rng.choice(SPACES) if rng.random() < 0.3 else rng.choice([" ", ", ", ""]))
        if rng.random() < 0.05:
            parts.insert(rng.randrange(len(parts) + 1), rng.choice(["<|endoftext|>", "<|startoftext|>"]))
        out.append("".join(parts))
    return out


CORPUS = HAND_WRITTEN + generated_prompts(260)


# ----------------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("clip_tokenizers")
    out = {}
    for pad in PADS:
        folder = base / ("pad_eot" if pad == PADS[0] else "pad_bang")
        write_vocab_files(folder, pad_token=pad)
        out[pad] = folder
    return out


@pytest.fixture(scope="module")
def hf_tokenizers(folders):
    transformers = pytest.importorskip("transformers")
    return {pad: transformers.CLIPTokenizer.from_pretrained(str(folder)) for pad, folder in folders.items()}


def hf_ids(hf, texts, max_length=77):
    return hf(list(texts), padding="max_length", max_length=max_length, truncation=True).input_ids


def assert_same_ids(ours, hf, texts, max_length=77):
    ref = hf_ids(hf, texts, max_length)
    bad = []
    for text, r in zip(texts, ref):
        mine = ours(text, max_length=max_length)
        assert mine.dtype == np.int64 and mine.shape == (max_length,)
        if mine.tolist() != r:
            bad.append((text, r, mine.tolist()))
    assert not bad, f"{len(bad)} of {len(texts)} differ, first: {bad[0]!r}"


# ----------------------------------------------------------------------------------------------------------------
# Vocabulary files


def test_vocab_files(folders):
    vocab = json.loads((folders[PADS[0]] / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408 and sorted(vocab.values()) == list(range(49408))
    assert vocab["!"] == 0 and vocab["a</w>"] == 320
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    merges = (folders[PADS[0]] / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert merges[0].startswith("#version") and len([m for m in merges[1:] if m]) == 48894
    cfg = json.loads((folders["!"] / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["pad_token"] == "!" and cfg["model_max_length"] == 77


def test_known_ids():
    tok = CLIPTokenizer.default()
    ids = tok("a photo of a cat")
    assert ids[:7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids[7:] == 49407).all()
    bang = CLIPTokenizer.default(pad_token="!")
    assert bang.pad_token_id == 0 and bang.bos_token_id == 49406 and bang.eos_token_id == 49407
    assert (bang("a photo of a cat")[7:] == 0).all()
    assert tok.encode("") == [] and tok("").tolist()[:3] == [49406, 49407, 49407]
    assert tok.model_max_length == 77


def test_default_matches_from_folder(folders):
    for pad, folder in folders.items():
        a, b = CLIPTokenizer.default(pad_token=pad), CLIPTokenizer.from_folder(folder)
        assert (a.pad_token_id, a.bos_token_id, a.eos_token_id, a.model_max_length) == (
            b.pad_token_id, b.bos_token_id, b.eos_token_id, b.model_max_length)
        assert a.encoder == b.encoder and a.ranks == b.ranks and a.added_tokens == b.added_tokens
        for text in CORPUS[:80]:
            assert a(text).tolist() == b(text).tolist()
            assert a.encode(text) == b.encode(text)


# ----------------------------------------------------------------------------------------------------------------
# Against transformers


@pytest.mark.parametrize("pad", PADS)
def test_corpus_matches_transformers(folders, hf_tokenizers, pad):
    assert len(CORPUS) >= 300
    ours = CLIPTokenizer.from_folder(folders[pad])
    hf = hf_tokenizers[pad]
    assert (ours.pad_token_id, ours.bos_token_id, ours.eos_token_id) == (hf.pad_token_id, hf.bos_token_id,
                                                                       hf.eos_token_id)
    assert ours.model_max_length == hf.model_max_length
    assert_same_ids(ours, hf, CORPUS)
    # encode(): no bos/eos, no truncation
    for text in CORPUS[:100]:
        assert ours.encode(text) == hf(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("max_length", [2, 3, 10, 120])
def test_other_max_lengths(folders, hf_tokenizers, max_length):
    ours = CLIPTokenizer.from_folder(folders["!"])
    assert_same_ids(ours, hf_tokenizers["!"], CORPUS[:60], max_length=max_length)


def _sample_code_points(n: int, seed: int = 7) -> list[int]:
    rng = random.Random(seed)
    cps = set(rng.randrange(0, 0x3400) for _ in range(n // 2))
    cps |= set(rng.randrange(0x3400, 0x40000) for _ in range(n // 3))
    cps |= set(rng.randrange(0x40000, 0x110000) for _ in range(n // 20))
    for spec in (T._EXTRA_LETTERS, T._EXTRA_NUMBERS, T._WHITESPACE, T._NFC_OPAQUE, T._EXTRA_WORD):
        for a, b in T._parse_ranges(spec):
            cps.update((a, b, (a + b) // 2))
    for item in T._EXTRA_LOWER.split():
        for a, b in T._parse_ranges(item.partition(":")[0]):
            cps.update((a, b))
    cps.update(range(0, 0x250))
    return sorted(c for c in cps if not 0xD800 <= c < 0xE000)


def test_code_points_in_context(folders, hf_tokenizers):
    """Single code points from all over Unicode between letters, digits, punctuation, apostrophes and spaces."""
    ours = CLIPTokenizer.from_folder(folders[PADS[0]])
    backend = hf_tokenizers[PADS[0]].backend_tokenizer
    cps = _sample_code_points(5000)
    texts = [f"A{c}b {c}{c} 1{c}2 ?{c}? '{c}s {c}\u0301 {c}" for c in map(chr, cps)]
    ref = [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    bad = [(hex(cp), r, ours.encode(t)) for cp, t, r in zip(cps, texts, ref) if ours.encode(t) != r]
    assert not bad, f"{len(bad)} code points differ, first: {bad[:3]}"


# ----------------------------------------------------------------------------------------------------------------
# The Unicode tables against the Rust components they stand in for


def test_character_classes():
    from tokenizers import Regex, pre_tokenizers

    cps = [c for c in range(0x40000) if not 0xD800 <= c < 0xE000] + list(range(0xE0000, 0xE1000))
    text = "".join(map(chr, cps))

    def onig_class(pattern):
        kept = bytearray(len(text))
        for _, (a, b) in pre_tokenizers.Split(Regex(pattern), behavior="removed").pre_tokenize_str(text):
            kept[a:b] = b"\x01" * (b - a)
        return {cps[i] for i in range(len(cps)) if not kept[i]}

    def ours(ranges):
        return {c for a, b in ranges for c in range(a, b + 1)}

    assert ours(T._category_ranges("L", T._EXTRA_LETTERS)) == onig_class(r"\p{L}")
    assert ours(T._category_ranges("N", T._EXTRA_NUMBERS)) == onig_class(r"\p{N}")
    assert ours(T._parse_ranges(T._WHITESPACE)) == onig_class(r"\s")


def test_lowercase_table():
    from tokenizers import normalizers

    text = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000)
    assert text.translate(T._Unicode.get().lower_table).lower() == normalizers.Lowercase().normalize_str(text)


def test_nfc_against_rust():
    from tokenizers import normalizers

    nfc = normalizers.NFC()
    marks = [c for c in range(0x110000) if not 0xD800 <= c < 0xE000 and unicodedata.combining(chr(c))]
    cases = []
    for m in map(chr, marks):
        cases += ["x" + m + "\u0334", "x\u0301" + m, "a" + m + "\u0316\u0301", "e\u0301" + m + "\u0300"]
    for a, b in T._parse_ranges(T._NFC_OPAQUE):
        for c in range(a, b + 1):
            cases += [chr(c) + "\u0301", "e" + chr(c) + "\u0301\u0316"]
    cases += ["\U00011935\U00011930", "\u1100\u1161\u11a8", "\uac00\u11a8", "A\u030a", "\u212b", "\u0344"]
    rng = random.Random(3)
    starters = [0x61, 0x65, 0x6F, 0x55, 0x3B1, 0x415, 0x1100, 0x1161, 0x11A8, 0xAC00, 0x11935, 0x11930, 0x915]
    for _ in range(5000):
        cases.append("".join(chr(rng.choice(marks) if rng.random() < 0.6 else rng.choice(starters))
                             for _ in range(rng.randint(2, 6))))
    bad = [ascii(s) for s in cases if T._nfc(s) != nfc.normalize_str(s)]
    assert not bad, f"{len(bad)} differ, first: {bad[:3]}"


# ----------------------------------------------------------------------------------------------------------------
# Special-token configurations of real model folders


def _variant(base, folder, config, special_map=None, added_tokens=None):
    folder.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(base / name, folder / name)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if special_map is not None:
        (folder / "special_tokens_map.json").write_text(json.dumps(special_map))
    if added_tokens is not None:
        (folder / "added_tokens.json").write_text(json.dumps(added_tokens))
    return folder


def _at(content, normalized, **kw):  # the old AddedToken serialization (SD 1.x / 2.x repositories)
    return {"__type": "AddedToken", "content": content, "lstrip": kw.get("lstrip", False),
            "normalized": normalized, "rstrip": kw.get("rstrip", False), "single_word": kw.get("single_word", False)}


def _dec(content, normalized, special, **kw):  # added_tokens_decoder entries (SDXL repositories)
    return {"content": content, "lstrip": kw.get("lstrip", False), "normalized": normalized,
            "rstrip": kw.get("rstrip", False), "single_word": kw.get("single_word", False), "special": special}


SPECIAL_TEXTS = [
    "a cat", "wow!! nice!", "x<|endoftext|>y", "x  <|endoftext|>  y", "X<|ENDOFTEXT|>Y", "<|startoftext|>hi",
    "a   <|STARTOFTEXT|>   hi", "!", "a ! b !  c", "don't", "a!b", "", "a <cat-toy> on a <CAT-TOY> ",
    "<Dog> and <dog>", "<Big Dog> <big dog>", "sks dog", "asks sks, sks1 sksa _sks é\u0301sks sks\u0301 ²sks Ⅻsks",
    "<x1> foo Foo FOO", "Ångström <|endoftext|>\u0301", "tabs\t<|endoftext|>\t\tand\u3000<|startoftext|>\u3000",
]
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
VARIANTS = {
    # runwayml/stable-diffusion-v1-5 style (old AddedToken dicts, normalized=True)
    "sd15": ({"errors": "replace", "unk_token": _at(EOS, True), "bos_token": _at(BOS, True),
              "eos_token": _at(EOS, True), "pad_token": EOS, "add_prefix_space": False, "do_lower_case": True,
              "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}, None, None),
    # stabilityai/stable-diffusion-2 style
    "sd2": ({"bos_token": _at(BOS, True), "eos_token": _at(EOS, True), "unk_token": _at(EOS, True),
             "pad_token": "!", "do_lower_case": True, "model_max_length": 77}, {"pad_token": "!"}, None),
    # special_tokens_map.json overrides tokenizer_config.json
    "override": ({"pad_token": "!", "model_max_length": 77}, {"pad_token": EOS, "bos_token": _at(BOS, True)}, None),
    "map_only": ({"model_max_length": 77}, {"pad_token": "!", "eos_token": _at(EOS, True)}, None),
    # textual-inversion style added tokens
    "added_json": ({"model_max_length": 77}, None, {"<cat-toy>": 49408, "<Dog>": 49409}),
    "decoder": ({"added_tokens_decoder": {"49406": _dec(BOS, True, True), "49407": _dec(EOS, False, True),
                                          "49408": _dec("<cat-toy>", True, False),
                                          "49409": _dec("<Big Dog>", False, False),
                                          "49410": _dec("sks", True, False, single_word=True)},
                 "bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS, "model_max_length": 77},
                None, None),
    "strip": ({"added_tokens_decoder": {"49406": _dec(BOS, True, True, lstrip=True, rstrip=True),
                                        "49407": _dec(EOS, False, True, lstrip=True),
                                        "0": _dec("!", False, True, rstrip=True)},
               "bos_token": BOS, "eos_token": EOS, "pad_token": "!", "unk_token": EOS, "model_max_length": 77},
              None, None),
    "strip_old": ({"bos_token": _at(BOS, True, lstrip=True), "eos_token": _at(EOS, False, rstrip=True),
                   "pad_token": _at("!", False, lstrip=True, rstrip=True), "unk_token": EOS,
                   "model_max_length": 77}, None, None),
    "extra": ({"additional_special_tokens": ["<x1>", _at("Foo", True)], "model_max_length": 77}, None, None),
    "bare": ({}, None, None),
}


def test_special_token_configurations(folders, tmp_path):
    transformers = pytest.importorskip("transformers")
    base = folders[PADS[0]]
    for name, (config, special_map, added) in VARIANTS.items():
        folder = _variant(base, tmp_path / name, config, special_map, added)
        hf = transformers.CLIPTokenizer.from_pretrained(str(folder))
        ours = CLIPTokenizer.from_folder(folder)
        assert ours.pad_token_id == hf.pad_token_id, name
        ref = hf_ids(hf, SPECIAL_TEXTS)
        for text, r in zip(SPECIAL_TEXTS, ref):
            assert ours(text).tolist() == r, (name, text)
    # a folder written by transformers 5 itself: tokenizer.json only, no vocab.json / merges.txt
    hf = transformers.CLIPTokenizer.from_pretrained(str(tmp_path / "decoder"))
    hf.save_pretrained(str(tmp_path / "saved"))
    assert not (tmp_path / "saved" / "vocab.json").exists()
    ours = CLIPTokenizer.from_folder(tmp_path / "saved")
    hf = transformers.CLIPTokenizer.from_pretrained(str(tmp_path / "saved"))
    assert_same_ids(ours, hf, SPECIAL_TEXTS + CORPUS[:40])


def test_single_word_boundaries(folders, tmp_path):
    """Added tokens flagged single_word must not touch a word character (Rust regex's Unicode \\w)."""
    transformers = pytest.importorskip("transformers")
    folder = _variant(folders[PADS[0]], tmp_path / "sw", {"added_tokens_decoder": {
        "49408": _dec("QQ", False, False, single_word=True)}, "model_max_length": 77})
    backend = transformers.CLIPTokenizer.from_pretrained(str(folder)).backend_tokenizer
    ours = CLIPTokenizer.from_folder(folder)
    cps = _sample_code_points(2000, seed=11)
    texts = [f"QQ{c} {c}QQ" for c in map(chr, cps)]
    ref = [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    bad = [hex(cp) for cp, t, r in zip(cps, texts, ref) if ours.encode(t) != r]
    assert not bad, f"{len(bad)} differ: {bad[:10]}"

