"""``fp8-attention``: attention on Q, K, V rounded to float8 e4m3, as FlashAttention-3's FP8 path computes
it (Shah et al. 2024, "FlashAttention-3: Fast and Accurate Attention with Asynchrony and Low-precision";
Dao-AILab/flash-attention ``hopper/``).

FA3 takes e4m3 Q, K, V with one descale per (batch, KV head) each (``flash_api.cpp``: "(b, h_k), not
(b, h)"; a Q scale is shared by the query heads of a group); how the caller picks scales is its own
business. Here each scale maps the absolute maximum over the call's tokens (and, for Q, over the query
heads sharing the KV head) to 448, e4m3's largest finite value; values are rounded to the nearest
e4m3 value and dequantized. Scales cover every token a call sees (the whole cache for K and V), so a
decode step's rounding depends on the cache at that step. Teacher forcing several reference tokens in
one forward gives each query row the scales its own step would have had: Q's over its token, K's and
V's over the keys it sees (a step's call holds exactly those keys), so one forward computes what a
token-by-token decode does, in exact arithmetic. In fp32 the model's matmuls sum in another order when a
forward holds more rows (several reference tokens, several prompts), and with e4m3's 3 mantissa bits a ~1e-6
difference can carry a value across a rounding boundary: on the default model parallel and stepwise decoding
(and batches of prompts) differ at a few percent of argmaxes (benchmarks/LOG.md, "Noise floor of rounding
methods"); on the tiny test models no rounding flips.

``p_fp8``: True (default) also converts P to e4m3 before P·V, as FA3's FP8 kernel always does (its fp8
forward has no higher-precision P·V) (``softmax.h``, ``Max_offset = 8``): keys are
processed in tiles of ``kBlockN`` (FA3's sm90 fp8 tile for the head dimension, ``tile_size.h``), last
tile first; each tile's P is ``exp2(s·log2(e)·scale − (m·log2(e)·scale − 8))`` against the running row
max m, so in [0, 256], rounded to e4m3 (round to nearest even, saturating) for P·V, while the row sum
accumulates the unrounded P; the output is the rescaled accumulator over the sum. False runs dense attention
on the dequantized Q, K, V with P in float32 (fidbench's earlier default).

Differences: FA3 computes q·k on the e4m3 codes and folds the descales into the softmax scale, and
applies V's descale at the end; here the dequantized values are multiplied (the same products up to
float32 rounding). FA3 writes a bf16 output; here the output keeps the model's dtype.
"""

from __future__ import annotations

import math

import torch

from ..attention import AttentionCall
from .base import Method, register

E4M3_MAX = 448.0
FA3_OFFSET = 8.0  # softmax.h Max_offset: P in [0, 2^8]
ROWS = 256  # query rows per explicit p_fp8 product: (rows x keys) scores per head, never (n x n)
ROW_ELEMENTS = 1 << 22  # K (and V) values rounded per chunk of decode rows, each row with its own scales


def fp8_e4m3(x: torch.Tensor, groups: int = 1, per_token: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 codes, scale) of ``x`` (batch, heads, tokens, dim): x ≈ codes * scale, one scale per
    (batch, group of ``groups`` consecutive heads), shape (batch, heads, 1, 1); with ``per_token``, one per
    token too, shape (batch, heads, tokens, 1)."""
    dims = (-3, -1) if per_token else (-3, -2, -1)
    absmax = x.detach().float().abs().unflatten(1, (-1, groups)).amax(dim=dims, keepdim=True)
    return _codes(x, absmax.expand(-1, -1, groups, -1, -1).flatten(1, 2))


def _codes(x: torch.Tensor, absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = absmax.clamp(min=torch.finfo(torch.float32).tiny) / E4M3_MAX
    # The clamp only catches float error at the top of the range: e4m3fn has no inf, overflow is NaN.
    codes = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return codes, scale


def fp8_round(x: torch.Tensor, groups: int = 1, per_token: bool = False) -> torch.Tensor:
    """``x`` quantized to e4m3 with a scale per group of heads (``fp8_e4m3``) and dequantized, in ``x``'s dtype."""
    codes, scale = fp8_e4m3(x, groups, per_token)
    return (codes.float() * scale).to(x.dtype)


def fp8_round_seen(x: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """Keys or values ``x`` (batch, kv heads, kv, dim) rounded once per query row, each with the scale of the
    keys that row sees: ``seen`` (batch|1, 1|kv heads, rows, kv) -> (batch, kv heads, rows, kv, dim)."""
    absmax = torch.where(seen, x.detach().float().abs().amax(-1)[:, :, None], 0.0).amax(-1)
    codes, scale = _codes(x[:, :, None], absmax[..., None, None])
    return (codes.float() * scale).to(x.dtype)


def block_n(head_dim: int) -> int:
    """FA3's key tile for fp8 on sm90 (``tile_size_fwd_sm90``, element size 1, no paging or local window)."""
    for bound, tile in ((64, 160), (96, 128), (128, 224), (192, 160)):
        if head_dim <= bound:
            return tile
    return 128


def fp8_softmax(s: torch.Tensor, tile: int, offset: float, last_first: bool,
                p_dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, total) of an FP8 flash-attention softmax over log2-domain scores ``s`` (..., kv), -inf where a
    query does not see a key: keys in tiles of ``tile`` (``last_first``: the last tile first, as FA3; else in
    order, as SageAttention2), each tile's P = 2^(s - (m - offset)) against the running row max m, rounded to
    ``p_dtype`` (e4m3: round to nearest even, saturating), rescaled to the final max; ``total`` (..., 1) sums the
    unrounded P.
    The attention output is ``weights @ V / total`` (0 where total is 0: a row that sees no key)."""
    kv = s.shape[-1]
    tiles = math.ceil(kv / tile)
    s = torch.nn.functional.pad(s, (0, tiles * tile - kv), value=-math.inf).unflatten(-1, (tiles, tile))
    # Each tile's running max covers it and every tile processed before it.
    top = s.amax(-1)  # (..., tiles)
    running = top.flip(-1).cummax(-1).values.flip(-1) if last_first else top.cummax(-1).values
    final = running[..., :1] if last_first else running[..., -1:]
    shift = torch.where(running == -math.inf, 0.0, running - offset)  # FA3's Check_inf: a fully masked row stays 0
    p = torch.exp2(s - shift[..., None])
    # Rescaling to the final max: a tile computed against running max m is worth 2^(m - M).
    rescale = torch.exp2(torch.where(running == -math.inf, -math.inf, running - final))
    total = (p.sum(-1) * rescale).sum(-1, keepdim=True)
    weights = (p.to(p_dtype).float() * rescale[..., None]).flatten(-2)[..., :kv]
    return weights, total


def attention_p_fp8(query, key, value, visible: torch.Tensor, scaling: float, tile: int,
                    p_dtype: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
    """FA3's fp8 softmax and P·V: (batch, heads, q, dim) of query (b, h, q, d) over key/value (b, kvh, kv, d).

    ``visible`` (b|1, 1|h, q, kv) is True where a query sees a key; P is rounded to ``p_dtype``."""
    h, kvh = query.shape[1], key.shape[1]
    k = key.float().repeat_interleave(h // kvh, 1)
    v = value.float().repeat_interleave(h // kvh, 1)
    s = (query.float() @ k.transpose(-1, -2)).masked_fill(~visible, -math.inf) * (scaling * math.log2(math.e))
    weights, total = fp8_softmax(s, tile, FA3_OFFSET, last_first=True, p_dtype=p_dtype)
    return torch.where(total > 0, (weights @ v) / total, 0.0)


@register
class FP8Attention(Method):
    name = "fp8-attention"
    description = "attention on Q, K, V rounded to float8 e4m3 with per-KV-head absmax scales (FA3's FP8 path)"
    defaults_from = ("FlashAttention-3 hopper/ FP8 forward: e4m3 Q/K/V with per-KV-head descales, P rounded to e4m3 "
                     "(softmax.h Max_offset 8)")
    test_params = {"degenerate": None, "why": "the e4m3 rounding is the method", "real": {}}
    role = "kernel"
    p_fp8: bool = True

    def attend(self, call: AttentionCall):
        if call.phase.name == "decode":  # one step's query too: its scales are then those of the keys it sees
            return self._decode_rows(call)
        query, key, value = fp8_round(call.query, call.groups), fp8_round(call.key), fp8_round(call.value)
        if not self.p_fp8:
            return call.dense(query=query, key=key, value=value)
        visible = call.visible()
        # Query rows are independent: slices of ROWS rows compute the same rows as one product.
        rows = range(0, query.shape[2], ROWS)
        out = torch.cat([self._p_fp8(call, query[:, :, i : i + ROWS], key, value, visible[..., i : i + ROWS, :])
                         for i in rows], dim=2)
        return out.to(call.query.dtype).transpose(1, 2).contiguous()  # the (batch, q, heads, dim) layout

    def _p_fp8(self, call: AttentionCall, query, key, value, visible):
        scaling = call.kwargs.get("scaling") or call.query.shape[-1] ** -0.5
        return attention_p_fp8(query, key, value, visible, scaling, block_n(call.query.shape[-1]))

    def _decode_rows(self, call: AttentionCall) -> torch.Tensor:
        """Several decode queries in one call, each computed as its own decode step would: with the scales of
        its token and of the keys it sees. Rows become batch entries, so each has its own rounded K and V."""
        (b, h, n, d), (kvh, kv) = call.query.shape, call.key.shape[1:3]
        visible = call.visible()
        seen = visible if visible.shape[1] == 1 else visible.unflatten(1, (kvh, -1)).any(2)
        query = fp8_round(call.query, call.groups, per_token=True)
        step = max(1, ROW_ELEMENTS // (kvh * kv * d))
        out = []
        for i in range(0, n, step):
            rows = slice(i, i + step)
            key, value = fp8_round_seen(call.key, seen[..., rows, :]), fp8_round_seen(call.value, seen[..., rows, :])
            r = key.shape[2]
            # (batch, rows, ...) -> (batch * rows, ...): one query per batch entry.
            q = query[:, :, rows].transpose(1, 2).reshape(b * r, h, 1, d)
            key, value = (t.transpose(1, 2).reshape(b * r, kvh, kv, d) for t in (key, value))
            mask = visible[..., rows, :].expand(b, -1, -1, -1).transpose(1, 2).reshape(b * r, -1, 1, kv)
            if self.p_fp8:
                o = self._p_fp8(call, q, key, value, mask).to(call.query.dtype).transpose(1, 2)
            else:
                o = call.dense(mask=mask, query=q, key=key, value=value)
            out.append(o.reshape(b, r, h, d))
        return torch.cat(out, dim=1)  # the (batch, q, heads, dim) layout

    def kept(self) -> dict:
        return {"qkv_format": "float8_e4m3fn", "qkv_scale": "per KV head, absmax/448 over the call's tokens",
                "p_format": "float8_e4m3fn (x 2^8, FA3)" if self.p_fp8 else "float32"}
