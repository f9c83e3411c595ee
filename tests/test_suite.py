"""Suite files: what a valid one gives, and clear errors naming the file and key for bad ones."""

import textwrap

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
        ("generation: {max_new_tokens: 16}", "generation: {max_new_tokens: 16, temperature: 1}", "generation: unknown key 'temperature'"),
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
        ("chat: chat.jsonl", "chat: {path: chat.jsonl, score: no-thanks}", "datasets.chat.score: must be true or false"),
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
    assert "model 'm' × variant 'a-origin' and model 'm-a' × variant 'origin' have the same case id 'm-a-origin'" in str(e.value)


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
    ("methods:\n", "methods:\n  listed: [topk, 0.1]\n", "methods.listed: expected a mapping of the method's parameters"),
    ("dtype: bf16", "dtype: [bf16]", "models.tiny.dtype: must be a string, got ['bf16']"),
    ("path: some/dir", "path: [some/dir]", "models.tiny.path: must be a string"),
    ("max_length: 128", "max_length: true", "models.tiny.max_length must be an integer"),
    ("chat: chat.jsonl", "chat: .", "datasets.chat: " + "{dir} is not a file"),
    ("chat: chat.jsonl", "chat: {path: 3}", "datasets.chat.path: must be a file path, got 3"),
    ("floors: {acc1: 0.99}", "floors: {acc1: 1.5}", "methods.origin.floors.acc1: floor 1.5 is outside the metric's range "
     "[0, 1]: this minimum would never hold"),
    ("floors: {acc1: 0.99}", "floors: {acc1: -1}", "methods.origin.floors.acc1: floor -1 is outside the metric's range "
     "[0, 1]: this minimum would always hold"),
    ("floors: {acc1: 0.99}", "floors: {kl_mean: -1}", "methods.origin.floors.kl_mean: floor -1 is outside the metric's "
     "range [0, inf]: this maximum would never hold"),
    ("floors: {acc1: 0.99}", "floors: {first_divergence: -2}", "floors.first_divergence: floor -2 is outside"),
    ("floors: {acc1: 0.99}", "floors: {kl_max: .nan}", "methods.origin.floors.kl_max: floor must be a finite number, got nan"),
    ("floors: {acc1: 0.99}", "floors: {nll: .inf}", "methods.origin.floors.nll: floor must be a finite number, got inf"),
])
def test_malformed_suites_name_the_key_instead_of_crashing(tmp_path, old, new, message):
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new))
    with pytest.raises(SuiteError) as e:
        load(path)
    assert str(path) in str(e.value) and message.format(dir=tmp_path) in str(e.value)
