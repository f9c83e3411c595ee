"""medusa: head files in the reference's two formats (key names and shapes as Medusa's own modules write them),
the original fidbench scoring loop on every family, per-head scores in the record and the table, the trainer."""

import json
from types import SimpleNamespace

import pytest
import torch
from helpers import FAMILIES, TINY, reference, save_tiny, tiny_model
from safetensors.torch import save_file

from fidbench import cli, engine, medusa_train, report
from fidbench.harness import Bench
from fidbench.methods import build
from fidbench.methods.medusa import load_heads
from fidbench.suite import load

H, V = TINY["hidden_size"], TINY["vocab_size"]


class MedusaResBlock(torch.nn.Module):
    """Medusa's ResBlock (medusa/model/medusa_model.py), restated: Linear with bias, zero weight, x + SiLU(.)."""

    def __init__(self, hidden):
        super().__init__()
        self.linear = torch.nn.Linear(hidden, hidden)
        torch.nn.init.zeros_(self.linear.weight)
        self.act = torch.nn.SiLU()

    def forward(self, x):
        return x + self.act(self.linear(x))


def medusa_heads(n, layers=1, vocab=None, std=0.05, seed=0):
    """Heads built as Medusa builds them: v1 (``vocab``: each ends in its own lm_head) or v2 (ResBlocks only),
    one head's blocks being one repeated instance (Medusa's ``[ResBlock(H)] * layers``); random weights."""
    torch.manual_seed(seed)
    own = lambda: [torch.nn.Linear(H, vocab, bias=False)] if vocab else []  # noqa: E731
    heads = torch.nn.ModuleList(torch.nn.Sequential(*([MedusaResBlock(H)] * layers), *own()) for _ in range(n))
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=std)
    return heads


def write_v1(path, heads, **config):
    path.mkdir(parents=True, exist_ok=True)
    torch.save(heads.state_dict(), path / "medusa_lm_head.pt")
    (path / "config.json").write_text(json.dumps({"base_model_name_or_path": "tiny", **config}))
    return path


def write_v2(path, heads, **config):
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in heads.state_dict().items()}, str(path / "medusa_lm_head.safetensors"))
    (path / "config.json").write_text(json.dumps({"base_model_name_or_path": "tiny", "version": "2", **config}))
    return path


def test_v1_pt_files_load_with_their_own_lm_heads(tmp_path):
    heads = medusa_heads(3, vocab=V)
    assert sorted(heads.state_dict()) == sorted(
        f"{k}.{name}" for k in range(3) for name in ("0.linear.weight", "0.linear.bias", "1.weight"))
    loaded = load_heads(write_v1(tmp_path / "v1", heads, medusa_num_heads=3, medusa_num_layers=1), H, V)
    assert loaded.version == "1" and len(loaded.heads) == 3 and loaded.layers == 1
    x = torch.randn(5, H)
    with torch.no_grad():
        assert torch.equal(loaded(x), torch.stack([head(x) for head in heads]))
    # two layers: Medusa repeats one block instance, so its state dict names it twice; the lm_head is "{k}.2"
    deep = medusa_heads(2, layers=2, vocab=V)
    assert "0.1.linear.weight" in deep.state_dict() and "0.2.weight" in deep.state_dict()
    loaded = load_heads(write_v1(tmp_path / "deep", deep), H, V)
    with torch.no_grad():
        assert loaded.layers == 2 and torch.allclose(loaded(x), torch.stack([head(x) for head in deep]), atol=1e-6)


def test_v2_safetensors_share_the_base_lm_head(tmp_path):
    heads = medusa_heads(2)
    assert sorted(heads.state_dict()) == ["0.0.linear.bias", "0.0.linear.weight",
                                          "1.0.linear.bias", "1.0.linear.weight"]
    lm_head = torch.nn.Linear(H, V, bias=False)
    loaded = load_heads(write_v2(tmp_path / "v2", heads, medusa_num_heads=2), H, V)
    x = torch.randn(5, H)
    with torch.no_grad():
        expected = torch.stack([lm_head(head(x)) for head in heads])
        assert loaded.version == "2" and torch.equal(loaded(x, lm_head), expected)
    file = tmp_path / "v2" / "medusa_lm_head.safetensors"
    assert len(load_heads(file, H, V).heads) == 2  # the file itself, too


def test_head_files_that_do_not_fit_are_refused_naming_file_and_key(tmp_path):
    def refused(state, message, config=None, hidden=H, vocab=V, name="medusa_lm_head.pt"):
        path = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        path.mkdir()
        torch.save(state, path / name)
        if config is not None:
            (path / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=message):
            load_heads(path, hidden, vocab)

    v1 = medusa_heads(3, vocab=V).state_dict()
    refused(v1, r"0.0.linear.weight has shape \(64, 64\); this model needs \(32, 32\)", hidden=32)
    refused(v1, r"0.1.weight has shape \(320, 64\); this model needs \(100, 64\)", vocab=100)
    refused({k: v for k, v in v1.items() if k != "1.0.linear.bias"}, r"missing \['1.0.linear.bias'\]")
    refused({**v1, "0.0.linear.extra": v1["0.0.linear.bias"]}, "has key '0.0.linear.extra', not of Medusa's layout")
    refused({k: v for k, v in v1.items() if not k.startswith("1.")}, r"holds heads \[0, 2\]")
    refused(v1, "says medusa_num_heads = 4, medusa_lm_head.pt holds 3", config={"medusa_num_heads": 4})
    refused(v1, "says version 2 .* an lm_head per head", config={"version": "2"})
    refused({"0.0.linear.weight": torch.zeros(H, H), "meta": [1, 2]}, "does not hold a state dict of tensors")
    refused({"0.0.linear.weight": torch.zeros(H, H), "note": SimpleNamespace(code=1)},
            "holds more than tensors, refused")
    both = write_v2(tmp_path / "both", medusa_heads(1))
    torch.save(medusa_heads(1).state_dict(), both / "medusa_lm_head.pt")
    with pytest.raises(ValueError, match="holds both of medusa_lm_head.safetensors and medusa_lm_head.pt"):
        load_heads(both, H, V)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds neither"):
        load_heads(tmp_path / "empty", H, V)
    with pytest.raises(ValueError, match="is neither a head file nor a directory"):
        load_heads(tmp_path / "missing", H, V)
    with pytest.raises(ValueError, match="path .* is required"):
        build("medusa", {})


def original_loop(model, heads, lm_head, p_ids, g_ids):
    """The original fidbench's Medusa.compute_accuracy, written out: prefill the prompt, feed g[i] with the cache,
    compare the base's prediction and each head's with g[i+1], g[i+2], ...; per prediction (base first) acc@1, acc@5."""
    stack = model.get_decoder() or model.model  # transformers 4.56: get_decoder() is None on *ForCausalLM
    kwarg = engine._cache_kwarg(stack)

    def step(ids, cache):
        out = stack(input_ids=torch.tensor([ids]), use_cache=True, **{kwarg: cache})
        return out.last_hidden_state[0, -1], getattr(out, "cache", None) or out.past_key_values

    n = len(heads.heads) + 1
    turns = len(g_ids) - n
    _, cache = step(p_ids, None)
    acc1, acc5 = [0] * n, [0] * n
    with torch.no_grad():
        for i in range(turns):
            hidden, cache = step(g_ids[i : i + 1], cache)
            logits = torch.cat([lm_head(hidden)[None], heads(hidden, lm_head if heads.version == "2" else None)])
            for j in range(n):
                label = g_ids[i + 1 + j]
                acc1[j] += int(logits[j].argmax()) == label
                acc5[j] += label in logits[j].topk(5).indices.tolist()
    return [a / turns for a in acc1], [a / turns for a in acc5], turns


def score(model, params, ref):
    method = build("medusa", params)
    with method.apply(model) as applied:
        return method.score_sample(applied, ref)


@pytest.mark.parametrize("family", sorted(FAMILIES))  # the family matrix for this method (tests/test_families.py)
def test_medusa_on_every_family(tmp_path, family):
    """The per-head and overall scores are the original loop's, for heads near the base's next-token predictor
    (so that they agree with the reference sometimes)."""
    model = tiny_model(family)
    ref = reference(model, torch.randint(0, 283, (40,), generator=torch.Generator().manual_seed(1)).tolist())
    path = write_v2(tmp_path / "v2", medusa_heads(3, std=0.02))
    got = score(model, {"path": str(path)}, ref)
    heads = load_heads(path, H, V)
    acc1, acc5, turns = original_loop(model, heads, model.get_output_embeddings(), ref.p_ids, ref.g_ids)
    assert turns == len(ref.g_ids) - 4 and got["n_tokens"] == 3 * turns
    assert [h["acc1"] for h in got["heads"]] == pytest.approx(acc1[1:], abs=1e-12)
    assert [h["acc5"] for h in got["heads"]] == pytest.approx(acc5[1:], abs=1e-12)
    # The headline: the heads' own, their mean (Medusa reports each head's top-k accuracy).
    assert got["acc1"] == pytest.approx(sum(acc1[1:]) / 3) and got["acc5"] == pytest.approx(sum(acc5[1:]) / 3)
    assert acc1[0] == 1.0  # the base's own prediction is the reference
    pooled = score(model, {"path": str(path), "count_base": True}, ref)  # the original fidbench's figure
    assert pooled["acc1"] == pytest.approx(sum(acc1) / 4) and pooled["n_tokens"] == 4 * turns


def test_a_head_copying_the_base_lm_head_predicts_the_next_token_not_its_own(tmp_path):
    """Identity ResBlocks and the base's lm_head copied (v1): each head predicts token t+1 from position t, so head
    k (target t+1+k) is right exactly where the reference repeats itself k tokens later."""
    model = tiny_model("llama")
    ref = reference(model, list(range(3, 43)), n=40)
    heads = medusa_heads(3, vocab=V, std=0.0)
    for head in heads:
        head[1].weight.data.copy_(model.get_output_embeddings().weight)
    got = score(model, {"path": str(write_v1(tmp_path / "copy", heads))}, ref)
    g, turns = ref.g_ids, len(ref.g_ids) - 4
    for k, head in enumerate(got["heads"], start=1):
        expected = sum(g[i + 1] == g[i + 1 + k] for i in range(turns)) / turns
        assert head["acc1"] == pytest.approx(expected, abs=1e-12) and head["n_tokens"] == turns
    assert any(h["acc1"] > 0 for h in got["heads"]) and any(h["acc1"] < 1 for h in got["heads"])  # a real check
    assert got["acc1"] == pytest.approx(sum(h["acc1"] for h in got["heads"]) / 3)


def test_a_reference_too_short_for_the_heads_scores_nothing(tmp_path):
    model = tiny_model("llama")
    ref = reference(model, list(range(3, 20)), n=4)  # 4 tokens, 3 heads: no position has every target
    got = score(model, {"path": str(write_v2(tmp_path / "v2", medusa_heads(3)))}, ref)
    assert got["n_tokens"] == 0 and [h["n_tokens"] for h in got["heads"]] == [0, 0, 0]


@pytest.fixture
def tiny_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FIDBENCH_CACHE", str(tmp_path / "cache"))
    return save_tiny(tmp_path / "tiny", "llama", eos=2)


def suite_with(tmp_path, model_dir, methods):
    rows = [{"conversations": [{"role": "user", "content": c}]} for c in ("say a few words", "count to ten please")]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    suite = {"generation": {"max_new_tokens": 16}, "models": {"tiny": {"path": str(model_dir), "max_length": 256}},
             "datasets": {"chat": "chat.jsonl"}, "methods": methods}
    (tmp_path / "suite.yaml").write_text(json.dumps(suite))
    suite = load(tmp_path / "suite.yaml")
    return Bench(suite, progress=False), {c.variant.name: c for c in suite.cases()}


def test_per_head_scores_reach_the_record_the_report_and_the_table(tmp_path, tiny_dir):
    path = write_v2(tmp_path / "v2", medusa_heads(2, std=0.02))
    bench, cases = suite_with(tmp_path, tiny_dir, {"medusa": {"path": str(path)}})
    record = bench.run(cases["medusa"])
    refs = bench.loaded.references
    per_sample = [score(bench.loaded.model, {"path": str(path)}, ref) for ref in refs]
    turns = [s["heads"][0]["n_tokens"] for s in per_sample]
    heads = record["scores"]["heads"]
    assert [h["head"] for h in heads] == [1, 2] and [h["n_tokens"] for h in heads] == [sum(turns)] * 2
    for k in range(2):  # token-weighted over the samples
        expected = sum(s["heads"][k]["acc1"] * n for s, n in zip(per_sample, turns)) / sum(turns)
        assert heads[k]["acc1"] == pytest.approx(expected, abs=1e-12)
    assert record["datasets"]["chat"]["heads"] == heads and record["scores"]["kl_mean"] is None
    assert record["samples"][0]["heads"][0]["acc1"] == per_sample[0]["heads"][0]["acc1"]
    assert record["kept"]["format"] == "v2" and record["kept"]["heads"] == 2
    doc = report.Report(str(tmp_path / "r.json"), {}, [record["id"]])
    doc.add(record)
    cases_ = report.read(tmp_path / "r.json")["cases"]
    table = report.table(cases_)
    assert "head 1" in table and "head 2" in table
    bad = json.loads((tmp_path / "r.json").read_text())
    bad["cases"][0]["scores"]["heads"][0]["acc1"] = "high"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(report.ReportError, match=r"scores.heads\[0\].acc1: expected a number or null"):
        report.read(tmp_path / "bad.json")


def test_heads_with_nan_weights_fail_the_case_as_non_finite_logits(tmp_path, tiny_dir):
    """NaN heads still have an argmax, and the pooled acc@1 counts the base's own predictions: without the check
    the case passed ``acc1 >= 0.4`` with ``non_finite 0``."""
    heads = medusa_heads(2, std=0.02)
    heads[1][0].linear.weight.data[0, 0] = float("nan")
    path = write_v2(tmp_path / "nan", heads)
    bench, cases = suite_with(tmp_path, tiny_dir, {"medusa": {"path": str(path), "count_base": True,
                                                                   "floors": {"acc1": 0.4}}})
    record = bench.run(cases["medusa"])
    assert record["scores"]["acc1"] >= 0.4  # the floor alone would pass (on the pooled figure it was set on)
    assert record["outcome"] == "failed" and record["non_finite"] == sum(s["n_tokens"] // 3 for s in record["samples"])
    assert record["samples"][0]["first_non_finite"] == 0
    assert record["failures"][0].startswith("method 'medusa' (variant 'medusa') gave non-finite logits (NaN or inf)")
    ok = write_v2(tmp_path / "ok", medusa_heads(2))
    good = score(bench.loaded.model, {"path": str(ok)}, bench.loaded.references[0])
    assert good["non_finite"] == 0 and good["first_non_finite"] is None


def test_trainer_reduces_its_loss_and_writes_medusa_v2_files(tmp_path, tiny_dir):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"conversations": [{"role": "user", "content": f"tell me about {w}"}]}) + "\n"
                            for w in ("cats", "the sea", "trees", "numbers", "bread", "music")))
    out = tmp_path / "heads"
    argv = ["train-medusa", str(tiny_dir), str(out), "--heads", "2", "--steps", "60", "--batch", "32", "--lr", "0.01",
            "--max-new-tokens", "24", "--data", str(data)]
    assert cli.main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["medusa_num_heads"] == 2 and config["medusa_num_layers"] == 1 and config["version"] == "2"
    first, last = config["fidbench"]["loss_first_steps"], config["fidbench"]["loss_last_steps"]
    assert all(b < 0.8 * a for a, b in zip(first, last)), (first, last)
    assert len(load_heads(out, H, V).heads) == 2
    assert cli.main(argv) == 2  # heads already there: --force to overwrite


def _no_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the arguments were checked")


@pytest.mark.parametrize("model,message", [
    ("{tmp}/nowhere", "model '{tmp}/nowhere' is neither a model directory nor an embedded name"),
    ("no-such-model", "model 'no-such-model' is neither a model directory nor an embedded name"),
    ("{tmp}/empty", "model directory {tmp}/empty has no config.json"),
])
def test_train_medusa_names_a_model_it_cannot_find_before_loading(tmp_path, capsys, monkeypatch, model, message):
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(medusa_train.models, "load", _no_load)
    assert cli.main(["train-medusa", model.format(tmp=tmp_path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fidbench train-medusa: error: train-medusa: " + message.format(tmp=tmp_path))
    assert "internet" not in err and "Traceback" not in err


def test_train_medusa_checks_device_and_output_before_training(tmp_path, tiny_dir, capsys, monkeypatch):
    monkeypatch.setattr(medusa_train.models, "load", _no_load)
    (tmp_path / "file").write_text("")
    assert cli.main(["train-medusa", str(tiny_dir), str(tmp_path / "file" / "heads")]) == 2
    assert f"train-medusa: cannot write to {tmp_path / 'file' / 'heads'}: " in capsys.readouterr().err
    assert cli.main(["train-medusa", str(tiny_dir), str(tmp_path / "out"), "--device", "gpu"]) == 2
    assert "--device 'gpu' is not a device (cpu, cuda, cuda:N)" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli.main(["train-medusa", str(tiny_dir), str(tmp_path / "out"), "--device", "cuda"]) == 2
        assert "--device cuda: this torch" in capsys.readouterr().err


class Evil:
    def __reduce__(self):
        import os

        return os.system, ("echo ran > pwned",)


def test_a_model_with_code_in_its_pickled_weights_is_refused_in_one_line(tmp_path, tiny_dir, capsys, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.chdir(tmp_path)
    state = load_file(str(tiny_dir / "model.safetensors"))
    (tiny_dir / "model.safetensors").unlink()
    torch.save({**state, "evil": Evil()}, tiny_dir / "pytorch_model.bin")
    assert cli.main(["train-medusa", str(tiny_dir), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fidbench train-medusa: error: model {str(tiny_dir)!r}: its pickle-based weights "
                          "(pytorch_model.bin or similar) are not a plain tensor checkpoint, refused by torch.load"
                          "(weights_only=True), which runs no code: ")
    assert "posix.system" in err and "weights_only=False" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "pwned").exists()


def test_path_auto_trains_once_per_model_and_caches(tmp_path, tiny_dir, monkeypatch):
    monkeypatch.setattr(medusa_train.Settings, "__init__", _quick_settings(medusa_train.Settings.__init__))
    bench, cases = suite_with(tmp_path, tiny_dir, {"medusa": {"path": "auto", "heads": 2}})
    first = bench.run(cases["medusa"])
    trained = list((tmp_path / "cache" / "medusa").glob("tiny-*/medusa_lm_head.safetensors"))
    assert len(trained) == 1 and first["kept"]["path"] == str(trained[0].parent)
    monkeypatch.setattr(medusa_train, "train", lambda *a, **k: pytest.fail("trained again"))
    bench, cases = suite_with(tmp_path, tiny_dir, {"medusa": {"path": "auto", "heads": 2}})
    assert bench.run(cases["medusa"])["scores"] == first["scores"]


def _quick_settings(init):
    """The trainer's defaults with fewer steps and shorter continuations (a tiny model learns nothing more)."""
    def quick(self, heads=3, layers=1, steps=20, batch=16, lr=1e-3, seed=0, max_new_tokens=8,
              data=str(medusa_train.DATA)):
        init(self, heads, layers, steps, batch, lr, seed, max_new_tokens, data)
    return quick
