"""CLIP byte-level BPE tokenizer, id for id the same as ``transformers.CLIPTokenizer`` (v5).

In transformers 5 ``CLIPTokenizer`` is the Rust ``tokenizers`` pipeline (there is no separate slow/ftfy path):

1. added (special) tokens are cut out of the text first: those flagged ``normalized=False`` on the raw text,
   the others on the normalized text;
2. normalizer: NFC, every run of whitespace -> one space, lower-case (one code point at a time);
3. pre-tokenizer: the CLIP word pattern
   ``<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+``
   keeps its matches and drops the rest (whitespace); then the GPT-2 byte-level step, which maps each word's
   UTF-8 bytes to printable characters (and would split ``<|endoftext|>`` into ``<|``, ``endoftext``, ``|>``);
4. BPE on each word with ``</w>`` glued to its last symbol;
5. ``<|startoftext|>`` ids ``<|endoftext|>``, truncated to ``max_length`` and padded with the pad token.

Python's ``re`` has no ``\\p{L}``; the classes are built from :mod:`unicodedata` categories plus the code points
that the regex engine inside ``tokenizers`` (Oniguruma, Unicode 16) already knows and CPython 3.10 (Unicode 13)
does not.  In the same way the Rust lower-casing (Unicode 17) and the Rust NFC tables (Unicode 9) differ from
CPython's for a few dozen code points; small tables below make up the difference, so the result does not depend
on the Python version (3.10 - 3.13 checked).
"""

from __future__ import annotations

import functools
import gzip
import json
import re
import unicodedata
from pathlib import Path

import numpy as np

__all__ = ["CLIPTokenizer", "write_vocab_files", "bundled_vocab_path"]

_DATA = Path(__file__).resolve().parent / "data"
_BUNDLED_BPE = _DATA / "bpe_simple_vocab_16e6.txt.gz"

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
_N_MERGES = 48894  # merges lines 1..48894 of the CLIP file: 256 + 256 + 48894 + 2 = 49408 tokens
_VOCAB_SIZE = 49408


def bundled_vocab_path() -> Path:
    return _BUNDLED_BPE


# ----------------------------------------------------------------------------------------------------------------
# Unicode tables (code points in hex; "A-B" is an inclusive range).

# Letters (\p{L}) of Oniguruma's Unicode 16 tables that CPython 3.10's unicodedata (Unicode 13) does not know.
_EXTRA_LETTERS = (
    '870-887 889-88E 8B5 8C8-8C9 C5D CDD 170D 171F 1B4C 1C89-1C8A 2C2F 2C5F 9FFD-9FFF A7C0-A7C1 '
    'A7CB-A7CD A7D0-A7D1 A7D3 A7D5-A7DC A7F2-A7F4 10570-1057A 1057C-1058A 1058C-10592 10594-10595 '
    '10597-105A1 105A3-105B1 105B3-105B9 105BB-105BC 105C0-105F3 10780-10785 10787-107B0 107B2-107BA '
    '10D4A-10D65 10D6F-10D85 10EC2-10EC4 10F70-10F81 11071-11072 11075 1123F-11240 11380-11389 1138B '
    '1138E 11390-113B5 113B7 113D1 113D3 11740-11746 11AB0-11ABF 11BC0-11BE0 11F02 11F04-11F10 '
    '11F12-11F33 12F90-12FF0 1342F 13441-13446 13460-143FA 16100-1611D 16A70-16ABE 16D40-16D6C 18CFF '
    '1AFF0-1AFF3 1AFF5-1AFFB 1AFFD-1AFFE 1B11F-1B122 1B132 1B155 1DF00-1DF1E 1DF25-1DF2A 1E030-1E06D '
    '1E290-1E2AD 1E4D0-1E4EB 1E5D0-1E5ED 1E5F0 1E7E0-1E7E6 1E7E8-1E7EB 1E7ED-1E7EE 1E7F0-1E7FE '
    '2A6DE-2A6DF 2B735-2B739 2EBF0-2EE5D 31350-323AF '
)
# The same for numbers (\p{N}).
_EXTRA_NUMBERS = (
    '10D40-10D49 116D0-116E3 11BF0-11BF9 11F50-11F59 16130-16139 16AC0-16AC9 16D70-16D79 1CCF0-1CCF9 '
    '1D2C0-1D2D3 1E4F0-1E4F9 1E5F1-1E5FA '
)
# Oniguruma's and Rust's whitespace (the Unicode White_Space property); CPython's isspace() adds U+001C..U+001F.
_WHITESPACE = '9-D 20 85 A0 1680 2000-200A 2028-2029 202F 205F 3000 '
# The last letter Oniguruma's tables know; CPython's letters above it (Unicode 17+) are not \p{L} there.
_LAST_CODE_POINT = 0x323AF
# Lower-case mappings of Rust's char::to_lowercase (Unicode 17) missing from CPython 3.10: "FIRST[-LAST]:DELTA".
_EXTRA_LOWER = (
    '1C89:1 2C2F:48 A7C0:1 A7CB:-42343 A7CC:1 A7CE:1 A7D0:1 A7D2:1 A7D4:1 A7D6:1 A7D8:1 A7DA:1 '
    'A7DC:-42561 10570-1057A:39 1057C-1058A:39 1058C-10592:39 10594-10595:39 10D50-10D65:32 '
    '16EA0-16EB8:27 '
)
# Word characters of Rust's regex `\\w` (used by added tokens flagged single_word) beyond CPython 3.10's categories
# L*, M*, Nd, Nl, Pc, the join controls and the circled/squared letters, and beyond _EXTRA_LETTERS.
_EXTRA_WORD = (
    '897-89F 8CA-8D2 C3C CF3 ECE 1715 180F 1AC1-1ACE 1DFA 10D40-10D49 10D69-10D6D 10EFC-10EFF 10F82-10F85 '
    '11070 11073-11074 110C2 11241 113B8-113C0 113C2 113C5 113C7-113CA 113CC-113D0 113D2 113E1-113E2 '
    '116D0-116E3 11BF0-11BF9 11F00-11F01 11F03 11F34-11F3A 11F3E-11F42 11F50-11F5A 13440 13447-13455 '
    '1611E-16139 16AC0-16AC9 16D70-16D79 1CCF0-1CCF9 1CF00-1CF2D 1CF30-1CF46 1E08F 1E2AE 1E4EC-1E4F9 '
    '1E5EE-1E5EF 1E5F1-1E5FA '
    '200C-200D 24B6-24E9 1F130-1F149 1F150-1F169 1F170-1F189 '
)
# Code points that matter to NFC in CPython >= 3.10 but are unknown to the NFC tables of `tokenizers` (Unicode 9):
# combining marks whose combining class the Rust side takes for 0, and U+11930/U+11935 (Dives Akuru O, which
# CPython composes).  To the Rust side they are inert starters, so the text is normalized piecewise around them.
_NFC_OPAQUE = (
    '7FD 898-89F 8CA-8D3 9FE C3C D3B-D3C EBA 1715 1ABF-1ACE 1DF6-1DFA A82C 10D24-10D27 10EAB-10EAC '
    '10EFD-10EFF 10F46-10F50 10F82-10F85 11070 1133B 1145E 11839-1183A 11930 11935 1193D-1193E 11943 '
    '119E0 11A34 11A47 11A99 11D42 11D44-11D45 11D97 11F41-11F42 16FF0-16FF1 1E08F 1E130-1E136 1E2AE '
    '1E2EC-1E2EF 1E4EC-1E4EF '
)


def _parse_ranges(spec: str) -> list[tuple[int, int]]:
    out = []
    for item in spec.split():
        a, _, b = item.partition("-")
        out.append((int(a, 16), int(b or a, 16)))
    return out


def _merge_ranges(ranges) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _class_body(ranges) -> str:
    """Regex character-class body (without the brackets) for inclusive code point ranges."""
    parts = []
    for a, b in ranges:
        parts.append(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}")
    return "".join(parts)


def _category_ranges(prefix: str, extra: str) -> list[tuple[int, int]]:
    ranges = []
    start = None
    cat = unicodedata.category
    for cp in range(_LAST_CODE_POINT + 2):
        hit = cp <= _LAST_CODE_POINT and cat(chr(cp))[0] == prefix
        if hit and start is None:
            start = cp
        elif not hit and start is not None:
            ranges.append((start, cp - 1))
            start = None
    return _merge_ranges(ranges + _parse_ranges(extra))


class _Unicode:
    """The compiled patterns, built once (about 0.1 s) on first use."""

    _inst = None

    def __init__(self):
        letters = _class_body(_category_ranges("L", _EXTRA_LETTERS))
        numbers = _class_body(_category_ranges("N", _EXTRA_NUMBERS))
        spaces = _class_body(_parse_ranges(_WHITESPACE))
        self.word_re = re.compile(
            r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
            rf"|[{letters}]+|[{numbers}]|[^{spaces}{letters}{numbers}]+"
        )
        self.space_re = re.compile(f"[{spaces}]+")
        self.space_chars = frozenset(chr(c) for a, b in _parse_ranges(_WHITESPACE) for c in range(a, b + 1))
        self.opaque_re = re.compile(f"([{_class_body(_parse_ranges(_NFC_OPAQUE))}])")
        lower = {0x03A3: "\u03c3"}  # Rust lower-cases one code point at a time: no final-sigma rule
        for item in _EXTRA_LOWER.split():
            span, _, delta = item.partition(":")
            for a, b in _parse_ranges(span):
                for cp in range(a, b + 1):
                    lower[cp] = chr(cp + int(delta))
        self.lower_table = lower
        self.word_extra = frozenset(chr(c) for spec in (_EXTRA_WORD, _EXTRA_LETTERS)
                                    for a, b in _parse_ranges(spec) for c in range(a, b + 1))

    def is_word_char(self, ch: str) -> bool:
        """Rust regex's Unicode ``\\w``: what an added token flagged single_word must not touch."""
        cat = unicodedata.category(ch)
        return cat[0] in "LM" or cat in ("Nd", "Nl", "Pc") or ch in self.word_extra

    @classmethod
    def get(cls) -> "_Unicode":
        if cls._inst is None:
            cls._inst = _Unicode()
        return cls._inst


_ASCII_SPACE_RE = re.compile(r"[\t\n\x0b\x0c\r ]+")
# For ASCII text (the common case) the same patterns shrink to ASCII classes; \x1c-\x1f are not whitespace here.
_ASCII_WORD_RE = re.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\t\n\x0b\x0c\r a-z0-9]+"
)


def _nfc(text: str) -> str:
    if unicodedata.is_normalized("NFC", text) and not _Unicode.get().opaque_re.search(text):
        return text
    parts = _Unicode.get().opaque_re.split(text)  # odd indices: the opaque code points themselves
    return "".join(p if i % 2 else unicodedata.normalize("NFC", p) for i, p in enumerate(parts))


def normalize(text: str) -> str:
    """The normalizer of transformers' CLIPTokenizer: NFC, whitespace runs -> " ", lower-case."""
    if text.isascii():
        return _ASCII_SPACE_RE.sub(" ", text).lower()
    u = _Unicode.get()
    text = _nfc(text)
    text = u.space_re.sub(" ", text)
    return text.translate(u.lower_table).lower()


def pre_tokenize(normalized: str) -> list[str]:
    """Split normalized text into the words BPE sees (before the byte-level mapping)."""
    if normalized.isascii():
        words = _ASCII_WORD_RE.findall(normalized)
    else:
        words = _Unicode.get().word_re.findall(normalized)
    if BOS in words or EOS in words:  # the byte-level step's GPT-2 pattern splits these three ways
        out = []
        for w in words:
            if w == BOS or w == EOS:
                out.extend(("<|", w[2:-2], "|>"))
            else:
                out.append(w)
        words = out
    return words


# ----------------------------------------------------------------------------------------------------------------
# Vocabulary


def _byte_chars() -> list[str]:
    """CLIP/GPT-2's printable stand-in for each byte value: printable Latin-1 bytes stand for themselves, the
    others (controls, space, soft hyphen, ...) take the code points 256, 257, ... in byte order."""
    keep = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table, extra = [], 0
    for b in range(256):
        if b in keep:
            table.append(chr(b))
        else:
            table.append(chr(256 + extra))
            extra += 1
    return table


_BYTE_CHARS = _byte_chars()


@functools.lru_cache(maxsize=1)
def _bundled_merges_cached() -> tuple[str, ...]:
    with gzip.open(_BUNDLED_BPE, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1 : _N_MERGES + 1]
    if len(merges) != _N_MERGES or any(len(m.split(" ")) != 2 for m in merges):
        raise ValueError(f"{_BUNDLED_BPE}: not the CLIP BPE merges file")
    return tuple(merges)


def _bundled_merges() -> list[str]:
    """Lines 1..48894 of the bundled file (line 0 is its version header)."""
    return list(_bundled_merges_cached())


def _bundled_vocab(merges: list[str]) -> list[str]:
    # Byte tokens in CLIP's order: the printable bytes first (ascending), then the remapped ones.
    order = sorted(range(256), key=lambda b: (ord(_BYTE_CHARS[b]) >= 256, ord(_BYTE_CHARS[b])))
    base = [_BYTE_CHARS[b] for b in order]
    vocab = base + [t + "</w>" for t in base] + [m.replace(" ", "") for m in merges] + [BOS, EOS]
    assert len(vocab) == _VOCAB_SIZE == len(set(vocab))
    return vocab


def _added_token(content, special, normalized):
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False,
            "single_word": False, "special": special}


def _default_config(vocab_ids: dict[str, int], pad_token: str) -> tuple[dict, dict]:
    """tokenizer_config.json / special_tokens_map.json in the shape of the SDXL repositories' files."""
    if pad_token not in vocab_ids:
        raise ValueError(f"pad token {pad_token!r} is not in the vocabulary")
    added = {}
    if pad_token not in (BOS, EOS):
        added[str(vocab_ids[pad_token])] = _added_token(pad_token, True, False)
    added[str(vocab_ids[BOS])] = _added_token(BOS, False, True)
    added[str(vocab_ids[EOS])] = _added_token(EOS, False, False)
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [],
        "bos_token": BOS,
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": EOS,
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": EOS,
    }
    special_map = {"bos_token": BOS, "eos_token": EOS, "pad_token": pad_token, "unk_token": EOS}
    return config, special_map


def write_vocab_files(folder, pad_token: str = EOS) -> None:
    """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json for the bundled CLIP
    vocabulary; ``transformers.CLIPTokenizer.from_pretrained(folder)`` and ``CLIPTokenizer.from_folder`` load it.
    ``pad_token``: ``"<|endoftext|>"`` (SD 1.x) or ``"!"`` (SD 2.x, SDXL's second tokenizer)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = _bundled_merges()
    vocab = _bundled_vocab(merges)
    ids = {t: i for i, t in enumerate(vocab)}
    config, special_map = _default_config(ids, pad_token)
    with open(folder / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(ids, f, ensure_ascii=False)
    with open(folder / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    with open(folder / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")
    with open(folder / "special_tokens_map.json", "w", encoding="utf-8") as f:
        json.dump(special_map, f, indent=2, ensure_ascii=False)
        f.write("\n")


# ----------------------------------------------------------------------------------------------------------------
# Special-token configuration, as transformers reads it from a tokenizer folder


def _read_json(path: Path):
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_spec(value, default_normalized: bool):
    """(content, flags) from a config value: a plain string or an AddedToken dict."""
    if isinstance(value, dict):
        special = bool(value.get("special", True))
        normalized = value.get("normalized")
        flags = {
            "lstrip": bool(value.get("lstrip", False)),
            "rstrip": bool(value.get("rstrip", False)),
            "single_word": bool(value.get("single_word", False)),
            "normalized": (not special) if normalized is None else bool(normalized),
        }
        return str(value["content"]), flags
    return str(value), {"lstrip": False, "rstrip": False, "single_word": False, "normalized": default_normalized}


_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_CLIP_DEFAULTS = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}


def _resolve_added_tokens(config: dict, special_map: dict | None, added_json: dict | None, vocab: dict[str, int]):
    """-> (named special tokens {key: content}, added tokens {content: (id, flags)} in insertion order)."""
    added: dict[str, tuple[int, dict]] = {}
    next_id = max(vocab.values(), default=-1) + 1

    def token_id(content, wanted=None):
        nonlocal next_id
        if wanted is not None:
            return int(wanted)
        if content in vocab:
            return vocab[content]
        if content in added:
            return added[content][0]
        next_id += 1
        return next_id - 1

    decoder = config.get("added_tokens_decoder") or {}
    from_decoder = set()
    for key in sorted(decoder, key=int):
        content, flags = _token_spec(decoder[key], False)
        added[content] = (int(key), flags)
        from_decoder.add(content)
        next_id = max(next_id, int(key) + 1)
    if not decoder and added_json:
        for content, idx in sorted(added_json.items(), key=lambda kv: kv[1]):
            if content not in added:
                added[content] = (int(idx), {"lstrip": False, "rstrip": False, "single_word": False,
                                             "normalized": True})
                next_id = max(next_id, int(idx) + 1)

    merged = {k: v for k, v in config.items() if v is not None}
    merged.update({k: v for k, v in (special_map or {}).items() if v is not None})  # special_tokens_map.json wins
    named: dict[str, str] = {}
    specs = []
    for key in _SPECIAL_KEYS:
        value = merged.get(key, _CLIP_DEFAULTS.get(key))
        if value is None:
            continue
        content, flags = _token_spec(value, False)
        named[key] = content
        specs.append((content, flags))
    extra = merged.get("additional_special_tokens") or merged.get("extra_special_tokens") or []
    if isinstance(extra, dict):
        extra = list(extra.values())
    for value in extra:
        specs.append(_token_spec(value, False))
    for content, flags in specs:
        if content in from_decoder:
            continue  # added_tokens_decoder has the last word on its own tokens
        added[content] = (token_id(content), flags)
    return named, added


# ----------------------------------------------------------------------------------------------------------------


class CLIPTokenizer:
    """CLIP BPE tokenizer; ``tok(text)`` gives what ``transformers.CLIPTokenizer`` gives for
    ``tok(text, padding="max_length", max_length=77, truncation=True).input_ids``.

    ``model_max_length`` comes from tokenizer_config.json; where that has none (transformers then reports
    1e30) it is 77, the CLIP text encoder's context length."""

    _CACHE_LIMIT = 200_000

    def __init__(self, vocab: dict[str, int], merges: list[str], *, bos_token: str = BOS, eos_token: str = EOS,
                 pad_token: str = EOS, unk_token: str = EOS, added_tokens: dict[str, tuple[int, dict]] | None = None,
                 model_max_length: int = 77):
        self.encoder = dict(vocab)
        self.ranks: dict[tuple[str, str], int] = {}
        for i, line in enumerate(merges):
            a, b = line.split(" ")
            self.ranks.setdefault((a, b), i)
        self.added_tokens = dict(added_tokens or {})
        if not self.added_tokens:
            for content in dict.fromkeys((bos_token, eos_token, unk_token, pad_token)):
                self.added_tokens[content] = (self._id_of(content), {"lstrip": False, "rstrip": False,
                                                                     "single_word": False, "normalized": False})
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.bos_token_id = self._id_of(bos_token)
        self.eos_token_id = self._id_of(eos_token)
        self.pad_token_id = self._id_of(pad_token)
        self.unk_token_id = self._id_of(unk_token)
        self.model_max_length = int(model_max_length)
        self._raw_re = self._pattern(False)
        self._norm_re = self._pattern(True)
        self._cache: dict[str, tuple[int, ...]] = {}

    def _id_of(self, content: str) -> int:
        if content in self.added_tokens:
            return self.added_tokens[content][0]
        if content in self.encoder:
            return self.encoder[content]
        raise ValueError(f"token {content!r} is neither in the vocabulary nor an added token")

    def _pattern(self, normalized: bool):
        contents = [c for c, (_, f) in self.added_tokens.items() if f["normalized"] == normalized and c]
        if normalized:  # matched on normalized text: the token's own normalized form is what is searched for
            self._norm_contents = {normalize(c): c for c in contents}
            contents = list(self._norm_contents)
        if not contents:
            return None
        # longest first: at a given position the longest token wins (aho-corasick leftmost-longest)
        contents = sorted(set(contents), key=lambda c: (-len(c), c))
        return re.compile("|".join(re.escape(c) for c in contents))

    # ------------------------------------------------------------------------------------------------ loading

    @classmethod
    def from_folder(cls, folder) -> "CLIPTokenizer":
        """Load a diffusers ``tokenizer/`` folder (vocab.json + merges.txt, or tokenizer.json)."""
        folder = Path(folder)
        config = _read_json(folder / "tokenizer_config.json") or {}
        special_map = _read_json(folder / "special_tokens_map.json")
        added_json = _read_json(folder / "added_tokens.json")
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab = _read_json(folder / "vocab.json")
            with open(folder / "merges.txt", encoding="utf-8") as f:
                lines = f.read().split("\n")
            merges = [ln for i, ln in enumerate(lines) if ln and not (i == 0 and ln.startswith("#version"))]
        elif (folder / "tokenizer.json").is_file():
            tj = _read_json(folder / "tokenizer.json")
            vocab = tj["model"]["vocab"]
            merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
            for t in tj.get("added_tokens", []):
                config.setdefault("added_tokens_decoder", {}).setdefault(str(t["id"]), t)
        else:
            raise FileNotFoundError(f"{folder}: no vocab.json + merges.txt (or tokenizer.json)")
        return cls._from_parts(vocab, merges, config, special_map, added_json)

    @classmethod
    def default(cls, pad_token: str = EOS) -> "CLIPTokenizer":
        """The bundled CLIP vocabulary, configured as ``write_vocab_files(folder, pad_token)`` would write it."""
        merges = _bundled_merges()
        vocab = {t: i for i, t in enumerate(_bundled_vocab(merges))}
        config, special_map = _default_config(vocab, pad_token)
        return cls._from_parts(vocab, merges, config, special_map, None)

    @classmethod
    def _from_parts(cls, vocab, merges, config, special_map, added_json) -> "CLIPTokenizer":
        named, added = _resolve_added_tokens(config, special_map, added_json, vocab)
        max_len = config.get("model_max_length", 77)
        try:
            max_len = int(max_len)
        except (TypeError, ValueError, OverflowError):
            max_len = 77
        if max_len > 1_000_000:
            max_len = 77
        return cls(vocab, merges, bos_token=named["bos_token"], eos_token=named["eos_token"],
                   pad_token=named["pad_token"], unk_token=named["unk_token"], added_tokens=added,
                   model_max_length=max_len)

    # ----------------------------------------------------------------------------------------------- encoding

    def _bpe(self, word: str) -> tuple[int, ...]:
        """Ids of one pre-tokenized word (already lower-cased, before the byte mapping)."""
        symbols = [_BYTE_CHARS[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        ranks = self.ranks
        while len(symbols) > 1:
            best, best_rank = None, None
            for pair in zip(symbols, symbols[1:]):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = pair, r
            if best is None:
                break
            a, b = best
            merged, i, n = [], 0, len(symbols)
            while i < n:
                if i < n - 1 and symbols[i] == a and symbols[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        enc = self.encoder
        return tuple(enc.get(s, self.unk_token_id) for s in symbols)

    def _encode_plain(self, text: str, out: list[int]) -> None:
        """Text without added tokens: normalize, pre-tokenize, BPE."""
        normalized = normalize(text)
        pieces = [normalized]
        if self._norm_re is not None:
            pieces = self._split_added(normalized, self._norm_re, self._norm_contents)
        cache = self._cache
        for piece in pieces:
            if isinstance(piece, int):
                out.append(piece)
                continue
            for word in pre_tokenize(piece):
                ids = cache.get(word)
                if ids is None:
                    if len(cache) >= self._CACHE_LIMIT:
                        cache.clear()
                    ids = cache[word] = self._bpe(word)
                out.extend(ids)

    def _split_added(self, text: str, pattern, contents=None) -> list:
        """Cut added tokens out of text: a list of text pieces (str) and token ids (int)."""
        pieces: list = []
        pos = 0  # end of the previous piece
        for m in pattern.finditer(text):
            start, stop = m.span()
            content = contents[m.group()] if contents else m.group()
            idx, flags = self.added_tokens[content]
            if flags["single_word"]:
                u = _Unicode.get()
                if (start > 0 and u.is_word_char(text[start - 1])) or (
                        stop < len(text) and u.is_word_char(text[stop])):
                    continue
            if flags["lstrip"]:
                while start > pos and text[start - 1] in _Unicode.get().space_chars:
                    start -= 1
            if flags["rstrip"]:
                while stop < len(text) and text[stop] in _Unicode.get().space_chars:
                    stop += 1
            if start > pos:
                pieces.append(text[pos:start])
            pieces.append(idx)
            pos = stop
        if pos < len(text):
            pieces.append(text[pos:])
        return pieces

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text``: no bos/eos, no truncation."""
        out: list[int] = []
        if not text:
            return out
        pieces = [text] if self._raw_re is None else self._split_added(text, self._raw_re)
        for piece in pieces:
            if isinstance(piece, int):
                out.append(piece)
            else:
                self._encode_plain(piece, out)
        return out

    def __call__(self, text: str, max_length: int = 77) -> np.ndarray:
        """int64 (max_length,): bos, the ids truncated to max_length - 2, eos, then the pad token id."""
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        ids = self.encode(text)[: max_length - 2]
        out = np.full(max_length, self.pad_token_id, dtype=np.int64)
        out[0] = self.bos_token_id
        out[1 : len(ids) + 1] = ids
        out[len(ids) + 1] = self.eos_token_id
        return out

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def __repr__(self) -> str:
        return (f"CLIPTokenizer(vocab={len(self.encoder)}, pad={self.pad_token!r}:{self.pad_token_id}, "
                f"model_max_length={self.model_max_length})")
