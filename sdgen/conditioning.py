"""Prompts to the UNet's text conditioning: tokenise (with weights, in 75-token chunks), run the text encoders, take
the hidden layer the model family conditions on, weight it, and join the chunks.

Which hidden state (``clip_skip`` = how many of the last encoder layers to skip, diffusers' numbering):

    SD 1.x / 2.x   clip_skip 0: the last hidden state (after the final layer norm), as diffusers' SD pipeline
                   clip_skip k: hidden_states[-(k + 1)], then the final layer norm (diffusers' clip_skip=k)
    SDXL           hidden_states[-(k + 2)] of each encoder, no final norm, concatenated (k = 0: the penultimate)
                   the pooled embedding (second encoder, projected) is the first chunk's and is never skipped or
                   weighted

The web UIs count differently: their "clip skip 1" is no skip and "clip skip 2" skips one layer, i.e. diffusers'
``clip_skip = N - 1``; the command line's ``--clip-skip N`` takes the web UI's numbering.

Unlike diffusers, which applies ``clip_skip`` to the prompt only, the same layer is used for negative prompts (as the
web UIs and stable-diffusion.cpp do).
"""

from __future__ import annotations

import numpy as np

from .errors import UsageError
from .prompt_weights import TokenChunks, apply_weights, tokenize_weighted


def check_clip_skip(clip_skip: int | None, encoders) -> int:
    """``clip_skip`` (None -> 0) checked against the encoders' depth: UsageError when nothing would be left."""
    k = 0 if clip_skip is None else int(clip_skip)
    if k < 0:
        raise UsageError(f"clip skip must be at least 0 layers (got {k})")
    depth = min(enc.cfg.num_hidden_layers for enc in encoders)
    if k >= depth - 1:
        raise UsageError(f"clip skip of {k} layers leaves nothing of a {depth}-layer text encoder")
    return k


def _hidden(enc, ids: np.ndarray, family: str, clip_skip: int) -> tuple[np.ndarray, np.ndarray]:
    """(hidden states (N, 77, D) the family conditions on, pooled (N, P)) for token ids (N, 77)."""
    if family == "sd" and clip_skip == 0:
        out = enc(ids)
        return out.last_hidden_state, out.pooled
    out = enc(ids, output_hidden_states=True)
    if family == "sd":
        return enc.final_layer_norm(out.hidden_states[-(clip_skip + 1)]), out.pooled
    return out.hidden_states[-(clip_skip + 2)], out.pooled


def _hidden_rows(enc, ids: np.ndarray, family: str, clip_skip: int) -> tuple[np.ndarray, np.ndarray]:
    """_hidden, each distinct row of ids encoded once and on its own: a prompt's encoding is then bit for bit the
    same whatever else is in the batch (a GEMM's rounding can depend on its row count), and repeated prompts (a
    batch of one prompt, the empty chunk) cost one encoder pass."""
    # the distinct rows, found by their bytes: np.unique(axis=0) compares rows as structured arrays, and numpy turns
    # a Ctrl-C or SIGTERM that arrives meanwhile into a TypeError instead of the KeyboardInterrupt sdgen stops on
    where: dict[bytes, int] = {}
    firsts: list[int] = []
    inverse = np.empty(len(ids), dtype=np.intp)
    for n, row in enumerate(ids):
        key = row.tobytes()
        if key not in where:  # a row not seen before: encoded, as unique row len(firsts)
            where[key] = len(firsts)
            firsts.append(n)
        inverse[n] = where[key]
    unique = ids[firsts]
    outs = [_hidden(enc, unique[i:i + 1], family, clip_skip) for i in range(len(unique))]
    hidden = np.concatenate([h for h, _ in outs])[inverse]
    pooled = None if outs[0][1] is None else np.concatenate([p for _, p in outs])[inverse]
    return hidden, pooled


def encode_texts(tokenizers, encoders, family: str, prompts: list[str],
                 clip_skip: int = 0) -> tuple[np.ndarray, np.ndarray | None, list[int]]:
    """Encode prompts (with the weighting syntax, any length).

    Returns ``(context (B, 77 * C, D), pooled (B, P) or None, chunks per prompt)`` where C is the largest chunk
    count among the prompts: shorter prompts are padded with the encoding of an empty chunk, as the web UI does.
    """
    per_encoder, pooled = [], None
    counts = None
    for tok, enc in zip(tokenizers, encoders):
        chunk_tokens = enc.cfg.max_position_embeddings - 2
        tokenized: list[TokenChunks] = [tokenize_weighted(tok, p, chunk_tokens) for p in prompts]
        counts = [len(t.ids) for t in tokenized]
        most = max(counts)
        empty = tokenize_weighted(tok, "", chunk_tokens)
        ids = np.concatenate([t.ids for t in tokenized]
                             + ([empty.ids] if most > min(counts) else []))
        hidden, pool = _hidden_rows(enc, ids, family, clip_skip)
        rows, start = [], 0
        for t, n in zip(tokenized, counts):
            h = hidden[start:start + n]
            if t.weighted:
                h = apply_weights(h, t.weights)
            if n < most:
                h = np.concatenate([h] + [hidden[-1:]] * (most - n))
            rows.append(h.reshape(-1, h.shape[-1]))
            start += n
        per_encoder.append(np.stack(rows))
        if family == "sdxl" and enc.text_projection is not None:
            first = np.cumsum([0] + counts[:-1])
            pooled = pool[first]
    return np.concatenate(per_encoder, axis=-1), pooled, counts


def pad_chunks(context: np.ndarray, length: int, empty_chunk: np.ndarray) -> np.ndarray:
    """``context`` (B, L, D) extended to ``length`` positions with copies of ``empty_chunk`` (77, D), so that prompts
    and negative prompts of different chunk counts can share one UNet batch."""
    missing = (length - context.shape[1]) // empty_chunk.shape[0]
    if missing <= 0:
        return context
    pad = np.broadcast_to(np.tile(empty_chunk, (missing, 1)), (context.shape[0], missing * empty_chunk.shape[0],
                                                               empty_chunk.shape[1]))
    return np.concatenate([context, pad], axis=1)
