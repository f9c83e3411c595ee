"""Suite files: what a valid one gives, and clear errors naming the file and key for bad ones."""

import textwrap
from pathlib import Path

import pytest

from fidbench.methods import build
from fidbench.suite import SuiteError, load

GOOD = """
generation: {max_new_tokens: 16}
models:
  tiny: {path: some/dir, dtype: bf16, device: cuda:1, max_length: 128}
datasets:
  chat: chat.jsonl
methods:
  origin: {floors: {acc1: 0.99}}
  topk-10: {method: topk, keep: 0.1}
  topk-25: {method: topk, keep: 0.25, floors: {acc1: 0.5}}
floors:
  tiny:
    topk-25: {acc5: 0.9}
"""


def write(tmp_path, text):
    (tmp_path / "chat.jsonl").write_text('{"conversations": [{"role": "user", "content": "hi"}]}\n')
    path = tmp_path / "suite.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_valid_suite_gives_cases_in_file_order(tmp_path):
    suite = load(write(tmp_path, GOOD))
    cases = suite.cases()
    assert [c.id for c in cases] == ["tiny-origin", "tiny-topk-10", "tiny-topk-25"]
    assert cases[0].floors == {"acc1": 0.99}
    assert cases[2].floors == {"acc1": 0.5, "acc5": 0.9}  # per-model floors add to the variant's
    assert cases[1].variant.params == {"keep": 0.1} and cases[1].model.dtype == "bf16"
    assert suite.max_new_tokens == 16 and suite.datasets[0].path == tmp_path / "chat.jsonl"


@pytest.mark.parametrize(
    "old,new,message",
    [
        ("generation: {max_new_tokens: 16}", "generation: {max_new_tokens: 16, temperature: 1}",
         "generation: unknown key 'temperature'"),
        ("max_length: 128}", "max_len: 128}", "models.tiny: unknown key 'max_len'"),
        ("dtype: bf16", "dtype: int3", "models.tiny.dtype: 'int3'"),
        ("device: cuda:1", "device: gpu", "models.tiny.device"),
        ("chat: chat.jsonl", "chat: missing.jsonl", "datasets.chat: file"),
        ("method: topk, keep: 0.1}", "method: topq, keep: 0.1}", "methods.topk-10.method: unknown method 'topq'"),
        ("method: topk, keep: 0.1}", "method: topk, mask_out: 0.9}", "methods.topk-10: unknown parameter(s) mask_out"),
        ("method: topk, keep: 0.1}", "method: topk, keep: 2}", "methods.topk-10: topk: keep must be in (0, 1]"),
        ("floors: {acc1: 0.99}", "floors: {accuracy: 0.99}", "methods.origin.floors: unknown key 'accuracy'"),
        ("    topk-25: {acc5: 0.9}", "    topk-50: {acc5: 0.9}", "floors.tiny: unknown key 'topk-50'"),
        ("  tiny: {path", "  tiny model: {path", "models: name 'tiny model'"),
        ("chat: chat.jsonl", "chat: {path: chat.jsonl, score: no-thanks}",
         "datasets.chat.score: must be true or false"),
        ("chat: chat.jsonl", "chat: {path: chat.jsonl, score: false}", "datasets (at least one scored)"),
    ],
)
def test_bad_suites_name_file_and_key(tmp_path, old, new, message):
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new))
    with pytest.raises(SuiteError) as e:
        load(path)
    assert str(path) in str(e.value) and message in str(e.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(SuiteError, match="does not exist"):
        load(tmp_path / "nope.yaml")
    with pytest.raises(SuiteError, match="not valid YAML"):
        load(write(tmp_path, "models: [\n"))
    with pytest.raises(SuiteError, match="missing key 'datasets'"):
        load(write(tmp_path, "models: {a: {}}\nmethods: {origin: {}}\n"))


def test_the_default_suite_loads():
    from helpers import ROOT

    suite = load(ROOT / "fidbench.yaml")
    assert suite.models[0].name == "smollm2-135m" and {"origin", "topk"} <= {v.method for v in suite.variants}
    assert len(suite.datasets) >= 7


@pytest.mark.parametrize("name", ["gemma3.yaml", "long.yaml", "long-8k.yaml"])
def test_every_shipped_suite_loads_and_builds_its_variants(name):
    from helpers import ROOT

    suite = load(ROOT / "suites" / name)
    assert suite.cases() and all(ds.path.exists() for ds in suite.datasets)
    for variant in suite.variants:
        build(variant.method, variant.params)


def test_colliding_case_ids_are_refused_naming_both_cases(tmp_path):
    path = write(tmp_path, """
        models:
          m: {path: some/dir}
          m-a: {path: some/dir}
        datasets: {chat: chat.jsonl}
        methods:
          origin: {}
          a-origin: {method: origin}
    """)
    with pytest.raises(SuiteError) as e:
        load(path)
    assert str(path) in str(e.value)
    assert ("model 'm' × variant 'a-origin' and model 'm-a' × variant 'origin' have the same case id 'm-a-origin'"
            in str(e.value))


@pytest.mark.parametrize("old,new,message", [  # wrong parameter types, through a suite file
    ("method: topk, keep: 0.1}", "method: rtn, symmetric: 'false'}",
     "methods.topk-10: parameter 'symmetric' of method 'rtn' must be bool, got 'false' (str)"),
    ("method: topk, keep: 0.1}", "method: topk, keep: true}",
     "methods.topk-10: parameter 'keep' of method 'topk' must be float, got True (bool)"),
    ("method: topk, keep: 0.1}", "method: topk, keep: '0.1'}",
     "methods.topk-10: parameter 'keep' of method 'topk' must be float, got '0.1' (str)"),
    ("method: topk, keep: 0.1}", "method: tova, min_budget: 8.5}",
     "methods.topk-10: parameter 'min_budget' of method 'tova' must be int, got 8.5 (float)"),
])
def test_parameter_types_are_checked_naming_variant_parameter_type_and_value(tmp_path, old, new, message):
    path = write(tmp_path, GOOD.replace(old, new))
    with pytest.raises(SuiteError) as e:
        load(path)
    assert str(e.value) == f"{path}: {message}"


@pytest.mark.parametrize("old,new,message", [
    ("models:\n  tiny: {path: some/dir, dtype: bf16, device: cuda:1, max_length: 128}",
     "models:\n  - {path: some/dir}", "models: expected a mapping of names to entries, got list"),
    ("methods:\n", "methods:\n  bare: topk\n", "methods.bare: expected a mapping of the method's parameters"),
    ("methods:\n", "methods:\n  listed: [topk, 0.1]\n",
     "methods.listed: expected a mapping of the method's parameters"),
    ("dtype: bf16", "dtype: [bf16]", "models.tiny.dtype: must be a string, got ['bf16']"),
    ("path: some/dir", "path: [some/dir]", "models.tiny.path: must be a string"),
    ("max_length: 128", "max_length: true", "models.tiny.max_length must be an integer"),
    ("chat: chat.jsonl", "chat: .", "datasets.chat: " + "{dir} is not a file"),
    ("chat: chat.jsonl", "chat: {path: 3}", "datasets.chat.path: must be a file path, got 3"),
    ("floors: {acc1: 0.99}", "floors: {acc1: 1.5}",
     "methods.origin.floors.acc1: floor 1.5 is outside the metric's range [0, 1]: this minimum would never hold"),
    ("floors: {acc1: 0.99}", "floors: {acc1: -1}", "methods.origin.floors.acc1: floor -1 is outside the metric's range "
     "[0, 1]: this minimum would always hold"),
    ("floors: {acc1: 0.99}", "floors: {kl_mean: -1}", "methods.origin.floors.kl_mean: floor -1 is outside the metric's "
     "range [0, inf]: this maximum would never hold"),
    ("floors: {acc1: 0.99}", "floors: {first_divergence: -2}", "floors.first_divergence: floor -2 is outside"),
    ("floors: {acc1: 0.99}", "floors: {kl_max: .nan}",
     "methods.origin.floors.kl_max: floor must be a finite number, got nan"),
    ("floors: {acc1: 0.99}", "floors: {nll: .inf}",
     "methods.origin.floors.nll: floor must be a finite number, got inf"),
])
def test_malformed_suites_name_the_key_instead_of_crashing(tmp_path, old, new, message):
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new))
    with pytest.raises(SuiteError) as e:
        load(path)
    assert str(path) in str(e.value) and message.format(dir=tmp_path) in str(e.value)


@pytest.mark.parametrize("old,new,key,lines", [
    ("  topk-25: {method: topk, keep: 0.25", "  topk-10: {method: topk, keep: 0.25", "topk-10", (9, 10)),
    ("max_length: 128}", "max_length: 128}\n  tiny: {path: other/dir}", "tiny", (4, 5)),
    ("floors: {acc1: 0.5}", "floors: {acc1: 0.5, acc1: 0.1}", "acc1", (10, 10)),
])
def test_a_key_given_twice_is_refused_naming_it_and_both_lines(tmp_path, old, new, key, lines):
    path = write(tmp_path, GOOD.replace(old, new))
    with pytest.raises(SuiteError) as e:  # YAML keeps the last one silently, floors and all
        load(path)
    assert str(e.value).startswith(f"{path}: line {lines[1]}: key {key!r} is given twice in one mapping (first on "
                                   f"line {lines[0]})")


def test_merge_keys_may_override_what_they_merge(tmp_path):
    suite = load(write(tmp_path, GOOD.replace("topk-25: {method: topk, keep: 0.25",
                                              "topk-25: {<<: *t, keep: 0.25").replace("topk-10: {", "topk-10: &t {")))
    assert [v.params for v in suite.variants] == [{}, {"keep": 0.1}, {"keep": 0.25}]
    # a mapping that merges and overrides, itself merged by a shallower mapping that PyYAML constructs first
    from fidbench.suite import _parse

    assert _parse("b: &b {x: 1}\ndefs:\n  mid: &m {<<: *b, x: 2}\ntop: {<<: *m, y: 3}\n")["defs"] == {"mid": {"x": 2}}


@pytest.mark.parametrize("tag", ["xfail", "skip", "skipif", "usefixtures", "filterwarnings"])
def test_tags_that_pytest_acts_on_are_refused(tmp_path, tag):
    path = write(tmp_path, GOOD.replace("keep: 0.1}", f"keep: 0.1, tags: [quick, {tag}]}}"))
    with pytest.raises(SuiteError) as e:  # xfail would turn a failed floor into exit 0
        load(path)
    assert str(e.value).startswith(f"{path}: methods.topk-10.tags: {tag!r} is a marker pytest or a plugin acts on")


def test_an_alias_bomb_is_refused_at_once_and_long_values_are_shown_short(tmp_path):
    import time

    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]  # 9^10 values once expanded
    bomb = "\n".join("  " + line for line in levels)
    path = write(tmp_path, "bombs:\n" + bomb + "\n" + GOOD.replace("keep: 0.1}", "keep: 0.1, tags: *a9}"))
    start = time.monotonic()
    with pytest.raises(SuiteError) as e:
        load(path)
    assert "expands to more than 100,000 values" in str(e.value) and len(str(e.value)) < 300
    assert time.monotonic() - start < 30  # a generous bound: the count stops at the limit
    path = write(tmp_path, GOOD.replace("keep: 0.1}", f"keep: 0.1, tags: [{', '.join(['not-a-name'] * 5000)}]}}"))
    with pytest.raises(SuiteError) as e:  # below the limit, but no 60,000-character message either
        load(path)
    assert "methods.topk-10.tags: must be a list of marker names" in str(e.value) and len(str(e.value)) < 300


def test_numbers_with_an_exponent_are_floats_as_in_yaml_1_2(tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-1 as the string '1e-1'; fidbench reads it as YAML 1.2 does
    suite = load(write(tmp_path, GOOD.replace("keep: 0.1}", "keep: 1e-1, floors: {kl_mean: 2.5E-3, nll: 1e+1}}")))
    assert suite.variants[1].params == {"keep": 0.1}
    assert suite.floors["*"]["topk-10"] == {"kl_mean": 0.0025, "nll": 10.0}
    assert load(write(tmp_path, GOOD.replace("some/dir", "1e5-dir"))).models[0].path == "1e5-dir"


def test_a_validate_that_raises_something_else_names_the_variant(tmp_path):
    from fidbench.methods import REGISTRY, Method, register

    saved = dict(REGISTRY)

    @register
    class Fragile(Method):
        name = "fragile-test"
        kind = "none"
        n: int = 0

        def validate(self):
            1 / self.n

    try:
        path = write(tmp_path, GOOD.replace("method: topk, keep: 0.1}", "method: fragile-test}"))
        with pytest.raises(SuiteError) as e:
            load(path)
    finally:
        REGISTRY.clear()
        REGISTRY.update(saved)
    assert str(e.value) == (f"{path}: methods.topk-10: checking the parameters of method 'fragile-test' raised "
                            f"ZeroDivisionError: division by zero")


def test_a_suite_file_that_is_not_utf8_is_named(tmp_path):
    path = write(tmp_path, GOOD)
    path.write_bytes(path.read_bytes().replace(b"some/dir", b"some/d\xefr"))
    with pytest.raises(SuiteError) as e:
        load(path)
    assert str(e.value).startswith(f"{path}: not UTF-8 text (byte ")


@pytest.mark.parametrize("value", [".inf", ".nan"])  # -1, true, "8": tests/test_prefill.py
def test_share_prefill_gib_must_be_finite(tmp_path, value):
    path = write(tmp_path, GOOD.replace("{max_new_tokens: 16}", f"{{max_new_tokens: 16, share_prefill_gib: {value}}}"))
    with pytest.raises(SuiteError, match="generation.share_prefill_gib must be a finite number of GiB >= 0"):
        load(path)


CALIBRATED = GOOD.replace("chat: chat.jsonl", "chat: chat.jsonl\n  calib: {path: chat.jsonl, score: false}")


@pytest.mark.parametrize("params,message", [
    ("dataset: nosuch", "methods.topk-10.dataset: 'nosuch' is not a dataset of this suite (chat, calib); gptq "
                        "calibrates on one of them"),
    ("dataset: chat", "methods.topk-10.dataset: 'chat' is scored, so gptq would be scored on the prompts it was "
                      "calibrated on"),
    ("samples: 2", "methods.topk-10.dataset: 'chat' is scored"),  # the default dataset, chat
])
def test_calibration_datasets_are_checked_before_any_model_loads(tmp_path, params, message):
    path = write(tmp_path, CALIBRATED.replace("method: topk, keep: 0.1}", f"method: gptq, {params}}}"))
    with pytest.raises(SuiteError) as e:
        load(path)
    assert str(e.value).startswith(f"{path}: {message}")


def test_calibrating_on_scored_prompts_needs_the_suite_to_say_so(tmp_path):
    def variant(params):
        return load(write(tmp_path, CALIBRATED.replace("method: topk, keep: 0.1}", f"method: awq, {params}}}")))

    assert variant("dataset: calib").variants[1].params == {"dataset": "calib"}
    assert variant("dataset: chat, calibrate_on_scored: true").variants[1].params["calibrate_on_scored"]
    two = CALIBRATED.replace("chat: chat.jsonl\n", "chat: chat.jsonl\n  other: chat.jsonl\n")
    suite = load(write(tmp_path, two.replace("method: topk, keep: 0.1}", "method: wanda, sparsity: 0.5, "
                                                                         "dataset: chat, "
                                                                         "datasets: [other]}")))
    assert suite.scored_by(suite.variants[1]) == ["other"]  # calibrates on chat, scored on other: allowed


def test_free_running_is_refused_on_text_windows(tmp_path):
    from fidbench.harness import Bench

    (tmp_path / "essay.txt").write_text("some plain text " * 20)
    text = GOOD.replace("chat: chat.jsonl", "chat: chat.jsonl\n  essay: {text: essay.txt, window: 64, default: false}")
    path = write(tmp_path, text.replace("keep: 0.1}", "keep: 0.1, free_run: true, datasets: [chat, essay]}"))
    with pytest.raises(SuiteError) as e:  # their reference is the text, not the base's own continuation
        load(path)
    assert str(e.value).startswith(f"{path}: methods.topk-10.free_run: free running compares the method's own "
                                   f"continuation with the base model's, and the windows of text dataset 'essay'")
    suite = load(write(tmp_path, text.replace("keep: 0.1}", "keep: 0.1, datasets: [essay]}")))
    with pytest.raises(ValueError, match="tiny-topk-10: free running .* text dataset 'essay' .* --fidbench-free-run"):
        Bench(suite, free_run=True).run(suite.cases()[1])  # before the model (some/dir, absent) loads


def test_method_files_are_relative_to_the_suite_file_from_any_directory(tmp_path, monkeypatch):
    import json

    here, elsewhere = tmp_path / "suite", tmp_path / "elsewhere"
    for root in (here, elsewhere):  # elsewhere holds files of the same names: they must not be picked up
        (root / "ckpt").mkdir(parents=True)
        (root / "ckpt" / "config.json").write_text("{}")
        (root / "mod.py").write_text("")
        (root / "cfg.json").write_text(json.dumps({"root": str(root)}))
        (root / "ft.pt").write_text("")
    methods = """
      ckpt: {method: checkpoint, path: ckpt, tokenizer: ckpt}
      heads: {method: medusa, path: heads/medusa.pt}
      auto-heads: {method: medusa, path: auto}
      old: {method: legacy, module: mod.py, cls: M, config: cfg.json, load_ckp: ft.pt}
      dotted: {method: legacy, module: my.modifiers, cls: M}
      hub: {method: checkpoint, path: org/model}
    """
    lines = textwrap.dedent(methods).strip().splitlines()
    text = GOOD.replace("  topk-10: {method: topk, keep: 0.1}\n", "".join(f"  {line}\n" for line in lines))
    path = write(here, text)
    params = []
    for cwd in (here, elsewhere):
        monkeypatch.chdir(cwd)
        params.append({v.name: v.params for v in load(Path("..") / "suite" / "suite.yaml").variants})
    assert params[0] == params[1]
    assert params[0]["ckpt"] == {"path": str(here / "ckpt"), "tokenizer": str(here / "ckpt")}
    assert params[0]["heads"] == {"path": str(here / "heads" / "medusa.pt")}
    assert params[0]["auto-heads"] == {"path": "auto"}
    assert params[0]["old"] == {"module": str(here / "mod.py"), "cls": "M", "config": str(here / "cfg.json"),
                                "load_ckp": str(here / "ft.pt")}
    assert params[0]["dotted"] == {"module": "my.modifiers", "cls": "M"}  # imported as Python imports it
    assert params[0]["hub"] == {"path": "org/model"}  # no such directory beside the suite: a hub id
    assert path == here / "suite.yaml"


def test_an_empty_model_directory_is_named_with_what_it_lacks(tmp_path):
    from fidbench import models

    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match=f"model directory {tmp_path / 'empty'} has no config.json"):
        models.model_type(str(tmp_path / "empty"))
