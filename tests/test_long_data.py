"""Long-context datasets (data/make_long.py): lengths in rendered tokens, determinism, answers present and
correct, and the committed files under data/long/ loadable as fidbench datasets."""

import ast
import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import pytest
from helpers import tiny_tokenizer

from fidbench import models
from fidbench.datasets import load, render
from fidbench.suite import DatasetSpec

DATA = Path(__file__).parents[1] / "data"
_spec = importlib.util.spec_from_file_location("make_long", DATA / "make_long.py")
make_long = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_long)

FAMILIES = list(make_long.FAMILIES)
# The tiny tokenizer spends a token per character or two, three times smollm2's rate: a function of the code
# family takes 100 to 150 of its tokens, and the 3 % window must be wider than that.
SIZES = (5000, 8000)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def generated(tok):
    return {(family, n): make_long.generate(family, tok, n) for family in FAMILIES for n in SIZES}


def content(record) -> str:
    return record["conversations"][0]["content"]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("family", FAMILIES)
def test_prompts_render_to_97_to_100_percent_of_n(generated, tok, family, n):
    records = generated[family, n]
    assert len(records) == make_long.NUM_PROMPTS
    for r in records:
        length = len(render(tok, r["conversations"], "test")[0])
        assert make_long.MIN_FILL * n <= length == r["tokens"] <= n
        assert r["task"] == family


@pytest.mark.parametrize("family", FAMILIES)
def test_answers_occur_in_the_context(generated, family):
    for r in generated[family, SIZES[0]]:
        assert all(isinstance(a, str) and a in content(r) for a in r["answers"])
        assert bool(r["answers"]) == (family != "summarization")


@pytest.mark.parametrize("family", FAMILIES)
def test_same_arguments_same_bytes_other_seed_other_prompts(generated, tok, family):
    again = make_long.generate(family, tok, SIZES[0])
    assert json.dumps(again) == json.dumps(generated[family, SIZES[0]])
    other = make_long.generate(family, tok, SIZES[0], seed=make_long.DEFAULT_SEED + 1)
    assert all(content(a) != content(b) for a, b in zip(other, again))


@pytest.mark.parametrize("family", ["needles", "vartrack", "multidoc", "code"])
def test_the_needle_depth_varies_across_prompts(generated, family):
    depths = [content(r).index(r["answers"][0]) / len(content(r)) for r in generated[family, SIZES[1]]]
    assert max(depths) - min(depths) > 0.3


def test_aggregation_answers_are_the_three_most_frequent_in_order(generated):
    for r in generated["aggregation", SIZES[0]]:
        counts = Counter(re.findall(r"^\d+\. (.+)$", content(r), re.MULTILINE)).most_common()
        assert [bird for bird, _ in counts[:3]] == r["answers"]
        assert counts[0][1] > counts[1][1] > counts[2][1] > counts[3][1]
    birds = make_long.BIRDS  # no answer can be found inside another bird's name
    assert not [(a, b) for a in birds for b in birds if a != b and a in b]


def resolve(source: dict, name: str) -> str:
    """The number a variable holds, following its assignments back."""
    return name if name.isdigit() else resolve(source, source[name])


def test_vartrack_answers_follow_the_chain(generated):
    for i, r in enumerate(generated["vartrack", SIZES[0]]):
        source = dict(re.findall(r"VAR ([A-Z]{5}) = (\w+)\.", content(r)))
        if i % 2 == 0:
            asked = re.search(r"assigned the value (\d+)", content(r)).group(1)
            assert sorted(r["answers"]) == sorted(n for n in source if resolve(source, n) == asked)
        else:
            asked = re.search(r"value of the variable ([A-Z]{5})\?", content(r)).group(1)
            assert r["answers"] == [resolve(source, asked)]


def test_code_is_valid_python_and_the_answer_is_right(generated):
    for r in generated["code", SIZES[0]]:
        module = re.search(r"```python\n(.*)\n```", content(r), re.DOTALL).group(1)
        namespace = {}
        exec(compile(ast.parse(module), "module", "exec"), namespace)
        target = namespace[re.search(r"`(\w+)`[^`]*$", content(r)).group(1)]
        answer = r["answers"][0]
        if "multiply" in content(r)[-200:]:
            assert target(1) - target(0) == int(answer)
        elif "default value" in content(r)[-200:]:
            assert target.__defaults__ == (int(answer),)
        else:
            assert target.__code__.co_names == (answer,)


def test_multidoc_answer_is_in_the_one_document_about_the_asked_entity(generated):
    for r in generated["multidoc", SIZES[0]]:
        entity = re.search(r"the ([A-Z][a-z]+ [A-Z][\w ]+?)(?: founded)?\? Answer", content(r)).group(1)
        documents = [d for d in content(r).split("\n\nDocument ") if d.split("\n")[0].endswith(": " + entity)]
        assert len(documents) == 1 and r["answers"][0] in documents[0]


@pytest.mark.parametrize("path", sorted((DATA / "long").glob("*.jsonl")), ids=lambda p: p.stem)
def test_committed_files_load_as_fidbench_datasets(tok, path):
    family = path.stem.rsplit("-", 1)[0]
    assert len(load(DatasetSpec(path.stem, path, "conversations"), tok)) == make_long.NUM_PROMPTS
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert all(r["task"] == family and isinstance(r["answers"], list) for r in rows)


def test_every_family_is_committed_at_4k_and_8k():
    assert sorted(p.name for p in (DATA / "long").glob("*.jsonl")) == sorted(
        f"{family}-{label}.jsonl" for family in FAMILIES for label in ("4k", "8k"))


SMOLLM = models.converted_dir("smollm2-135m")


@pytest.mark.slow
@pytest.mark.skipif(not (SMOLLM / "config.json").exists(), reason="the default model is not converted yet")
def test_committed_4k_token_counts_match_the_default_model():
    from transformers import AutoTokenizer

    smollm = AutoTokenizer.from_pretrained(SMOLLM)
    for path in sorted((DATA / "long").glob("*-4k.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            length = len(render(smollm, row["conversations"], str(path))[0])
            assert make_long.MIN_FILL * 4000 <= length == row["tokens"] <= 4000
