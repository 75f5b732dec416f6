"""Prompt weighting and long prompts, in the syntax of the AUTOMATIC1111 web UI (which stable-diffusion.cpp follows).

Syntax::

    (word)         weight x 1.1          ((word)) x 1.21, and so on
    [word]         weight / 1.1
    (word:1.3)     weight x 1.3          (several words:0.8) as well; nesting multiplies
    \\( \\) \\[ \\]   literal brackets      \\\\ a literal backslash
    BREAK          ends the current 75-token chunk (the rest starts a new one)

An unclosed ``(`` or ``[`` applies to the rest of the prompt; a stray ``)`` or ``]`` is kept as text.

Long prompts: the text is tokenised fragment by fragment, each token carrying its fragment's weight, and the tokens
are cut into chunks of 75. Each chunk becomes a 77-token sequence (start token, 75 tokens padded with the end token,
end token; OpenCLIP tokenizers then pad after the first end token with their own pad token, as the plain tokenizer
does) and is encoded separately; the hidden states of the chunks are concatenated along the sequence (77 x chunks).
Unlike the web UI there is no "comma backtracking" (moving the words after the last comma into the next chunk).

Weights (as the web UI does): each chunk's hidden states are multiplied per token by its weight, then scaled back so
that their mean is what it was before weighting. The mean is taken per prompt and chunk, not over the batch as the
web UI does, so that an image is the same alone or in a batch. A prompt of at most 75 tokens without weighting
syntax is one chunk of exactly the ids diffusers' tokenizer gives, and gets exactly diffusers' embeddings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

CHUNK_TOKENS = 75          # tokens of text per chunk; + start and end tokens = the encoders' 77 positions
ROUND_FACTOR = 1.1         # ( ) multiplies, [ ] divides by this

# One lexical item of the prompt syntax, in priority order (the first alternative that matches wins).
_LEXER = re.compile(r"""
    \\[()\[\]\\]              # an escaped bracket or backslash
  | \\                        # a lone backslash: text
  | \(                        # open round
  | \[                        # open square
  | :\s*([+-]?[.\d]+)\s*\)    # ":1.3)" closes a round bracket with an explicit weight
  | \)                        # close round
  | \]                        # close square
  | [^\\()\[\]:]+             # plain text
  | :                         # a colon that is not a weight: text
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
BREAK = object()  # marker fragment: start a new chunk


def parse_prompt_attention(text: str) -> list[tuple[object, float]]:
    """The prompt as ``[(text, weight), ...]``: fragments with their weights, neighbours of equal weight merged.

    ``BREAK`` appears as the fragment ``(prompt_weights.BREAK, -1.0)``. An empty prompt is ``[("", 1.0)]``.
    """
    fragments: list[list] = []          # [text, weight]
    open_round: list[int] = []          # index in fragments where each open "(" starts
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for frag in fragments[start:]:
            if frag[0] is not BREAK:
                frag[1] *= factor

    for m in _LEXER.finditer(text):
        item, weight = m.group(0), m.group(1)
        if item.startswith("\\") and len(item) == 2:
            fragments.append([item[1], 1.0])
        elif item == "(":
            open_round.append(len(fragments))
        elif item == "[":
            open_square.append(len(fragments))
        elif weight is not None and open_round:
            try:
                factor = float(weight)
            except ValueError:  # "(a:1.2.3)": not a number, the text stays as it is
                fragments.append([item, 1.0])
            else:
                scale_from(open_round.pop(), factor)
        elif item == ")" and open_round:
            scale_from(open_round.pop(), ROUND_FACTOR)
        elif item == "]" and open_square:
            scale_from(open_square.pop(), 1 / ROUND_FACTOR)
        else:
            for i, part in enumerate(_BREAK.split(item)):
                if i > 0:
                    fragments.append([BREAK, -1.0])
                fragments.append([part, 1.0])
    for start in open_round:
        scale_from(start, ROUND_FACTOR)
    for start in open_square:
        scale_from(start, 1 / ROUND_FACTOR)

    merged: list[list] = []
    for frag in fragments:
        if (merged and frag[0] is not BREAK and merged[-1][0] is not BREAK and merged[-1][1] == frag[1]):
            merged[-1][0] += frag[0]
        else:
            merged.append(frag)
    if not merged:
        merged = [["", 1.0]]
    return [(t, w) for t, w in merged]


@dataclass
class TokenChunks:
    """A prompt as encoder input: ``ids`` (chunks, 77) int64 and ``weights`` (chunks, 77) float32."""

    ids: np.ndarray
    weights: np.ndarray

    @property
    def weighted(self) -> bool:
        return bool(np.any(self.weights != 1.0))


def tokenize_weighted(tokenizer, text: str, chunk_tokens: int = CHUNK_TOKENS) -> TokenChunks:
    """Parse ``text`` (see the module docstring), tokenise it and cut it into chunks of ``chunk_tokens`` tokens,
    each framed by the start and end tokens and padded as the plain tokenizer pads a short prompt."""
    chunks: list[tuple[list[int], list[float]]] = []
    tokens: list[int] = []
    weights: list[float] = []

    def close_chunk() -> None:
        nonlocal tokens, weights
        chunks.append((tokens, weights))
        tokens, weights = [], []

    for fragment, weight in parse_prompt_attention(text):
        if fragment is BREAK:
            close_chunk()
            continue
        for token in tokenizer.encode(fragment):
            if len(tokens) == chunk_tokens:
                close_chunk()
            tokens.append(token)
            weights.append(weight)
    if tokens or not chunks:
        close_chunk()

    length = chunk_tokens + 2
    ids = np.full((len(chunks), length), tokenizer.pad_token_id, dtype=np.int64)
    w = np.ones((len(chunks), length), dtype=np.float32)
    for i, (chunk, chunk_weights) in enumerate(chunks):
        # start, tokens, end, then the tokenizer's pad token (the end token for OpenAI CLIP, "!" for OpenCLIP): the
        # layout the plain tokenizer gives a short prompt, and what the web UI feeds each chunk
        ids[i, 0] = tokenizer.bos_token_id
        ids[i, 1:len(chunk) + 1] = chunk
        ids[i, len(chunk) + 1] = tokenizer.eos_token_id
        w[i, 1:len(chunk) + 1] = chunk_weights
    return TokenChunks(ids, w)


def apply_weights(hidden: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Hidden states (chunks, 77, D) of one prompt times per-token weights (chunks, 77), each chunk then rescaled
    to its original mean (the web UI's emphasis). Unweighted chunks are returned as they are."""
    out = np.array(hidden, dtype=np.float32, copy=True)
    for i in range(out.shape[0]):
        if np.all(weights[i] == 1.0):
            continue
        original_mean = out[i].mean(dtype=np.float32)
        out[i] *= weights[i][:, None]
        new_mean = out[i].mean(dtype=np.float32)
        out[i] *= np.float32(original_mean / new_mean)
    return out
