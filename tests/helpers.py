"""Helpers shared by the tests: tiny random models of several families, tiny tokenizers and model
directories (all built in-process, no download), references and teacher-forced logits on them, pytester
projects over them, and checks shared by the calibrating methods' tests."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from fidbench import engine
from fidbench.datasets import Prompt
from fidbench.harness import Loaded
from fidbench.methods import _weights as weights
from fidbench.methods import build
from fidbench.reference import Reference, greedy

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(
    vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
)
WINDOW = 16  # sliding window of the tiny mistral / gemma3: the `prompt` fixture (40 tokens) exceeds it
# Overrides per family: what the family's config needs at TINY's size, and what makes it differ.
FAMILIES = {
    "llama": {},
    "qwen2": {},
    "qwen3": {"head_dim": 16},  # QK-norm on queries and keys; its default head_dim is 128
    "mistral": {"sliding_window": WINDOW},  # every layer sliding
    # One sliding and one full-attention layer; query_pre_attn_scalar != head_dim (its own scaling).
    "gemma3_text": {
        "head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": WINDOW,
        "layer_types": ["sliding_attention", "full_attention"], "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1,
    },
    "phi3": {"pad_token_id": 0, "eos_token_id": 2},  # fused qkv_proj; default token ids exceed TINY's vocabulary
}
# Families whose every layer is full attention: the `tiny` fixture runs method-specific tests on these.
# Sliding-window families (mistral, gemma3_text) are covered by tests/test_families.py, where KV methods
# leave sliding layers to the model's window and refuse models that have no full-attention layer.
FULL = sorted(f for f, o in FAMILIES.items() if "sliding_window" not in o)
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = "the a cat dog sat on mat ran far home red blue green tree sky sun moon one two three".split()


PLANTED = [0.0]  # seconds on the planted clock, advanced by tests that plant a speed


def planted_clock() -> float:
    """A clock for pytest-benchmark (``--benchmark-timer helpers.planted_clock``) that only planted work advances."""
    return PLANTED[0]


def tiny_model(family: str, seed: int = 0, **overrides):
    """A randomly initialised model of ``family`` (fp32, SDPA attention, eval mode)."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, **{**TINY, **FAMILIES.get(family, {}), **overrides})
    config._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def tiny_tokenizer(chat_template: str | None = CHATML):
    """A byte-level BPE tokenizer trained on this repo's datasets (under TINY's vocab size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator((p.read_text() for p in sorted((ROOT / "data").glob("*.jsonl"))), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>")
    fast.chat_template = chat_template
    return fast


def word_tokenizer(vocab_size: int = TINY["vocab_size"], swap: bool = False):
    """A word-level tokenizer with ``vocab_size`` ids; ``swap`` exchanges the ids of "cat" and "dog"."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    names = ["<unk>", "<s>", "</s>"] + WORDS
    names += [f"w{i}" for i in range(vocab_size - len(names))]
    ids = {name: i for i, name in enumerate(names)}
    if swap:
        ids["cat"], ids["dog"] = ids["dog"], ids["cat"]
    tok = Tokenizer(models.WordLevel(ids, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return fast


def save_tiny(path: Path, family: str = "llama", tokenizer=None, seed: int = 0, eos: int | None = None,
              **overrides) -> Path:
    """A tiny checkpoint directory (model + tokenizer, BPE by default) that fidbench loads like any HF model."""
    model = tiny_model(family, seed=seed, **overrides)
    if eos is not None:
        model.generation_config.eos_token_id = eos
    model.save_pretrained(path)
    (tokenizer or tiny_tokenizer()).save_pretrained(path)
    return path


def save_words(path: Path, family: str, seed: int = 0, tokenizer=None, **overrides) -> Path:
    """A tiny checkpoint directory with the word-level tokenizer (end of sequence ``</s>``), for ``words_suite``."""
    tokenizer = tokenizer or word_tokenizer(overrides.get("vocab_size", TINY["vocab_size"]))
    return save_tiny(path, family, tokenizer, seed, eos=2, **overrides)


def words_suite(tmp: Path, model_dir: Path, methods: dict, max_new_tokens: int = 12) -> Path:
    """A suite over ``model_dir`` (``save_words``) with three short conversations and ``methods`` (name -> spec)."""
    lines = [
        {"conversations": [{"role": "user", "content": "the cat sat on the mat one two three " * 3}]},
        {"conversations": [{"role": "user", "content": "red blue green tree sky sun moon far home"}]},
        {"conversations": [{"role": "user", "content": "a dog ran far " * 5 + "the red sun"}]},
    ]
    (tmp / "words.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    suite = {
        "generation": {"max_new_tokens": max_new_tokens},
        "models": {"tiny": {"path": str(model_dir), "max_length": 256}},
        "datasets": {"words": "words.jsonl"},
        "methods": methods,
    }
    path = tmp / "suite.yaml"
    path.write_text(json.dumps(suite))  # JSON is YAML
    return path


def checkpoints_fixture(**families: str):
    """A module-scoped fixture: a directory holding a tiny checkpoint (``save_tiny``) per subdirectory -> family."""

    @pytest.fixture(scope="module")
    def checkpoints(tmp_path_factory) -> Path:
        root = tmp_path_factory.mktemp("ckpt")
        for name, family in families.items():
            save_tiny(root / name, family)
        return root

    return checkpoints


def origin_topk_suite(models: dict[str, str], max_new_tokens: int, tags: tuple[str, ...] = ()) -> str:
    """A suite file's text: ``models`` (name -> directory) on chat.jsonl, variants origin and topk-10 (``tags``)."""
    lines = [f"generation: {{max_new_tokens: {max_new_tokens}}}", "models:"]
    lines += [f"  {name}: {{path: {path}, max_length: 256}}" for name, path in models.items()]
    tagged = f", tags: [{', '.join(tags)}]" if tags else ""
    lines += ["datasets:", "  chat: chat.jsonl", "methods:", "  origin: {floors: {acc1: 0.9}}",
              f"  topk-10: {{method: topk, keep: 0.1, min_keep: 2{tagged}}}"]
    return "\n".join(lines) + "\n"


def fill_project(pytester, monkeypatch, checkpoints: Path, suite_file: str, suite: str, prompts: int):
    """Fill ``pytester``'s directory: its own cache, the ``checkpoints``, ``prompts`` chat prompts, ``suite``."""
    monkeypatch.setenv("FIDBENCH_CACHE", str(pytester.path / "cache"))
    for checkpoint in sorted(checkpoints.iterdir()):
        shutil.copytree(checkpoint, pytester.path / checkpoint.name)
    chat = (ROOT / "data" / "chat.jsonl").read_text().splitlines(keepends=True)
    (pytester.path / "chat.jsonl").write_text("".join(chat[:prompts]))
    (pytester.path / suite_file).write_text(suite)
    return pytester


def random_ids(n: int, seed: int = 2, high: int = 128) -> list[int]:
    """``n`` seeded random token ids below ``high``."""
    return torch.randint(0, high, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference(model, p_ids: list[int], n: int = 24) -> Reference:
    """The base model's greedy ``n``-token reference for ``p_ids`` (end of sequence ignored)."""
    g_ids, logits = greedy(model, p_ids, n, eos_ids=set())
    return Reference.from_logits(p_ids, g_ids, logits)


def calibration(n: int = 6, length: int = 24) -> Loaded:
    """A harness context whose suite holds one dataset, "chat", of random prompts (for gptq / wanda)."""
    g = torch.Generator().manual_seed(7)
    prompts = [Prompt("chat", i, torch.randint(0, TINY["vocab_size"], (length,), generator=g).tolist())
               for i in range(n)]
    return Loaded(None, None, None, "", prompts, [None] * n)


def force(model, method, p_ids: list[int], g_ids: list[int], mode: str | None = None) -> torch.Tensor:
    """Teacher-forced logits of ``method`` (applied with the ``calibration`` context) over ``g_ids`` after ``p_ids``;
    ``mode`` defaults to the method's own (parallel when exact)."""
    mode = mode or engine.resolve_mode(method, "auto")
    with method.apply(model, calibration()) as applied:
        return engine.teacher_force(applied, method, p_ids, g_ids, mode).logits


def decode_calls(monkeypatch, method, run):
    """``run()``'s result and every decode call ``method``'s class attended to during it, with its output; the
    class's own ``attend`` (unspied) is the third item, to recompute a call."""
    attend, calls = type(method).attend, []

    def spy(self, call):
        out = attend(self, call)
        if call.phase.name == "decode":
            calls.append((call, out))
        return out

    monkeypatch.setattr(type(method), "attend", spy)
    result = run()
    monkeypatch.undo()
    return result, calls, attend


def layer0_inputs(model) -> dict:
    """Each linear of decoder layer 0 -> its (tokens, in) inputs on the ``calibration`` prompts, unchanged model."""
    lins = weights.linears(weights.decoder_layers(model)[0])
    xs = {lin: [] for lin in lins}
    hooks = [lin.register_forward_hook(lambda m, a, o: xs[m].append(a[0].reshape(-1, a[0].shape[-1]))) for lin in lins]
    with torch.no_grad():
        for ids in calibration().calibration("chat", 6):
            model(input_ids=torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return {lin: torch.cat(x) for lin, x in xs.items()}


def assert_needs_calibration(name: str, params: dict):
    """Method ``name`` with ``params`` refuses a missing calibration dataset, and a run with no calibration at all."""
    model = tiny_model("qwen2")
    with pytest.raises(ValueError, match="calibration dataset 'wiki'"):
        with build(name, {**params, "dataset": "wiki"}).apply(model, calibration()):
            pass
    with pytest.raises(ValueError, match="calibration"):
        with build(name, params).apply(model):
            pass
