"""Masking equals physical eviction, for every KV method, over 20 decode steps.

Each method runs as fidbench runs it (masks over a full cache, parallel where it claims to be exact).
Next to it the same tiny model decodes token by token with a physical cache: per query head, a list
of the keys and values it holds, gathered from the method's prefill choice (positions kept: keys are
cached after RoPE), appended one token per step and, for the methods that evict while decoding, cut
by the paper's own rule written here for a physical cache (H2O's heavy hitters, TOVA's least attended,
StreamingLLM's rolling window, Quest's pages, KIVI's quantized chunks). Attention over that cache is
plain softmax over what it holds, without masks. The logits must match.
"""

import math

import pytest
import torch
from helpers import tiny_model
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from fidbench import attention, engine
from fidbench.methods import REGISTRY, build
from fidbench.methods._weights import fake_quant

P, N = 40, 21  # a 40-token prompt and 20 decode steps
NAME = "fidbench_physical_test"
CASES = {
    "snapkv": ("snapkv", {"budget": 12, "window": 4, "kernel": 3}),
    "snapkv-kv_head": ("snapkv", {"budget": 12, "window": 4, "kernel": 3, "granularity": "kv_head", "pooling": "avg"}),
    "pyramidkv": ("pyramidkv", {"budget": 14, "window": 2, "kernel": 3, "beta": 4}),
    "knorm": ("knorm", {"budget": 12}),
    "random": ("random", {"budget": 12, "seed": 3}),
    "adakv": ("adakv", {"budget": 12, "scorer_params": {"window": 4, "kernel": 3}}),
    "adakv-knorm": ("adakv", {"budget": 12, "scorer": "knorm", "alpha_safeguard": 0.5}),
    "streamingllm": ("streamingllm", {"budget": 12}),
    "streamingllm-windowed": ("streamingllm", {"budget": 12, "prefill": "windowed"}),
    "quest": ("quest", {"budget": 8, "page": 4, "dense_layers": 1}),  # 2 pages by budget, 3 by the minimum
    "h2o": ("h2o", {"budget": 12}),
    "h2o-query_head": ("h2o", {"budget": 12, "recent": 0.25, "granularity": "query_head"}),
    "tova": ("tova", {"budget": 12}),
    "kivi": ("kivi", {"bits": 2, "group": 4, "residual": 8}),
}


KV = sorted(name for name, cls in REGISTRY.items() if cls.full_attention_only)


def test_every_kv_method_is_checked_here_or_says_why_not():
    checked = {method for method, _ in CASES.values()}
    for name in KV:
        why = REGISTRY[name].not_physically_checked
        assert (name in checked) != bool(why), (
            f"KV method {name!r}: add a case to CASES or say why not in its not_physically_checked" if not why
            else f"KV method {name!r} is in CASES yet says it is not checked here: {why}")


def softmax_attend(q, keys, values, scale):
    """One query head (d,) over the (n, d) keys and values it holds: the output and the probabilities."""
    probs = ((keys @ q) * scale).softmax(-1)
    return probs @ values, probs


class Heads:
    """A layer's physical cache: per query head, the positions, keys and values it holds (ascending)."""

    def __init__(self, keys, values, keep, heads):
        """From the full prompt cache (kvh, n, d) and a (1|kvh|heads, n) choice (None: everything)."""
        groups = heads // keys.shape[0]
        self.pos, self.k, self.v = [], [], []
        for h in range(heads):
            row = None if keep is None else keep[h * keep.shape[0] // heads]
            index = torch.arange(keys.shape[1]) if row is None else row.nonzero()[:, 0]
            self.pos.append(index)
            self.k.append(keys[h // groups, index])
            self.v.append(values[h // groups, index])

    def append(self, k_new, v_new, position):
        groups = len(self.k) // k_new.shape[0]
        for h in range(len(self.k)):
            self.pos[h] = torch.cat([self.pos[h], torch.tensor([position])])
            self.k[h] = torch.cat([self.k[h], k_new[h // groups, None]])
            self.v[h] = torch.cat([self.v[h], v_new[h // groups, None]])

    def drop(self, h, entry):
        keep = torch.arange(len(self.pos[h])) != entry
        self.pos[h], self.k[h], self.v[h] = self.pos[h][keep], self.k[h][keep], self.v[h][keep]

    def attend(self, q, scale):
        outs, probs = zip(*(softmax_attend(q[h], self.k[h], self.v[h], scale) for h in range(len(self.k))))
        return torch.stack(outs), list(probs)


class Pruned:
    """Eviction once after the prefill (snapkv, pyramidkv, knorm, random, adakv, dense streamingllm): the
    method's kept positions gathered, then every generated token appended."""

    def __init__(self, method, cache, heads):
        self.method = method
        self.layers = {i: Heads(layer.keys[0], layer.values[0], self.choice(i), heads)
                       for i, layer in enumerate(cache.layers)}

    def choice(self, layer):
        keep = self.method.keep[layer]
        return None if keep is None else keep[0]

    def step(self, layer, q, k_new, v_new, position, scale):
        cache = self.layers[layer]
        cache.append(k_new, v_new, position)
        out, probs = cache.attend(q, scale)
        self.evict(layer, cache, probs)
        return out

    def evict(self, layer, cache, probs):
        pass


def units(method, heads, groups):
    """The head sets that decide together at the method's granularity."""
    return {"query_head": [[h] for h in range(heads)], "layer": [list(range(heads))],
            "kv_head": [list(range(g * groups, (g + 1) * groups)) for g in range(heads // groups)]}[method.granularity]


class HeavyHitters(Pruned):
    """H2O's real-drop cache: accumulated attention per entry; over budget, the lowest-scoring entry
    outside the last ``recent`` ones goes (FMInference/H2O ``H2OKVCache_LayerWise``)."""

    def __init__(self, method, cache, heads):
        super().__init__(method, cache, heads)
        groups = heads // cache.layers[0].keys.shape[1]
        self.units = units(method, heads, groups)
        self.scores = {}
        for layer, c in self.layers.items():
            score = method.score[layer][0]  # (units, prompt): the prefill's column sums
            self.scores[layer] = [score[u][c.pos[unit[0]]] for u, unit in enumerate(self.units)]

    def evict(self, layer, cache, probs):
        size, recent = self.method.tokens(P), self.method.recent_tokens
        for u, unit in enumerate(self.units):
            score = torch.cat([self.scores[layer][u], torch.zeros(1)]) + torch.stack([probs[h] for h in unit]).mean(0)
            if len(score) > size:
                victim = int(score[: len(score) - recent].argmin())
                score = torch.cat([score[:victim], score[victim + 1 :]])
                for h in unit:
                    cache.drop(h, victim)
            self.scores[layer][u] = score


class Tova(Pruned):
    """TOVA's cache: over budget, the entry the current query attends to least, averaged over every head
    of the layer, goes from every head (schwartz-lab-NLP/TOVA ``TOVACache.reduce``)."""

    def evict(self, layer, cache, probs):
        if len(probs[0]) > self.method.tokens(P):
            victim = int(torch.stack(probs).mean(0).argmin())
            for h in range(len(probs)):
                cache.drop(h, victim)


class Rolling(Pruned):
    """StreamingLLM's perplexity protocol: the prompt fed one token at a time into a cache that keeps the
    first ``sink`` and the most recent entries, each query seeing at most ``budget`` (itself included)."""

    def __init__(self, method, heads):
        self.method, self.layers, self.heads = method, {}, heads

    def step(self, layer, q, k_new, v_new, position, scale):
        if layer not in self.layers:
            empty = torch.zeros(k_new.shape[0], 0, k_new.shape[-1])
            self.layers[layer] = Heads(empty, empty, None, self.heads)
        cache, n = self.layers[layer], self.method.tokens(P)
        sink = min(self.method.sink, n - 1)
        cache.append(k_new, v_new, position)
        if len(cache.pos[0]) > n:
            for h in range(self.heads):
                cache.drop(h, sink)
        return cache.attend(q, scale)[0]


class Pages(Pruned):
    """Quest's evaluation code, one query at a time: the cache keeps everything; each query head attends to
    the ``min(max(3, min(t + 1, budget) // page), pages)`` pages whose bound sum_d |q_d| max(sign(q_d) k_d)
    is highest, over pages aligned to position 0 (the last one partial)."""

    def choice(self, layer):
        return None

    def step(self, layer, q, k_new, v_new, position, scale):
        cache = self.layers[layer]
        cache.append(k_new, v_new, position)
        if layer < self.method.dense_layers:
            return cache.attend(q, scale)[0]
        page, budget = self.method.page, self.method.tokens(P)
        outs = []
        for h in range(len(cache.k)):
            keys, n = cache.k[h], len(cache.k[h])
            pages = math.ceil(n / page)
            sign = torch.where(q[h] > 0, 1.0, -1.0)
            padded = torch.cat([keys * sign, torch.full((pages * page - n, keys.shape[1]), -math.inf)])
            bound = (q[h].abs() * padded.view(pages, page, -1).amax(1)).sum(-1)
            chosen = bound.topk(min(max(3, min(n, budget) // page), pages)).indices
            index = (chosen[:, None] * page + torch.arange(page)).flatten()
            index = index[index < n]
            outs.append(softmax_attend(q[h], keys[index], cache.v[h][index], scale)[0])
        return torch.stack(outs)


class Kivi:
    """KIVI's cache (jy-yuan/KIVI ``LlamaAttention_KIVI``): keys in a full-precision residual quantized as one
    chunk of ``residual`` tokens once full, values in a full-precision window whose oldest entry is quantized
    once it holds more than ``residual``; each step appends, attends, then quantizes."""

    def __init__(self, method, cache, heads):
        self.method, self.groups, self.layers = method, heads // cache.layers[0].keys.shape[1], {}
        r = method.residual
        for i, layer in enumerate(cache.layers):
            keys, values = layer.keys[0], layer.values[0]  # (kvh, P, d)
            split = P - P % r  # whole chunks of the prompt are quantized
            k_quant = self.quant_keys(keys[:, :split])
            v_split = max(P - r, 0)  # values: the last `residual` stay full
            v_quant = fake_quant(values[:, :v_split], method.bits, method.group, False)
            self.layers[i] = [k_quant, keys[:, split:], v_quant, values[:, v_split:]]

    def quant_keys(self, keys):
        return fake_quant(keys.transpose(-1, -2), self.method.bits, self.method.group, False).transpose(-1, -2)

    def step(self, layer, q, k_new, v_new, position, scale):
        k_quant, k_res, v_quant, v_full = self.layers[layer]
        k_res, v_full = torch.cat([k_res, k_new[:, None]], 1), torch.cat([v_full, v_new[:, None]], 1)
        keys, values = torch.cat([k_quant, k_res], 1), torch.cat([v_quant, v_full], 1)
        out = torch.stack([softmax_attend(q[h], keys[h // self.groups], values[h // self.groups], scale)[0]
                           for h in range(q.shape[0])])
        if k_res.shape[1] == self.method.residual:
            k_quant, k_res = torch.cat([k_quant, self.quant_keys(k_res)], 1), k_res[:, :0]
        if v_full.shape[1] > self.method.residual:
            oldest = fake_quant(v_full[:, :1], self.method.bits, self.method.group, False)
            v_quant, v_full = torch.cat([v_quant, oldest], 1), v_full[:, 1:]
        self.layers[layer] = [k_quant, k_res, v_quant, v_full]
        return out


POLICIES = {"h2o": HeavyHitters, "tova": Tova, "quest": Pages, "kivi": Kivi}
_active = {}


def _physical_attention(module, query, key, value, attention_mask, **kwargs):
    """One query per forward: hand the new token's key/value to the physical cache, attend over what it holds."""
    assert query.shape[2] == 1
    scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
    policy, position = _active["policy"], _active["position"]
    q, k, v = query[0, :, 0].float(), key[0, :, -1].float(), value[0, :, -1].float()
    out = policy.step(module.layer_idx, q, k, v, position, scale)
    return out[None, None].to(query.dtype), None


def physical(model, method, p_ids, g_ids):
    """Logits of the reference under a physical cache built from ``method``'s choices."""
    if NAME not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(NAME, _physical_attention)
        AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    heads = model.config.num_attention_heads
    method.begin(len(p_ids))
    rolling = getattr(method, "prefill", None) == "windowed"
    with torch.inference_mode():
        if not rolling:  # the method's own dense prefill records its choice
            with method.apply(model), attention.running(method, attention.Phase("prefill", P, 0)):
                first, cache = engine.forward(model, torch.tensor([p_ids]), last_only=True)
            policy = POLICIES.get(method.name, Pruned)(method, cache, heads)
            fed, rows = g_ids[:-1], [first[-1:]]
        else:
            policy, cache, fed, rows = Rolling(method, heads), None, p_ids + g_ids[:-1], []
        model.set_attn_implementation(NAME)
        try:
            for t, token in enumerate(fed):
                _active.update(policy=policy, position=t if rolling else P + t)
                logits, cache = engine.forward(model, torch.tensor([[token]]), cache)
                if not rolling or t >= P - 1:
                    rows.append(logits)
        finally:
            model.set_attn_implementation("sdpa")
    return torch.cat(rows)


@pytest.mark.parametrize("family", ["llama", "qwen3"])  # qwen3: QK-norm, its own head_dim
@pytest.mark.parametrize("case", sorted(CASES))
def test_masking_equals_a_physical_cache(case, family):
    name, params = CASES[case]
    model = tiny_model(family, num_hidden_layers=4 if name == "pyramidkv" else 2)
    g = torch.Generator().manual_seed(1)
    p_ids, g_ids = torch.randint(0, 283, (P,), generator=g).tolist(), torch.randint(0, 283, (N,), generator=g).tolist()
    masked_method = build(name, params)
    with masked_method.apply(model) as m:
        masked = engine.teacher_force(m, masked_method, p_ids, g_ids, engine.resolve_mode(masked_method, "auto")).logits
    base = engine.teacher_force(model, build("origin", {}), p_ids, g_ids, "parallel").logits
    assert (masked - base).abs().max() > 1e-3  # the method changed something: the comparison below is not trivial
    torch.testing.assert_close(masked, physical(model, build(name, params), p_ids, g_ids), rtol=1e-5, atol=1e-5)
