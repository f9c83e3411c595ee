"""The ``kvpress`` method and fidbench's own KV methods against NVIDIA's kvpress.

Every fidbench KV method with a kvpress counterpart, run at kvpress's conventions (its budget ``int(L × (1 -
compression_ratio))``, its window and kernel, scores per KV head, average pooling), gives the logits of the press
run by the ``kvpress`` method (fp32, within 1e-5) and keeps the positions the press keeps. The press's kept
positions are read from kvpress itself, outside fidbench: ``with press(model): model(prompt, cache)``, then the keys
each head's cache holds (matched against the dense prefill's keys) or those it hides (``masked_key_indices``).
Tiny models of the llama and qwen3 (QK-norm) families. Skipped with a reason where kvpress is not installed (CI
runs it in a venv of its own: kvpress caps transformers below 5.3).
"""

import sys

import pytest
import torch
from helpers import force, random_ids, reference, tiny_model

from fidbench import engine
from fidbench.methods import build
from fidbench.methods import kvpress as method

P, N = 40, 24
FAMILIES = ["llama", "qwen3"]
SNAP = {"window_size": 4, "kernel_size": 3}  # kvpress's names
SNAP_FIDBENCH = {"window": 4, "kernel": 3, "granularity": "kv_head", "pooling": "avg"}  # the same, fidbench's
# (kvpress press spec, fidbench method, its parameters); fidbench's budget is kvpress's int(P × (1 - ratio)).
PEERS = {
    "knorm": ({"press": "KnormPress"}, "knorm", {}),
    "streamingllm": ({"press": "StreamingLLMPress", "press_params": {"n_sink": 4}}, "streamingllm", {"sink": 4}),
    "snapkv": ({"press": "SnapKVPress", "press_params": SNAP}, "snapkv", SNAP_FIDBENCH),
    "adakv": ({"press": "AdaKVPress", "inner": {"press": "SnapKVPress", "press_params": SNAP},
               "press_params": {"alpha_safeguard": 0.2}},
              "adakv", {"scorer_params": SNAP_FIDBENCH, "alpha_safeguard": 0.2, "allocation": "kvpress"}),
    "adakv-knorm": ({"press": "AdaKVPress", "inner": {"press": "KnormPress"}, "press_params": {"alpha_safeguard": 0.5}},
                    "adakv", {"scorer": "knorm", "alpha_safeguard": 0.5, "allocation": "kvpress"}),
    "random": ({"press": "RandomPress", "press_params": {"seed": 3}}, "random", {"seed": 3, "reseed": "layer"}),
    "pyramidkv": ({"press": "PyramidKVPress", "press_params": {**SNAP, "beta": 2}}, "pyramidkv",
                  {**SNAP_FIDBENCH, "beta": 2, "allocation": "kvpress"}),
}


def installed() -> bool:
    try:
        method.presses()
        return True
    except ValueError:
        return False


needs_kvpress = pytest.mark.skipif(not installed(), reason="kvpress is not installed (pip install 'fidbench[kvpress]'; "
                                                           "it caps transformers below 5.3)")


@pytest.fixture(scope="module", params=FAMILIES)
def case(request):
    """A tiny model of the family (4 layers: PyramidKV's pyramid has steps), a prompt and its reference."""
    model = tiny_model(request.param, num_hidden_layers=4)
    p_ids = random_ids(P)
    return model, p_ids, reference(model, p_ids, N).g_ids


def press_keeps(model, spec: dict, p_ids: list[int]) -> list[torch.Tensor]:
    """Per layer, bool (KV heads, P): the prompt positions the press keeps, from kvpress itself."""
    from transformers import DynamicCache

    prompt = torch.tensor([p_ids])
    with torch.no_grad():
        _, dense = engine.call_model(model, DynamicCache(), input_ids=prompt)
        cache = DynamicCache()
        press = method.make(spec, "test")
        with press(model):
            engine.call_model(model, cache, input_ids=prompt)
    keeps = []
    for i, layer in enumerate(model.model.layers):
        full, held = dense.layers[i].keys[0], cache.layers[i].keys[0]  # (KV heads, P | kept, D)
        keep = (held[:, :, None, :] == full[:, None, :, :]).all(-1).any(1)  # a kept key is one of the prompt's
        hidden = layer.self_attn.__dict__.pop("masked_key_indices", None)
        if hidden is not None:
            keep[hidden[1], hidden[2]] = False
        keeps.append(keep)
    return keeps


def fidbench_keeps(model, fid, p_ids: list[int]) -> list[torch.Tensor]:
    """Per layer, bool (KV heads, P): the prompt positions fidbench's method keeps after the prefill."""
    heads = model.config.num_key_value_heads
    with fid.apply(model), torch.no_grad():
        fid.begin(len(p_ids))
        engine.prefill(model, fid, torch.tensor([p_ids]))
    keeps = []
    for i in range(model.config.num_hidden_layers):
        keep = fid.keep[i]
        keep = torch.ones(1, heads, len(p_ids), dtype=torch.bool) if keep is None else keep
        keeps.append(keep[0].expand(heads, -1) if keep.shape[1] == 1 else keep[0])
    return keeps


@needs_kvpress
@pytest.mark.parametrize("press", ["KnormPress", "SnapKVPress", "AdaKVPress", "StreamingLLMPress"])
@pytest.mark.parametrize("mode", ["parallel", "stepwise"])
def test_compression_ratio_zero_is_origin_bit_for_bit(case, press, mode):
    model, p_ids, g_ids = case
    spec = {"press": press, "compression_ratio": 0.0}
    if press == "AdaKVPress":
        spec = {**spec, "inner": {"press": "SnapKVPress", "press_params": SNAP}}
    origin = force(model, build("origin", {}), p_ids, g_ids, mode)
    assert torch.equal(force(model, build("kvpress", spec), p_ids, g_ids, mode), origin)


@needs_kvpress
@pytest.mark.parametrize("ratio", [0.5, 0.75])
@pytest.mark.parametrize("peer", sorted(PEERS))
def test_fidbench_method_equals_its_press(case, peer, ratio):
    model, p_ids, g_ids = case
    spec, name, params = PEERS[peer]
    spec = {**spec, "compression_ratio": ratio}
    fid = build(name, {**params, "budget": int(P * (1 - ratio))})
    pressed = build("kvpress", spec)
    logits = force(model, pressed, p_ids, g_ids)
    assert (logits - force(model, fid, p_ids, g_ids)).abs().max() <= 1e-5
    kept = press_keeps(model, spec, p_ids)
    assert all(torch.equal(a, b) for a, b in zip(kept, fidbench_keeps(model, fid, p_ids)))
    assert 0 < pressed.kept()["kv_fraction"] < 1
    # And the press changes the model: the comparison is not between two copies of origin.
    assert not torch.equal(logits, force(model, build("origin", {}), p_ids, g_ids))


@needs_kvpress
@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_tova_prefill_equals_tovapress(case, ratio):
    """TOVAPress is TOVA's prefill cut only; fidbench's tova then evicts one position per decode step. Both keep the
    positions the last prompt query attends to most (mean over every head), so they agree on the kept positions
    and on the first two rows (the prefill's and the first decode query's, which sees the cut cache); later rows
    differ by design. kvpress always keeps the last prompt position (its score is max + 1): ``keep_last``."""
    model, p_ids, g_ids = case
    spec = {"press": "TOVAPress", "compression_ratio": ratio}
    fid = build("tova", {"budget": int(P * (1 - ratio)), "keep_last": True})
    kept = press_keeps(model, spec, p_ids)
    assert all(torch.equal(a, b) for a, b in zip(kept, fidbench_keeps(model, fid, p_ids)))
    pressed, own = force(model, build("kvpress", spec), p_ids, g_ids), force(model, fid, p_ids, g_ids)
    assert (pressed[:2] - own[:2]).abs().max() <= 1e-5
    assert (pressed[2:] - own[2:]).abs().max() > 1e-3  # fidbench's tova goes on evicting


@needs_kvpress
def test_observed_attention_runs_eager_and_differs_from_h2o_by_normalisation(case):
    """ObservedAttentionPress reads the prefill's attention weights (attn_implementation: eager, restored after).
    Its score is H2O's column sum divided by the number of queries that see each key, without a recent window:
    not fidbench's h2o (which sums and keeps a recent window), so the two are not claimed equal; both run."""
    model, p_ids, g_ids = case
    spec = {"press": "ObservedAttentionPress", "compression_ratio": 0.5}
    with pytest.raises(AssertionError, match="eager"):  # kvpress's own assertion
        force(model, build("kvpress", spec), p_ids, g_ids)
    logits = force(model, build("kvpress", {**spec, "attn_implementation": "eager"}), p_ids, g_ids)
    assert model.config._attn_implementation == "sdpa"
    assert not torch.equal(logits, force(model, build("origin", {}), p_ids, g_ids))


@needs_kvpress
def test_pyramid_sizes_differ_between_kvcache_factory_and_kvpress(case):
    """The convention the ``allocation`` parameter names: the two rules keep different numbers per layer."""
    model, p_ids, _ = case
    params = {**SNAP_FIDBENCH, "beta": 2, "budget": 20}
    sizes = {}
    for rule in ("kvcache_factory", "kvpress"):
        fid = build("pyramidkv", {**params, "allocation": rule})
        sizes[rule] = [int(k.sum(-1)[0]) for k in fidbench_keeps(model, fid, p_ids)]
    assert sizes["kvpress"] == [30, 23, 17, 10]  # kvpress: mean 20, the window inside every layer's share
    assert sizes["kvcache_factory"] == [28, 23, 18, 13]


@needs_kvpress
def test_pyramidkv_press_steps_through_a_ragged_cache(case):
    """PyramidKV leaves layers of different lengths: one forward over the reference is impossible there (one mask),
    so the wrapper steps, and parallel teacher forcing gives exactly the stepwise logits."""
    model, p_ids, g_ids = case
    pressed = build("kvpress", {"press": "PyramidKVPress", "compression_ratio": 0.5, "press_params": SNAP})
    assert torch.equal(force(model, pressed, p_ids, g_ids, "parallel"), force(model, pressed, p_ids, g_ids, "stepwise"))


@needs_kvpress
def test_decoding_press_runs_stepwise_and_compresses_while_decoding(case):
    model, p_ids, g_ids = case
    spec = {"press": "DecodingPress", "inner": {"press": "KnormPress"},
            "press_params": {"compression_interval": 4, "target_size": 30, "hidden_states_buffer_size": 0}}
    pressed = build("kvpress", spec)
    assert not pressed.parallel_exact
    with pytest.raises(ValueError, match="not exact under parallel"):
        engine.resolve_mode(pressed, "parallel")
    logits = force(model, pressed, p_ids, g_ids)
    assert not torch.equal(logits, force(model, build("origin", {}), p_ids, g_ids, "stepwise"))
    # Cut to 30 positions every 4 steps from 40 + 4: after the 23 steps, 30 + 3 of the 40 + 23 fed.
    assert pressed.kept()["kv_fraction_per_layer"] == [33 / (P + N - 1)] * 4


@needs_kvpress
def test_the_method_leaves_the_model_as_it_found_it(case):
    """kvpress's hooks leave ``masked_key_indices`` and ``rotary_emb`` on the attention modules; the method
    removes them, so origin afterwards is origin."""
    _, p_ids, g_ids = case
    model = tiny_model(case[0].config.model_type, num_hidden_layers=4)  # one no press has touched yet
    before = force(model, build("origin", {}), p_ids, g_ids)
    force(model, build("kvpress", PEERS["adakv"][0] | {"compression_ratio": 0.5}), p_ids, g_ids)
    attn = model.model.layers[0].self_attn
    assert "masked_key_indices" not in attn.__dict__ and not hasattr(attn, "rotary_emb")
    assert torch.equal(force(model, build("origin", {}), p_ids, g_ids), before)


@needs_kvpress
@pytest.mark.parametrize("params, message", [
    ({"press": "NoSuchPress"}, "unknown press 'NoSuchPress'; kvpress .* has: AdaKVPress"),
    ({"press": "SnapKVPress", "press_params": {"window": 4}}, "SnapKVPress: unknown parameter.s. window; it takes: "),
    ({"press": "SnapKVPress", "press_params": {"window_size": "4"}}, "parameter 'window_size' must be int, got '4'"),
    ({"press": "SnapKVPress", "compression_ratio": 1.5}, "Compression ratio must be between 0 and 1"),
    ({"press": "AdaKVPress"}, "required parameter.s. missing: press .give inner presses as inner."),
    ({"press": "KnormPress", "inner": {"press": "KnormPress"}}, "KnormPress: it wraps no press"),
    ({"press": "AdaKVPress", "inner": {"press": "Knorm"}}, "AdaKVPress inner: unknown press 'Knorm'"),
    ({"press": "QFilterPress"}, "downloads Q-filters .* fidbench runs offline"),
    ({"press": "ExpectedAttentionStatsPress"}, "give path: a local copy .passed as stats_folder."),
    ({"press": "KnormPress", "path": "/tmp/x"}, "path is for presses that load files"),
    ({"press": "FinchPress", "compression_ratio": 0.5}, "FinchPress cannot run on fidbench's prompts: .* no separate"),
    ({"press": "ThinKPress", "compression_ratio": 0.5}, "compression ratio cannot be set for ThinKPress"),
])
def test_bad_parameters_are_refused_naming_the_variant(params, message):
    with pytest.raises(ValueError, match=f"^variant 'kv': .*{message}"):
        build("kvpress", params, "variant 'kv'")


def test_without_kvpress_the_variant_fails_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "kvpress", None)  # import kvpress raises ImportError
    method.presses.cache_clear()
    try:
        install = r"pip install 'fidbench\[kvpress\]'"
        with pytest.raises(ValueError, match=rf"^variant 'kv': kvpress is not installed .*{install}"):
            build("kvpress", {"press": "KnormPress", "compression_ratio": 0.5}, "variant 'kv'")
    finally:
        method.presses.cache_clear()


@needs_kvpress
def test_fidbench_methods_lists_the_presses_and_their_parameters():
    from fidbench.cli import describe_methods

    text = describe_methods()
    assert "SnapKVPress(compression_ratio: float, window_size: int, kernel_size: int)" in text
    assert "AdaKVPress(press: ScorerPress, alpha_safeguard: float)" in text


@needs_kvpress
def test_the_kvpress_suite_loads_and_builds_every_press():
    from helpers import ROOT

    from fidbench.suite import load

    suite = load(ROOT / "suites" / "kvpress.yaml")
    presses = {v.params["press"] for v in suite.variants if v.method == "kvpress"}
    assert len(presses) >= 35 and all(ds.path.exists() for ds in suite.datasets)


@needs_kvpress
def test_the_long_kvpress_suite_runs_the_same_variants_on_the_six_long_sets():
    from helpers import ROOT

    from fidbench.suite import load

    short, long = load(ROOT / "suites" / "kvpress.yaml"), load(ROOT / "suites" / "kvpress-long.yaml")
    same = [(v.name, v.method, v.params) for v in short.variants]
    assert [(v.name, v.method, v.params) for v in long.variants] == same
    families = ("needles", "vartrack", "aggregation", "multidoc", "summarization", "code")
    assert sorted(ds.path.name for ds in long.datasets) == sorted(f"{f}-4k.jsonl" for f in families)
    assert all(ds.path.exists() for ds in long.datasets)


def test_the_kvpress_suite_without_kvpress_names_a_variant_and_the_install_command(monkeypatch):
    from helpers import ROOT

    from fidbench.suite import SuiteError, load

    monkeypatch.setitem(sys.modules, "kvpress", None)
    method.presses.cache_clear()
    try:
        with pytest.raises(SuiteError, match=r"methods\.kv-knorm-90.*pip install 'fidbench\[kvpress\]'"):
            load(ROOT / "suites" / "kvpress.yaml")
    finally:
        method.presses.cache_clear()


@needs_kvpress
def test_a_press_scores_one_prompt_per_forward():
    """kvpress is of kind model, yet a press keeps per-run buffers (its own begin): it must not batch."""
    press = build("kvpress", {"press": "KnormPress", "compression_ratio": 0.5})
    assert not press.batches
    with pytest.raises(ValueError, match="method 'kvpress' .* scores one prompt per forward"):
        engine.teacher_force_batch(tiny_model("llama"), press, [([1, 2, 3], [4, 5])], "parallel")
