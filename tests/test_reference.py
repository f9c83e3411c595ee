"""The reference store: cached, keyed, shared safely, nothing lost on interruption."""

import errno
import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch
from helpers import tiny_model
from safetensors.torch import load_file, save_file

from fidbench import lock, reference
from fidbench.datasets import Prompt
from fidbench.reference import ReferenceWarning, Store


@pytest.fixture
def model():
    return tiny_model("llama")


def prompts(n=3):
    return [Prompt("d", i, list(range(5 + i, 20 + i))) for i in range(n)]


def test_second_run_generates_nothing_and_reads_the_same(cache, model):
    first = Store(cache, "tiny", "f" * 64, 8)
    refs = first.get(model, prompts(), progress=False)
    assert first.generated == 3
    again = Store(cache, "tiny", "f" * 64, 8)
    cached = again.get(model, prompts(), progress=False)
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


@pytest.mark.parametrize("change", [{"eos_ids": {7}}, {"device": "cuda:NVIDIA H200"}, {"batch_size": 2}])
def test_a_change_of_end_of_sequence_device_or_batch_regenerates(cache, model, change):
    Store(cache, "tiny", "f" * 64, 8).get(model, prompts(1), progress=False)
    same = Store(cache, "tiny", "f" * 64, 8, eos_ids=(), device="cpu")
    same.get(model, prompts(1), progress=False)
    other = Store(cache, "tiny", "f" * 64, 8, **change)
    other.get(model, prompts(1), progress=False)
    assert (same.generated, other.generated) == (0, 1)


def test_the_model_fingerprint_covers_the_dtype(model):
    from fidbench.models import fingerprint

    assert fingerprint(model) != fingerprint(model.to(torch.bfloat16))  # the dtype keys references via the fingerprint


def corrupt_truncated(store, paths):
    paths[0].write_bytes(paths[0].read_bytes()[:100])


def corrupt_garbage(store, paths):
    paths[0].write_bytes(b"not a safetensors file at all")


def corrupt_other_sample(store, paths):
    shutil.copy(paths[1], paths[0])  # a valid reference, of another prompt


def corrupt_logp(store, paths):
    tensors = load_file(str(paths[0]))
    with open(paths[0], "rb") as fh:  # keep the metadata (settings, checksum) as written
        header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
    tensors["top_logp"][0, 0] += 0.5  # better scores than the base model really gives
    save_file(tensors, str(paths[0]), metadata=header["__metadata__"])


@pytest.mark.parametrize("corrupt,reason", [
    (corrupt_truncated, "unreadable: "), (corrupt_garbage, "unreadable: "),
    (corrupt_other_sample, "it holds another prompt's reference"),
    (corrupt_logp, "its content does not match its checksum"),
])
def test_a_bad_cache_entry_is_named_moved_aside_and_regenerated(cache, model, corrupt, reason):
    first = Store(cache, "tiny", "f" * 64, 8)
    good = first.get(model, prompts(), progress=False)
    paths = [first.path(p) for p in prompts()]
    corrupt(first, paths)
    again = Store(cache, "tiny", "f" * 64, 8)
    with pytest.warns(ReferenceWarning) as warned:
        refs = again.get(model, prompts(), progress=False)
    assert again.generated == 1
    [bad] = first.dir.glob("*.bad-*")
    [message] = [str(w.message) for w in warned]
    assert message.startswith(f"fidbench: bad cached reference {paths[0]} ({reason}")
    assert message.endswith(f"): moved to {bad.name}, regenerating it") and bad.name.startswith(paths[0].name + ".bad-")
    for a, b in zip(good, refs):
        assert a.p_ids == b.p_ids and a.g_ids == b.g_ids and torch.equal(a.top_logp, b.top_logp)
    assert Store(cache, "tiny", "f" * 64, 8).read(paths[0], prompts()[0]).g_ids == good[0].g_ids


def test_reads_verify_the_prompt_and_the_checksum(cache, model):
    store = Store(cache, "tiny", "f" * 64, 8)
    store.get(model, prompts(2), progress=False)
    path = store.path(prompts()[0])
    with pytest.raises(reference.BadReference, match="another prompt's reference"):
        store.read(path, prompts(2)[1])
    with pytest.raises(reference.BadReference, match="other settings"):
        Store(cache, "tiny", "f" * 64, 9).read(path, prompts()[0])
    corrupt_logp(store, [path])
    with pytest.raises(reference.BadReference, match="does not match its checksum"):
        store.read(path, prompts()[0])


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
        store.get(model, prompts(), progress=False)
    files = sorted(p.name for p in store.dir.iterdir() if not p.name.endswith(".lock"))
    assert len(files) == 2 and all(f.endswith(".safetensors") for f in files)  # no partial file left
    monkeypatch.setattr(reference, "greedy", real)
    resumed = Store(cache, "tiny", "f" * 64, 8)
    resumed.get(model, prompts(), progress=False)
    assert resumed.generated == 1


@pytest.mark.parametrize("kind", lock.KINDS)
def test_a_sample_locked_by_another_worker_is_revisited_not_waited_on(cache, model, monkeypatch, kind):
    monkeypatch.setenv("FIDBENCH_LOCK", kind)
    store = Store(cache, "tiny", "f" * 64, 8)
    order, held, release = [], threading.Event(), threading.Event()
    busy = store.path(prompts()[0])

    def other_worker():
        other = lock.new(busy)
        other.acquire(0)
        held.set()
        release.wait(10)
        other.release()

    thread = threading.Thread(target=other_worker)
    thread.start()
    held.wait(10)
    real = store._make

    def make(model, prompt):
        order.append(prompt.index)
        if len(order) == 2:
            release.set()  # the other worker gives up sample 0 without writing it
        return real(model, prompt)

    monkeypatch.setattr(store, "_make", make)
    refs = store.get(model, prompts(), progress=False)
    thread.join()
    assert order == [1, 2, 0] and len(refs) == 3


def test_imported_reference_keeps_its_tokens_and_gets_base_logits(cache, model):
    p = Prompt("d", 0, list(range(10)), g_ids=[7, 8, 9], template="ids")
    ref = Store(cache, "tiny", "f" * 64, 8).get(model, [p], progress=False)[0]
    assert ref.g_ids == [7, 8, 9]
    logits = reference.base_logits(model, p.p_ids, p.g_ids)
    torch.testing.assert_close(ref.gold_logp, logits.log_softmax(-1)[torch.arange(3), torch.tensor([7, 8, 9])])


def test_a_run_waiting_on_a_lock_says_who_holds_it_and_can_time_out(cache, model, monkeypatch, capfd):
    store = Store(cache, "tiny", "f" * 64, 8)
    held = lock.Flock(store.path(prompts()[0]), "reference lock")
    held.acquire(0)  # another run's lock (flock: a second open file of the same lock conflicts, in-process too)
    holder = json.loads(held.holder.read_text())
    monkeypatch.setattr(lock, "NOTICE_S", 0.2)
    monkeypatch.setenv("FIDBENCH_LOCK_TIMEOUT", "0.5")
    try:
        with pytest.warns(lock.LockWarning, match="waiting .* s for reference lock .*lock, held by pid"):
            with pytest.raises(TimeoutError) as e:
                store.get(model, prompts(1), progress=False)
    finally:
        held.release()
    assert f"reference lock {held.path} is still held by pid {holder['pid']} on {holder['host']}" in str(e.value)
    assert "FIDBENCH_LOCK_TIMEOUT=0.5" in str(e.value)
    assert f"for reference lock {held.path}, held by pid {holder['pid']}" in capfd.readouterr().err
    assert not held.holder.exists()  # released: the holder file goes with the lock
    monkeypatch.setenv("FIDBENCH_LOCK_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="FIDBENCH_LOCK_TIMEOUT must be a number of seconds"):
        lock.timeout()


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664)])
def test_references_are_written_with_the_umask_s_mode_for_a_shared_cache(cache, model, umask, mode):
    old = os.umask(umask)
    try:
        Store(cache, "tiny", "f" * 64, 4).get(model, prompts(1), progress=False)
    finally:
        os.umask(old)
    [path] = (cache / "references").glob("*/*.safetensors")
    assert path.stat().st_mode & 0o777 == mode


def test_a_full_disk_for_the_cache_is_a_clear_error_and_leaves_no_partial_file(cache, model, monkeypatch):
    def full(self, data):
        Path.write_text(self, "part")  # a file the disk filled up in the middle of
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    store = Store(cache, "tiny", "f" * 64, 4)
    message = (r"^cannot write a reference to the cache .*references/tiny-ffff.* \(No space left on device\); "
               r"free space there or set FIDBENCH_CACHE to another directory$")
    with pytest.raises(OSError, match=message):
        store.get(model, prompts(1), progress=False)
    assert [p.name for p in store.dir.iterdir() if not p.name.endswith(".lock")] == []
