"""Shared base prefills (fidbench.prefill): replaying a recorded prefill gives, bit for bit, what a live
prefill gives, for every method that declares ``base_prefill``, on every family; the cap on memory; a
hook that changes the prefill is refused; a suite shares prefills across its cases."""

import json

import pytest
import torch
from helpers import FAMILIES, ROOT, random_ids, reference, save_tiny, tiny_model

from fidbench import Method, engine, prefill
from fidbench.harness import Bench
from fidbench.methods import REGISTRY, build
from fidbench.suite import SuiteError, load

SHARED = sorted(name for name, cls in REGISTRY.items() if cls.base_prefill is True)


def variants(config):
    """Each base_prefill method with its real parameters (and H2O at a second budget and granularity, which
    reuse the column sums of the first), for the methods a model of ``config`` can run."""
    out = []
    for name in SHARED + ["h2o-query", "streamingllm-dense"]:
        method, real = name.split("-")[0], REGISTRY[name.split("-")[0]].test_params.get("real") or {}
        params = {"h2o-query": {"budget": 20, "granularity": "query_head"},
                  "streamingllm-dense": {"budget": 12, "prefill": "dense"}}.get(name, real)
        m = build(method, params)
        if not m.runs_on(config):
            continue  # mistral: every layer slides, KV methods refuse it (tests/test_families.py)
        out.append((name, m))
    return out


def run(model, method, ref, recorded=None):
    mode = engine.resolve_mode(method, "auto")
    with method.apply(model) as applied:
        forced = engine.teacher_force(applied, method, ref.p_ids, ref.g_ids, mode, recorded)
    return forced.logits, method.kept()


def test_streamingllm_shares_its_prefill_only_when_that_is_the_base_model_s():
    assert build("streamingllm", {}).base_prefill and not build("streamingllm", {"prefill": "windowed"}).base_prefill


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_replaying_a_recorded_prefill_equals_a_live_prefill_bit_for_bit(family):
    # Every variant replays the same record, as the cases of a suite do: a method that changed it (or the
    # statistics it keeps, H2O's column sums) would change what the next one computes.
    model = tiny_model(family)
    ref = reference(model, random_ids(40), n=12)
    recorded = prefill.record(model, ref.p_ids)
    assert recorded is not None and len(recorded.calls) == model.config.num_hidden_layers
    for name, method in variants(model.config):
        live, kept_live = run(model, method, ref)
        method = build(method.name, method.params())
        shared, kept_shared = run(model, method, ref, recorded)
        assert torch.equal(shared, live), f"{family} {name}"
        assert kept_shared == kept_live, f"{family} {name}"
    assert any(("h2o column sums", g) in c.memo for c in recorded.calls for g in ("kv_head", "query_head")) \
        or family == "mistral"


def test_a_method_that_changes_the_prefill_cannot_replay_one():
    class Changes(Method):
        name, kind = "changes", "attention"

        def attend(self, call):
            return call.dense()

    model = tiny_model("llama")
    ref = reference(model, random_ids(20), n=4)
    method = Changes()
    with method.apply(model) as applied, pytest.raises(RuntimeError, match="changed the output of a prefill"):
        engine.teacher_force(applied, method, ref.p_ids, ref.g_ids, "parallel", prefill.record(model, ref.p_ids))


@pytest.mark.parametrize("tensor", ["key", "query", "value"])
def test_a_method_that_writes_into_a_replayed_prefill_call_fails_and_the_prompt_is_recorded_again(tensor):
    class Writes(Method):
        name, kind, base_prefill = "writes", "attention", True

        def attend(self, call):
            if call.phase.name == "prefill" and call.layer_idx == 1:
                getattr(call, tensor)[:, :, :3].mul_(0.5)  # in place, through a view: live, the layer computes on it
            return None

    model = tiny_model("llama")
    ref = reference(model, random_ids(20), n=4)
    shared = prefill.Prefills(max_bytes=2**30)
    recorded = shared.get(model, ref.p_ids)
    method = Writes()
    with method.apply(model) as applied, pytest.raises(RuntimeError, match=r"method 'writes' wrote into a prefill "
                                                       r"attention call's query, key, value or mask in place \(in its "
                                                       r"prefill hook, layer 1\)"):
        engine.teacher_force(applied, method, ref.p_ids, ref.g_ids, "stepwise", recorded)
    again = shared.get(model, ref.p_ids)  # the next case replays the base model's prefill, recorded again
    assert again is not recorded and shared.used == again.nbytes
    origin = build("origin", {})
    with origin.apply(model) as applied:
        live = engine.teacher_force(applied, origin, ref.p_ids, ref.g_ids, "stepwise").logits
        replayed = engine.teacher_force(applied, origin, ref.p_ids, ref.g_ids, "stepwise", again).logits
    assert torch.equal(replayed, live)


def test_a_method_that_writes_into_a_record_after_its_replay_is_named_by_the_next_replay():
    class Later(Method):
        name, kind, base_prefill = "later", "attention", True

        def attend(self, call):
            if call.phase.name == "prefill" and call.layer_idx == 0:
                self.kept = call.query  # the record's own tensor
            elif call.phase.name == "decode" and call.layer_idx == 0:
                self.kept.zero_()
            return None

    model = tiny_model("llama")
    ref = reference(model, random_ids(20), n=4)
    shared = prefill.Prefills(max_bytes=2**30)
    later, origin = Later(), build("origin", {})
    with later.apply(model) as applied:
        engine.teacher_force(applied, later, ref.p_ids, ref.g_ids, "stepwise", shared.get(model, ref.p_ids))
    with origin.apply(model) as applied, pytest.raises(RuntimeError, match=r"method 'later' wrote into a prefill "
                                                       r"attention call's .* in place \(after its replay, layer 0\)"):
        engine.teacher_force(applied, origin, ref.p_ids, ref.g_ids, "stepwise", shared.get(model, ref.p_ids))
    assert shared.get(model, ref.p_ids).spoiled is False  # recorded again for the cases after


def test_records_are_kept_up_to_the_cap_and_still_serve_the_case_that_made_them():
    model = tiny_model("llama")
    one = prefill.record(model, random_ids(30)).nbytes
    shared = prefill.Prefills(max_bytes=one + one // 2)  # room for one record
    first, second = random_ids(30, seed=3), random_ids(30, seed=4)
    a = shared.get(model, first)
    assert a is not None and shared.get(model, first) is a  # recorded once
    b = shared.get(model, second)
    assert b is not None  # over the cap: made, used, not kept
    assert shared.get(model, second) is None and shared.used == a.nbytes


def test_a_suite_that_shares_prefills_scores_exactly_as_one_that_does_not(tmp_path, cache, monkeypatch):
    # Teacher forcing and free running (--fidbench-free-run) both replay: 3 prompts x 3 sharing variants x 2.
    replays, replay = [], prefill.Recorded.replay
    monkeypatch.setattr(prefill.Recorded, "replay", lambda self, *args: replays.append(1) or replay(self, *args))
    checkpoint = save_tiny(tmp_path / "tiny", "qwen2")
    rows = (ROOT / "data" / "facts.jsonl").read_text().splitlines()[:3]
    (tmp_path / "facts.jsonl").write_text("\n".join(rows) + "\n")
    records = {}
    for share in (0, 1):
        (tmp_path / "s.yaml").write_text(json.dumps({
            "generation": {"max_new_tokens": 8, "share_prefill_gib": share},
            "models": {"tiny": {"path": str(checkpoint)}},
            "datasets": {"facts": "facts.jsonl"},
            "methods": {"snapkv": {"budget": 8, "window": 2, "kernel": 3}, "h2o": {"budget": 8},
                        "h2o-q": {"method": "h2o", "budget": 6, "granularity": "query_head"}, "rtn": {"bits": 4}},
        }))
        s = load(tmp_path / "s.yaml")
        bench = Bench(s, progress=False, free_run=True)
        records[share] = {c.variant.name: bench.run(c) for c in s.cases()}
        assert len(replays) == 18 * share
    for name, shared in records[1].items():
        alone = records[0][name]
        assert shared["samples"] == alone["samples"], name  # every sample's scores and free-run texts, exactly
        assert shared["scores"] == alone["scores"], name
        assert "prefills_replayed" not in alone["timing"]
        assert shared["timing"].get("prefills_replayed") == (None if name == "rtn" else 3), name  # rtn: weights


@pytest.mark.parametrize("value", [-1, True, "8"])
def test_share_prefill_gib_must_be_a_number_of_gib(tmp_path, value):
    (tmp_path / "s.yaml").write_text(json.dumps({
        "generation": {"share_prefill_gib": value}, "models": {"m": {"path": "x"}},
        "datasets": {"d": "d.jsonl"}, "methods": {"origin": {}}}))
    with pytest.raises(SuiteError, match="share_prefill_gib must be a finite number of GiB"):
        load(tmp_path / "s.yaml")


def test_the_decode_timer_s_rounds_can_start_from_the_replayed_prefill():
    # pytest-benchmark's rounds (cases.DecodeTimer) restart from a prefill: with sharing, from the replay.
    model = tiny_model("llama")
    ref = reference(model, random_ids(30), n=6)
    recorded = prefill.record(model, ref.p_ids)
    replays, replay = [], recorded.replay
    recorded.replay = lambda *args: replays.append(1) or replay(*args)
    seen = []
    for rec in (None, recorded):
        method = build("snapkv", {"budget": 8, "window": 2, "kernel": 3})
        with method.apply(model) as applied:
            stepper = engine.Stepper(applied, method, ref.p_ids, ref.g_ids, rec)
            stepper.prefill()
            for _ in range(3):
                stepper.step()
        seen.append((method.keep, method.kept(), stepper.cache.get_seq_length()))
    (live_keep, live_kept, live_len), (keep, kept, length) = seen
    assert replays == [1] and kept == live_kept and length == live_len == 33
    assert all(torch.equal(keep[i], live_keep[i]) for i in live_keep)
