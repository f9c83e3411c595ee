"""The reference store: cached, keyed, shared safely, nothing lost on interruption."""

import threading

import pytest
import torch
from filelock import FileLock
from helpers import tiny_model

from fidbench import reference
from fidbench.datasets import Prompt
from fidbench.reference import Store


@pytest.fixture
def model():
    return tiny_model("llama")


def prompts(n=3):
    return [Prompt("d", i, list(range(5 + i, 20 + i))) for i in range(n)]


def test_second_run_generates_nothing_and_reads_the_same(cache, model):
    first = Store(cache, "tiny", "f" * 64, 8)
    refs = first.get(model, prompts(), set(), progress=False)
    assert first.generated == 3
    again = Store(cache, "tiny", "f" * 64, 8)
    cached = again.get(model, prompts(), set(), progress=False)
    assert again.generated == 0
    for a, b in zip(refs, cached):
        assert a.g_ids == b.g_ids and torch.equal(a.top_logp, b.top_logp) and torch.equal(a.rest_logp, b.rest_logp)
    g, _ = reference.greedy(model, prompts()[0].p_ids, 8, set())
    assert refs[0].g_ids == g


def test_key_covers_model_and_generation_settings(cache, model):
    p = prompts(1)[0]
    paths = {Store(cache, "tiny", fp, n).path(p) for fp in ("a" * 64, "b" * 64) for n in (8, 16)}
    assert len(paths) == 4
    assert Store(cache, "tiny", "a" * 64, 8).path(Prompt("d", 0, p.p_ids + [1])) not in paths


def test_interrupted_generation_keeps_finished_samples(cache, model, monkeypatch):
    store = Store(cache, "tiny", "f" * 64, 8)
    real, calls = reference.greedy, []

    def flaky(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(reference, "greedy", flaky)
    with pytest.raises(KeyboardInterrupt):
        store.get(model, prompts(), set(), progress=False)
    files = sorted(p.name for p in store.dir.iterdir() if not p.name.endswith(".lock"))
    assert len(files) == 2 and all(f.endswith(".safetensors") for f in files)  # no partial file left
    monkeypatch.setattr(reference, "greedy", real)
    resumed = Store(cache, "tiny", "f" * 64, 8)
    resumed.get(model, prompts(), set(), progress=False)
    assert resumed.generated == 1


def test_a_sample_locked_by_another_worker_is_revisited_not_waited_on(cache, model, monkeypatch):
    store = Store(cache, "tiny", "f" * 64, 8)
    order, held, release = [], threading.Event(), threading.Event()
    busy = store.path(prompts()[0])

    def other_worker():
        with FileLock(str(busy) + ".lock"):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=other_worker)
    thread.start()
    held.wait(10)
    real = store._make

    def make(model, prompt, eos):
        order.append(prompt.index)
        if len(order) == 2:
            release.set()  # the other worker gives up sample 0 without writing it
        return real(model, prompt, eos)

    monkeypatch.setattr(store, "_make", make)
    refs = store.get(model, prompts(), set(), progress=False)
    thread.join()
    assert order == [1, 2, 0] and len(refs) == 3


def test_imported_reference_keeps_its_tokens_and_gets_base_logits(cache, model):
    p = Prompt("d", 0, list(range(10)), g_ids=[7, 8, 9], template="ids")
    ref = Store(cache, "tiny", "f" * 64, 8).get(model, [p], set(), progress=False)[0]
    assert ref.g_ids == [7, 8, 9]
    logits = reference.base_logits(model, p.p_ids, p.g_ids)
    torch.testing.assert_close(ref.gold_logp, logits.log_softmax(-1)[torch.arange(3), torch.tensor([7, 8, 9])])
