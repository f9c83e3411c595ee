"""Datasets: rendering with the chat template or the fallback, imported references, overlong policy, errors."""

import json

import pytest
from helpers import tiny_tokenizer

from fidbench.datasets import DatasetError, Prompt, fit, load
from fidbench.suite import DatasetSpec


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def write(tmp_path, rows, kind="conversations"):
    path = tmp_path / "d.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return DatasetSpec("d", path, kind)


def conv(*turns):
    return {"conversations": [{"role": r, "content": c} for r, c in turns]}


def test_chat_template_renders_multi_turn(tmp_path, tok):
    spec = write(tmp_path, [conv(("user", "hello")),
                            conv(("system", "be brief"), ("user", "a"), ("assistant", "b"), ("user", "c"))])
    prompts = load(spec, tok)
    assert [p.template for p in prompts] == ["chat", "chat"]
    text = tok.decode(prompts[1].p_ids)
    assert text == ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\na<|im_end|>\n"
                    "<|im_start|>assistant\nb<|im_end|>\n<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n")


def test_fallback_template_for_tokenizers_without_one(tmp_path):
    tok = tiny_tokenizer(chat_template=None)
    prompts = load(write(tmp_path, [conv(("user", "hello"))]), tok)
    assert prompts[0].template == "fallback"
    assert tok.decode(prompts[0].p_ids) == "<|endoftext|>User: hello\n\nAssistant:"


def test_limit_takes_the_first_prompts(tmp_path, tok):
    prompts = load(write(tmp_path, [conv(("user", str(i))) for i in range(5)]), tok, limit=2)
    assert [p.index for p in prompts] == [0, 1] and tok.decode(prompts[1].p_ids).count("1") == 1


@pytest.mark.parametrize(
    "row,message",
    [
        ("{not json", ":1: not valid JSON"),
        ({"messages": []}, ":1: expected an object with key 'conversations'"),
        ({"conversations": []}, "non-empty list"),
        (conv(("robot", "x")), "turn 0 has role 'robot'"),
        ({"conversations": [{"role": "user"}]}, "exactly 'role' and 'content'"),
        (conv(("user", "x"), ("system", "y")), "last turn is a system message"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, tok, row, message):
    spec = write(tmp_path, [row])
    with pytest.raises(DatasetError) as e:
        load(spec, tok)
    assert str(spec.path) in str(e.value) and message in str(e.value)


def test_template_failure_is_a_clear_error(tmp_path):
    tok = tiny_tokenizer(chat_template="{{ raise_exception('only user turns') }}")
    with pytest.raises(DatasetError, match="chat template failed to render: only user turns"):
        load(write(tmp_path, [conv(("user", "x"))]), tok)


def test_imported_references(tmp_path, tok):
    prompts = load(write(tmp_path, [{"p_ids": [1, 2, 3], "g_ids": [4, 5]}], "references"), tok)
    assert prompts[0].p_ids == [1, 2, 3] and prompts[0].g_ids == [4, 5] and prompts[0].template == "ids"
    with pytest.raises(DatasetError, match="vocabulary size"):
        load(write(tmp_path, [{"p_ids": [1, 99999], "g_ids": [4]}], "references"), tok)
    with pytest.raises(DatasetError, match="'p_ids' and 'g_ids'"):
        load(write(tmp_path, [{"p_ids": [1]}], "references"), tok)


def test_overlong_prompts_are_truncated_in_the_middle_or_skipped():
    ids = list(range(100))
    short = fit(Prompt("d", 0, ids[:10]), max_length=64, max_new_tokens=16, policy="truncate")
    assert short.p_ids == ids[:10] and short.truncated_from is None
    cut = fit(Prompt("d", 0, list(ids)), max_length=64, max_new_tokens=16, policy="truncate")
    assert cut.p_ids == ids[:24] + ids[-24:] and cut.truncated_from == 100 and cut.skipped is None
    skipped = fit(Prompt("d", 0, list(ids)), max_length=64, max_new_tokens=16, policy="skip")
    assert skipped.skipped == "prompt of 100 tokens + generation exceeds max_length 64"
    imported = fit(Prompt("d", 0, list(ids), g_ids=[1] * 40), max_length=64, max_new_tokens=16, policy="truncate")
    assert len(imported.p_ids) == 24  # an imported reference's own length counts, not max_new_tokens


def test_tokenizer_ids_outside_the_model_vocabulary_are_an_error(tmp_path, tok):
    with pytest.raises(DatasetError, match="outside the model's vocabulary of 10: tokenizer and model do not match"):
        load(write(tmp_path, [conv(("user", "hello"))]), tok, vocab_size=10)


def test_non_utf8_file_names_file_and_line(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(conv(("user", "fine"))).encode() + b"\n" + b'{"conversations": "caf\xe9"}\n')
    with pytest.raises(DatasetError) as e:
        load(DatasetSpec("d", path, "conversations"), tok)
    assert str(e.value) == f"{path}:2: not UTF-8 text (byte 22 of the line)"


def test_integer_content_is_a_content_problem_not_a_role_problem(tmp_path, tok):
    spec = write(tmp_path, [{"conversations": [{"role": "user", "content": 42}]}])
    with pytest.raises(DatasetError) as e:
        load(spec, tok)
    assert str(e.value) == f"{spec.path}:1: turn 0's content must be a string, got int 42"


def test_a_conversation_rendered_as_no_tokens_is_a_clear_error(tmp_path):
    tok = tiny_tokenizer(chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    spec = write(tmp_path, [conv(("user", ""))])
    with pytest.raises(DatasetError) as e:
        load(spec, tok)
    assert str(e.value) == f"{spec.path}:1: the chat template rendered this conversation as no tokens at all"


@pytest.mark.parametrize("row,message", [
    ({"p_ids": [True, 5], "g_ids": [4]}, "'p_ids' holds true, not an integer token id"),
    ({"p_ids": [1, 2], "g_ids": [4, None]}, "'g_ids' holds null, not an integer token id"),
    ({"p_ids": [1, 2.0], "g_ids": [4]}, "'p_ids' holds 2.0, not an integer token id"),
    ({"p_ids": "1 2", "g_ids": [4]}, "'p_ids' must be a non-empty list of token ids"),
])
def test_imported_ids_must_be_integers(tmp_path, tok, row, message):
    spec = write(tmp_path, [row], "references")
    with pytest.raises(DatasetError) as e:
        load(spec, tok)
    assert str(e.value) == f"{spec.path}:1: {message}"
