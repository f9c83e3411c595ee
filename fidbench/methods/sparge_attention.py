"""``sparge-attention``: SpargeAttn's block-sparse attention on top of SageAttention's quantization (Zhang
et al. 2025, "SpargeAttn: Accurate Sparse Attention Accelerating Any Model Inference"), after the
reference code thu-ml/SpargeAttn (``spas_sage_attn/utils.py :: get_block_map_meansim_fuse_quant``, called
through ``core.py :: spas_sage2_attn_meansim_cuda`` with simthreshd1=0.6, cdfthreshd=0.98 by the original
fidbench scripts).

P·V (``pv``): ``"fp8"`` (default) is what ``spas_sage2_attn_meansim_cuda`` runs on sm89 and sm90 (the GPUs
the field benchmarks on): V quantized to e4m3 per (batch, KV head, channel) with scale absmax / 2.25
(``fused.scale_fuse_quant_cuda``), P per key tile rounded to e4m3 after scaling by 2^8.807 against the
running row max (``qk_int8_sv_f8_accum_f32_block_sparse_attn``; ``sage_attention``'s ``v_fp8_max``), the
row sum over the unrounded P; ``"fp16"`` is its sm80/sm86 kernel's (``qk_int8_sv_f16_accum_f16``, here
accumulated in fp32), fidbench's earlier default.

Queries are cut into blocks of ``block_q`` tokens and keys into blocks of ``block_k`` (SageAttention's
quantization blocks, fidbench/methods/sage_attention.py, whose INT8 Q·Kᵀ, fp32 softmax and P·V
then compute the kept blocks). For every head, a block is self-similar when the mean cosine
similarity of its token pairs (itself included) exceeds ``simthreshd1`` (keys smoothed by their mean
first, as SageAttention's ``smooth_k``). Each query block's mean query against every key block's mean
key (times the attention scale) gives a softmax over the key blocks the mask lets it see, self-similar
ones only; the highest-scoring key blocks are kept while their cumulative share stays within
``cdfthreshd`` (at least one), every other key block is skipped. Blocks that are not self-similar are
always computed: a non-self-similar key block for every query block, every key block for a
non-self-similar query block. Inside kept blocks the model's own mask applies element by element
(causality, windows, padding); a query that would then see no key at all gets the key block holding
its own position added to its query block's. ``kept()`` reports ``blocks_skipped``, the fraction of
(head, query block, key block) pairs the mask allows that were skipped, over the attention calls the
predictor ran on.

Decode: ``decode: "dense"`` (default) runs decode steps with sage-attention over every key, as the
reference cannot do otherwise (its kernels assert at least 128 queries). ``decode: "sparse"`` runs the
predictor on decode calls too, the queries present forming the query blocks (one query per block in
a stepwise decode). With dense decode the method teacher-forces in one forward, as sage-attention does;
sparse decode runs stepwise: its predictor makes blocks of the queries a call holds, one per step.

Differences from the reference:
- element-wise causal (and window, padding) masking inside kept blocks: the reference's Sage2 entry
  points pass is_causal=False to the kernel and rely on the block map alone, so queries of a diagonal
  block also see the later keys of that block; the added own-position block for a query left without
  keys has no counterpart there (its causal Sage1 kernel divides 0 by 0 for such a query);
- a last, partial block is judged on its own tokens (mean over its true length, as the kernel's
  ``BS_`` intends); the kernel's zero-padded rows make its similarity NaN, so there it always counts as
  not self-similar;
- the block-level causal map is derived from the model's mask (a key block is visible to a query block
  if any of its keys is visible to any of its queries), which for a causal prefill is the reference's
  rule "the key block starts before the query block ends"; block scores use the model's attention
  scale (the reference uses head_dim^-0.5, the same for every family here but Gemma 3);
- blocks of 128 queries × 64 keys, the reference's on sm80/sm89 and its Sage1 path (sm90 uses 64 × 128);
- similarities in fp32 (the reference: fp16 normalized rows); the P·V skip stage (``pvthreshd``=50) is
  not simulated: it skips blocks whose every score is 50 log2-units below the running maximum, whose
  probabilities (< 2^-50 of the row's largest) P·V's fp16 or e4m3 rounds to zero and whose share of the
  softmax sum is below fp32 resolution; ``topk`` selection and ``attention_sink`` (both off in the
  reference's call) are not provided.
"""

from __future__ import annotations

from typing import Literal

import torch

from ..attention import AttentionCall
from .base import register
from .sage_attention import SageAttention, _visible_rows, sage_attention, sage_decode


def self_similar(x: torch.Tensor, block: int, threshold: float) -> torch.Tensor:
    """(..., blocks) bool: the mean pairwise cosine similarity of each block's tokens of ``x`` (..., n, d) > threshold.

    The mean over all n² ordered pairs, i = j included, is |Σ x_i/|x_i||² / n².
    """
    n = x.shape[-2]
    units = torch.nn.functional.normalize(x.float(), dim=-1)
    sums = torch.nn.functional.pad(units, (0, 0, 0, -n % block)).unflatten(-2, (-1, block)).sum(-2)
    sizes = torch.full((sums.shape[-2],), block, device=x.device, dtype=torch.float32)
    sizes[-1] = n - block * (sums.shape[-2] - 1)
    return sums.square().sum(-1) / sizes.square() > threshold


def block_means(x: torch.Tensor, block: int) -> torch.Tensor:
    """(..., blocks, d): the mean token of each block of ``x`` (..., n, d), a last partial block over its own tokens."""
    n = x.shape[-2]
    sums = torch.nn.functional.pad(x.float(), (0, 0, 0, -n % block)).unflatten(-2, (-1, block)).sum(-2)
    sizes = torch.full((sums.shape[-2], 1), block, device=x.device, dtype=torch.float32)
    sizes[-1] = n - block * (sums.shape[-2] - 1)
    return sums / sizes


@register
class SpargeAttention(SageAttention):
    name = "sparge-attention"
    description = ("SpargeAttn: key blocks skipped by a mean-pooled Q·K prediction (`cdfthreshd`, `simthreshd1`), "
                   "on SageAttention's INT8 Q·K")
    defaults_from = ("thu-ml/SpargeAttn core.py spas_sage2_attn_meansim_cuda as the original fidbench scripts call "
                     "it: simthreshd1 0.6, cdfthreshd 0.98, blocks 128 x 64 (sm80/sm89), FP8 P·V with V scaled to "
                     "2.25 (sm89/sm90)")
    test_params = {"degenerate": None, "why": "on top of sage-attention's INT8 Q·K, no lossless setting; "
                   "simthreshd1 > 1 (no block self-similar) equals sage-attention (tests/test_sparge_attention.py)",
                   "real": {"block_q": 8, "block_k": 8, "simthreshd1": -1.0, "cdfthreshd": 0.5, "decode": "sparse"}}
    simthreshd1: float = 0.6
    cdfthreshd: float = 0.98
    decode: Literal["dense", "sparse"] = "dense"
    pv: Literal["fp16", "fp8"] = "fp8"
    v_fp8_max = 2.25  # core.py spas_sage2_attn_meansim_cuda: scale_fuse_quant_cuda(..., 2.25, ...) (448 commented out)

    @property
    def parallel_exact(self) -> bool:
        """parallel with decode: dense, stepwise with decode: sparse"""
        return self.decode == "dense"

    def validate(self):
        super().validate()
        if not 0 <= self.cdfthreshd <= 1:
            raise ValueError(f"sparge-attention: cdfthreshd must be in [0, 1], got {self.cdfthreshd}")

    def attend(self, call: AttentionCall):
        if call.phase.name == "decode" and self.decode == "dense":
            return super().attend(call)
        scaling = call.kwargs.get("scaling")
        if scaling is None:
            scaling = call.query.shape[-1] ** -0.5
        query, key, groups = call.query, call.key, call.groups
        q_len, kv = query.shape[-2], key.shape[-2]
        k = key.float() - key.float().mean(dim=-2, keepdim=True) if self.smooth_k else key.float()
        k_means = block_means(k, self.block_k).repeat_interleave(groups, dim=1)  # (b, h, key blocks, d)
        k_sim = self_similar(k, self.block_k, self.simthreshd1).repeat_interleave(groups, dim=1)  # (b, h, key blocks)
        model_rows = _visible_rows(call)
        counts = []

        def rows(start, stop):
            """The model's mask of query rows start..stop (one query block) restricted to the kept key blocks."""
            visible = model_rows(start, stop)  # (b|1, 1|h, rows, kv)
            q = query[:, :, start:stop]
            q_sim = self_similar(q, stop - start, self.simthreshd1)  # (b, h, 1)
            allowed = torch.nn.functional.pad(visible, (0, -kv % self.block_k)).unflatten(-1, (-1, self.block_k))
            allowed = allowed.any(-1).any(-2)  # (b|1, 1|h, key blocks)
            scores = (block_means(q, stop - start) @ k_means.transpose(-1, -2))[..., 0, :] * scaling
            share = torch.softmax(scores.masked_fill(~(allowed & k_sim), -torch.inf), dim=-1).nan_to_num(0.0)
            ordered, order = share.sort(dim=-1, descending=True)
            take = ordered.cumsum(-1) <= self.cdfthreshd
            take[..., 0] = True
            selected = torch.zeros_like(take).scatter(-1, order, take)
            keep = (selected | ~k_sim | ~q_sim) & allowed  # (b, h, key blocks)
            # A row that sees no key of the kept blocks (only under the element-wise mask) gets the block
            # of its own key, the key at its position (keys run contiguously up to the last query).
            seen = visible & keep.repeat_interleave(self.block_k, dim=-1)[..., None, :kv]
            empty = visible.any(-1) & ~seen.any(-1)  # (b, h, rows)
            own = (torch.arange(start, stop, device=query.device) + kv - q_len) // self.block_k
            blocks = torch.arange(keep.shape[-1], device=query.device)
            keep = keep | (empty[..., None] & (own[:, None] == blocks)).any(-2)
            counts.append((keep.sum(), allowed.expand_as(keep).sum()))
            return visible & keep.repeat_interleave(self.block_k, dim=-1)[..., None, :kv]

        if call.phase.name == "decode":  # sage-attention's decode statistics, over the kept blocks only
            out = sage_decode(query, key, call.value, call.visible(), scaling, self.block_k, self.bits, self.smooth_k,
                              attend=rows(0, q_len), v_fp8_max=self.fp8_max)
        else:
            out = sage_attention(query, key, call.value, rows, scaling, self.block_q, self.block_k, self.bits,
                                 self.smooth_k, v_fp8_max=self.fp8_max)
        self.record(call.layer_idx, sum(c[0] for c in counts), sum(c[1] for c in counts))
        return out.transpose(1, 2).contiguous()  # the (batch, q, heads, dim) layout attention functions return

    def kept(self) -> dict:
        if not self._kept:
            return {"qk_bits": self.bits, "pv_dtype": self.pv, "blocks_skipped": None}
        layers = sorted(self._kept)
        counts = [(float(self._kept[i][0]), float(self._kept[i][1])) for i in layers]
        kept, allowed = sum(k for k, _ in counts), sum(a for _, a in counts)
        return {
            "qk_bits": self.bits,
            "pv_dtype": self.pv,
            "blocks_skipped": 1 - kept / allowed if allowed else 0.0,
            "blocks_skipped_per_layer": [1 - k / max(a, 1.0) for k, a in counts],
        }
