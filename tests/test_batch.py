"""Prompts in batches (``--fidbench-batch-size``): base references, and teacher forcing and free running under the
methods that batch, match batch size 1 up to fp32 summation order; an argmax flips only at a near-tie."""

import json
import math

import pytest
import torch
from filelock import FileLock
from helpers import FAMILIES, calibration, random_ids, reference, save_words, tiny_model, words_suite

from fidbench import engine, metrics, report
from fidbench import reference as references
from fidbench.datasets import Prompt
from fidbench.harness import Bench
from fidbench.methods import REGISTRY, build
from fidbench.reference import Store
from fidbench.suite import load

N_PROMPTS, NEW_TOKENS, BATCH = 16, 24, 4


def prompts(seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, 80, (N_PROMPTS,), generator=g).tolist()  # up to 74 padding positions
    return [torch.randint(0, 283, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("seed", [0, 1])
def test_batched_greedy_matches_batch_one_up_to_near_ties(family, seed):
    model, ps = tiny_model(family, seed=seed), prompts(seed)
    ones = [references.greedy(model, p, NEW_TOKENS, set()) for p in ps]
    batched = [out for i in range(0, N_PROMPTS, BATCH)
               for out in references.greedy_batch(model, ps[i : i + BATCH], NEW_TOKENS, set())]
    flipped = 0
    for (g1, l1), (gb, lb) in zip(ones, batched):
        agree = next((t for t, (a, b) in enumerate(zip(g1, gb)) if a != b), len(g1))
        # Padding is masked out, so logits differ only by fp32 summation order (measured: ~3e-7).
        torch.testing.assert_close(lb[: agree + 1], l1[: agree + 1], atol=1e-5, rtol=1e-5)
        if agree < len(g1):
            flipped += 1
            top2 = l1[agree].topk(2).values
            assert top2[0] - top2[1] < 2e-5, "a flip that is not at a near-tie: padding changed the computation"
    # A flip needs a top-2 margin below the ~1e-6 logit error: among 384 positions of a random model's
    # logits that is expected far below once; allowing one sample in 16 keeps the test deterministic-safe.
    assert flipped <= 1


def test_samples_stop_at_their_own_end_of_sequence():
    model, ps = tiny_model("llama"), prompts(2)[:BATCH]
    free = [references.greedy(model, p, NEW_TOKENS, set())[0] for p in ps]
    eos = {free[0][3]}  # the first sample stops at its 4th token; the others stop wherever this token appears
    expected = [references.greedy(model, p, NEW_TOKENS, eos)[0] for p in ps]
    got = [g for g, _ in references.greedy_batch(model, ps, NEW_TOKENS, eos)]
    assert got == expected and len(got[0]) == 4
    assert max(len(g) for g in got) > 4  # the others went on after the first one stopped


def test_store_batches_generation_under_its_own_key(cache, monkeypatch):
    model = tiny_model("qwen2")
    ps = [Prompt("d", i, p) for i, p in enumerate(prompts(3)[:6])]
    one = Store(cache, "tiny", "f" * 64, 8)
    four = Store(cache, "tiny", "f" * 64, 8, batch_size=4)
    calls, real = [], references.greedy_batch
    monkeypatch.setattr(references, "greedy_batch",
                        lambda m, p_ids, *a: calls.append(sorted(map(len, p_ids))) or real(m, p_ids, *a))
    batched = four.get(model, ps, progress=False)
    lengths = sorted(len(p.p_ids) for p in ps)
    assert calls == [lengths[:4], lengths[4:]] and four.generated == 6  # batches of similar lengths
    # Batch size 1 keeps the exact references (origin stepwise reproduces them); batched ones live apart.
    assert {one.path(p) for p in ps}.isdisjoint(four.path(p) for p in ps)
    singles = one.get(model, ps, progress=False)
    assert one.generated == 6
    assert [r.g_ids for r in batched] == [r.g_ids for r in singles]  # no near-tie among these 48 tokens
    again = Store(cache, "tiny", "f" * 64, 8, batch_size=4)
    assert [r.g_ids for r in again.get(model, ps, progress=False)] == [r.g_ids for r in batched]
    assert again.generated == 0


def test_interrupted_batch_releases_its_locks_and_writes_nothing(cache, monkeypatch):
    model = tiny_model("llama")
    ps = [Prompt("d", i, p) for i, p in enumerate(prompts(4)[:4])]
    store = Store(cache, "tiny", "f" * 64, 8, batch_size=4)

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(references, "greedy_batch", interrupted)
    with pytest.raises(KeyboardInterrupt) as interrupt:
        store.get(model, ps, progress=False)
    assert not any(p.suffix == ".safetensors" for p in store.dir.iterdir())
    # The traceback keeps the interrupted frame (and any lock it forgot) alive, as a debugger would.
    assert interrupt.traceback
    for p in ps:  # every lock was released: a held one would time out here
        with FileLock(str(store.path(p)) + ".lock", timeout=0):
            pass
    monkeypatch.undo()
    resumed = Store(cache, "tiny", "f" * 64, 8, batch_size=4)
    resumed.get(model, ps, progress=False)
    assert resumed.generated == 4


def test_bad_batch_size_is_a_clear_error(cache):
    with pytest.raises(ValueError, match="batch size"):
        Store(cache, "tiny", "f" * 64, 8, batch_size=0)


# Every method that batches (Method.batches) with the family matrix's real parameters: origin, the weight methods, and
# the attention methods, whose hooks see each row as that prompt alone (fidbench.attention.by_row); checkpoint is run
# batched by the harness test below, hf-quant in tests/test_quantlibs.py.
BATCHING = ["origin"] + sorted(m for m, c in REGISTRY.items() if c.test_params.get("real") is not None
                               and build(m, c.test_params["real"]).batches)
ATTENTION = [m for m in BATCHING if REGISTRY[m].kind == "attention"]


def _params(method: str) -> dict:
    return REGISTRY[method].test_params.get("real") or {}


def _agree(one: torch.Tensor, batched: torch.Tensor, atol: float = 1e-5) -> None:
    """Equal up to fp32 summation order: logits within ``atol``, an argmax that differs only at a near-tie."""
    torch.testing.assert_close(batched, one, atol=atol, rtol=atol)
    for t in (one.argmax(-1) != batched.argmax(-1)).nonzero()[:, 0].tolist():
        top2 = one[t].topk(2).values
        assert top2[0] - top2[1] < 2 * atol, f"position {t}: an argmax flip that is not at a near-tie"


def _tolerance(method) -> float:
    """1e-5, or 1e-3 for a method that rounds what attention reads (a kernel's or a cache's low-bit values, alone or
    in a stack): a summation-order difference upstream (~1e-7, the batch's matmuls) can move a value across a
    rounding boundary, as between parallel and stepwise decoding (tests/test_lowbit_attention.py allows 1e-3). On
    these tiny models that stays within 1e-3; on the default model an e4m3 flip moves logits by up to ~1 (measured
    in benchmarks/LOG.md, "Noise floor of rounding methods"), at batch 1 between parallel and stepwise as well."""
    rounding = [m for m in [method, *method.parts()] if m.role in ("kernel", "cache")]
    return 1e-3 if rounding else 1e-5


# (prompt, reference) lengths: prompts of 40, 13 and 27 tokens (up to 27 padding positions on the left, longer than
# the sliding window) with references of 24, 19 and 1 tokens (right padding; one feeds nothing after the prompt);
# prompts of one length (no mask: the causal fast path) with references of one length or of two.
SHAPES = {"padded": ((40, 24), (13, 19), (27, 1)), "unpadded": ((20, 12), (20, 12)), "ragged-refs": ((20, 12), (20, 5))}


def _cases():
    """(method, family, shape, mode): every batching method on every family and shape, parallel where the method is
    exact in one forward and stepwise; the attention methods' unpadded shapes on llama only (no padding: each
    row's calls are the batch's own, sliced)."""
    for method in BATCHING:
        modes = ["parallel", "stepwise"] if build(method, _params(method)).parallel_exact else ["stepwise"]
        for family in sorted(FAMILIES):
            for shape in sorted(SHAPES):
                if method in ATTENTION and shape != "padded" and family != "llama":
                    continue
                yield from ((method, family, shape, mode) for mode in modes)


@pytest.mark.parametrize("method,family,shape,mode", list(_cases()))
def test_batched_teacher_forcing_equals_one_prompt_at_a_time(method, family, shape, mode):
    model = tiny_model(family)
    refs = [reference(model, random_ids(n, seed=n + i), g) for i, (n, g) in enumerate(SHAPES[shape])]
    one_at_a_time, batched_method = build(method, _params(method)), build(method, _params(method))
    assert batched_method.batches
    if not batched_method.runs_on(model.config):  # refused by design (tests/test_families.py)
        pytest.skip(f"{method} refuses {family}: every layer slides")
    with one_at_a_time.apply(model, calibration()) as applied:
        ones = [engine.teacher_force(applied, one_at_a_time, r.p_ids, r.g_ids, mode).logits for r in refs]
    with batched_method.apply(model, calibration()) as applied:
        batched, clock = engine.teacher_force_batch(applied, batched_method, [(r.p_ids, r.g_ids) for r in refs], mode)
    assert [b.shape for b in batched] == [o.shape for o in ones]
    for one, got in zip(ones, batched):
        _agree(one, got, _tolerance(batched_method))
    assert len(clock.seconds()) == 2  # prefill, decode
    # What the method kept, summed over its rows, is what it kept one prompt at a time.
    assert _rounded(batched_method.kept()) == _rounded(one_at_a_time.kept())


def _rounded(kept):
    """A report's ``kept`` with its floats to 6 digits (sums over rows and over samples differ in the last bits)."""
    if isinstance(kept, float):
        return round(kept, 6)
    if isinstance(kept, dict):
        return {k: _rounded(v) for k, v in kept.items()}
    if isinstance(kept, list):
        return [_rounded(v) for v in kept]
    return kept


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("method", ["origin", "rtn", "h2o", "snapkv", "gear", "stack"])
@pytest.mark.parametrize("lengths", [(40, 13, 27), (20, 20, 20)], ids=["padded", "unpadded"])
def test_batched_free_running_stops_each_row_at_its_own_end(method, family, lengths):
    model = tiny_model(family)
    prompts = [random_ids(n, seed=n + i) for i, n in enumerate(lengths)]
    m = build(method, _params(method))
    if not m.runs_on(model.config):
        pytest.skip(f"{method} refuses {family}: every layer slides")
    with m.apply(model, calibration()) as applied:
        free = engine.free_run(applied, m, prompts[1], 20, set())
        eos = {free.ids[3]}  # the second row stops at its 4th token at the latest; the others where it appears
        ones = [engine.free_run(applied, m, p, n, eos) for p, n in zip(prompts, (20, 20, 7))]
        made, _ = engine.greedy_batch(applied, m, prompts, [20, 20, 7], eos)
    for one, (ids, logits) in zip(ones, made):
        same = next((t for t, (a, b) in enumerate(zip(one.ids, ids)) if a != b), None)
        if same is not None:  # only a near-tie may send a row elsewhere
            top2 = logits[same].topk(2).values
            assert top2[0] - top2[1] < 2e-5
        else:
            assert ids == one.ids
    assert len(made[1][0]) <= 4 and len(made[2][0]) <= 7


def test_methods_that_do_not_batch_say_so():
    model = tiny_model("llama")

    class Undeclared(REGISTRY["topk"]):  # a begin of its own, its per-sample state not named
        def begin(self, prompt_len):
            self.seen = prompt_len

    for method in (build("quantized-cache", {}), Undeclared(keep=0.5)):
        assert not method.batches
        with pytest.raises(ValueError, match=f"method {method.name!r} .* scores one prompt per forward"):
            engine.teacher_force_batch(model, method, [([1, 2, 3], [4, 5])], "parallel")
    assert build("stack", {"members": [{"method": "rtn"}, {"method": "snapkv"}]}).batches


def test_a_batched_suite_reports_every_sample_in_order_as_batch_one_does(tmp_path, monkeypatch):
    """Through the harness: origin, a weight method, another checkpoint and two attention methods run 3 prompts per
    forward; samples keep the suite's order, scores and what the method kept equal batch 1's (these references have
    no near-tie)."""
    base = save_words(tmp_path / "base", "llama")
    methods = {"origin": {}, "rtn": {"method": "rtn", "bits": 4}, "self": {"method": "checkpoint", "path": str(base)},
               "topk": {"method": "topk", "keep": 0.5}, "h2o": {"method": "h2o", "budget": 6}}
    path = words_suite(tmp_path, base, methods)
    spec = json.loads(path.read_text())  # and imported references of 12, 5 and 9 tokens: right padding
    (tmp_path / "refs.jsonl").write_text("".join(json.dumps({"p_ids": random_ids(n, seed=n, high=20),
                                                             "g_ids": random_ids(g, seed=g, high=20)}) + "\n"
                                                 for n, g in ((30, 12), (9, 5), (17, 9))))
    spec["datasets"]["refs"] = {"references": "refs.jsonl"}
    path.write_text(json.dumps(spec))
    suite = load(path)
    runs, ties = {}, {}
    for size in (1, 3):
        monkeypatch.setenv("FIDBENCH_CACHE", str(tmp_path / f"cache{size}"))
        bench = Bench(suite, progress=False, batch_size=size, free_run=True)
        runs[size] = {}
        for case in suite.cases():
            seen = []
            runs[size][case.variant.name] = bench.run(case, on_sample=seen.append)
            ties[size, case.variant.name] = sum(int(metrics.near_ties(logits)) for logits in seen)
    for name in methods:
        one, three = runs[1][name], runs[3][name]
        assert three["timing"]["batch_size"] == 3 and "near_ties" not in one["timing"]
        assert three["timing"]["near_ties"] == ties[3, name]  # over every scored position of the case
        assert _rounded(three["kept"]) == _rounded(one["kept"])
        keys = [(x["dataset"], x["index"], x["n_tokens"]) for x in one["samples"]]
        assert keys == [(x["dataset"], x["index"], x["n_tokens"]) for x in three["samples"]]
        for metric, value in one["scores"].items():
            if isinstance(value, float) and math.isfinite(value):
                assert three["scores"][metric] == pytest.approx(value, rel=1e-4, abs=1e-6), (name, metric)


def test_asked_batches_come_before_shared_prefills(tmp_path, monkeypatch):
    """fidbench.yaml shares prefills; a batch size above 1 still runs its cases in batches (a record is one prompt's
    prefill), and the same suite at batch size 1 replays every prompt's prefill."""
    base = save_words(tmp_path / "base", "llama")
    path = words_suite(tmp_path, base, {"topk": {"method": "topk", "keep": 0.5}})
    spec = json.loads(path.read_text())
    spec["generation"]["share_prefill_gib"] = 1
    path.write_text(json.dumps(spec))
    suite = load(path)
    monkeypatch.setenv("FIDBENCH_CACHE", str(tmp_path / "cache"))
    for size in (1, 3):
        timing = Bench(suite, progress=False, batch_size=size).run(suite.cases()[0])["timing"]
        assert timing["batch_size"] == size
        assert timing.get("prefills_replayed") == (3 if size == 1 else None)


def test_near_ties_are_counted_per_case_and_summed_in_the_environment(tmp_path):
    logits = torch.tensor([[1.0, 1.0005, 0.0], [2.0, 1.0, 0.0], [0.3, 0.2, 0.3], [0.0, 0.0, 5.0]])
    assert int(metrics.near_ties(logits)) == 2  # margins 5e-4 and 0 (a tie), not 1 or 4.7
    path = tmp_path / "report.json"
    doc = report.Report(str(path), {}, ["a", "b", "c"], env={"commit": "x"})
    doc.add({"id": "a", "timing": {"batch_size": 1}})
    assert "batched" not in json.loads(path.read_text())["environment"]
    doc.add({"id": "b", "timing": {"batch_size": 4, "near_ties": 3}})
    doc.add({"id": "c", "timing": {"batch_size": 8, "near_ties": 2}})
    environment = json.loads(path.read_text())["environment"]
    assert environment == {"commit": "x", "batched": {"cases": 2, "near_ties": 5, "near_tie_margin": metrics.NEAR_TIE}}


def test_batches_hold_prompts_of_similar_lengths():
    lengths = [60, 2587, 36, 743, 50, 78, 64, 40]
    got = engine.batches(lengths, 4)
    assert sorted(i for b in got for i in b) == list(range(len(lengths)))  # each prompt once
    assert got == [[2, 7, 4, 0], [6, 5], [3], [1]]  # 36..60 (60 <= 36 * 1.25 + 16), 64..78, then alone
    assert engine.batches(lengths, 1) == [[i] for i in sorted(range(8), key=lambda i: lengths[i])]
