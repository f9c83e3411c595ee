"""fidbench.frontier: bisection to the most aggressive value that meets floors at the bootstrap bound, non-monotone
cases reported; on a tiny model, the frontier of a method whose answer is known (streamingllm's budget)."""

import json

import pytest
from helpers import save_words, words_suite

from fidbench import cli, frontier, plot, report
from fidbench.suite import load


def _samples(acc1: list[float], kl: float = 0.0) -> list[dict]:
    return [{"dataset": "d", "index": i, "n_tokens": 10, "acc1": a, "kl_mean": kl} for i, a in enumerate(acc1)]


def _search(passes, low=0.0, high=1.0, tolerance=0.01, **kw):
    calls = []

    def probe(value):
        calls.append(value)
        return _samples([1.0] * 4 if passes(value) else [0.5] * 4)

    s = frontier.Search(high, low, tolerance, {"acc1": 0.9}, **kw)
    return s.run(probe), calls


def test_bisection_finds_the_known_frontier_within_tolerance():
    result, calls = _search(lambda v: v >= 0.37)
    assert 0.37 <= result["frontier"] <= 0.37 + 0.01
    assert calls[:2] == [1.0, 0.0] and len(calls) == len(set(calls)) <= 2 + 7  # log2(1 / 0.01) bisections
    assert result["non_monotone"] == []


def test_integer_parameters_bisect_to_the_exact_value():
    result, _ = _search(lambda v: v >= 23, low=1, high=100, tolerance=1, integer=True)
    assert result["frontier"] == 23


def test_ends():
    assert _search(lambda v: False)[0]["frontier"] is None  # even the most conservative value fails
    result, calls = _search(lambda v: True)
    assert result["frontier"] == 0.0 and calls == [1.0, 0.0]


def test_the_bound_decides_not_the_point_estimate():
    s = frontier.Search(1.0, 0.0, 0.1, {"acc1": 0.9})
    result = s.run(lambda v: _samples([1.0, 1.0, 1.0, 0.8]))  # mean 0.95 >= 0.9, its lower bound below
    assert result["frontier"] is None
    assert result["probes"][0]["scores"]["acc1"] == pytest.approx(0.95) and result["probes"][0]["bounds"]["acc1"] < 0.9


def test_a_maximum_floor_uses_the_upper_bound():
    s = frontier.Search(1.0, 0.0, 0.05, {"kl_mean": 0.1})
    result = s.run(lambda v: _samples([1.0] * 3, kl=0.5 - v * 0.45))  # kl <= 0.1 from v >= 0.889
    assert 0.888 <= result["frontier"] <= 0.95


def test_non_monotone_cases_are_reported():
    result, _ = _search(lambda v: v >= 0.9 or 0.15 <= v <= 0.35, grid=9)
    assert any("meets the floors at 0.3 but not at the more conservative 0.8" in n for n in result["non_monotone"])
    assert 0.9 <= result["frontier"] <= 0.91  # the frontier is the one every more conservative probe supports


def test_frontier_of_streamingllm_budget_on_a_tiny_model(tmp_path, monkeypatch):
    """Decoding stepwise, a budget covering every prompt evicts nothing and reproduces the reference exactly (KL
    0), and one token short changes the logits: at a KL floor of 1e-12 the frontier is the longest prompt."""
    monkeypatch.setenv("FIDBENCH_CACHE", str(tmp_path / "cache"))
    model_dir = save_words(tmp_path / "llama", "llama")
    path = words_suite(tmp_path, model_dir, {"streaming": {"method": "streamingllm", "budget": 8}})
    suite = json.loads(path.read_text())
    suite["generation"]["decode"] = "stepwise"  # parallel teacher forcing moves KL by ~1e-7 (fp32 order)
    path.write_text(json.dumps(suite))
    out = tmp_path / "frontier.json"
    assert cli.main(["frontier", str(path), "--variant", "streaming", "--param", "budget", "--range", "5", "120",
                     "--tolerance", "1", "--floor", "kl_mean=1e-12", "--by-dataset", "-o", str(out)]) == 0
    doc = report.read(out)
    (result,) = doc["frontier"]
    longest = max(s["prompt_tokens"] for s in doc["cases"][0]["samples"])
    assert result["frontier"] == longest and result["datasets"]["words"]["frontier"] == longest
    assert result["non_monotone"] == []
    probed = {p["value"]: p["meets"] for p in result["probes"]}
    assert probed[longest] and not probed[longest - 1]
    assert len(doc["cases"]) == len(probed)  # the per-dataset search reused every probe
    # every probe after the first replayed the base prefills recorded once
    assert all(c["timing"]["prefills_replayed"] == 3 for c in doc["cases"])


def test_bad_requests_are_errors(tmp_path):
    path = words_suite(tmp_path, tmp_path, {"streaming": {"method": "streamingllm", "budget": 8}})
    suite = load(path)
    with pytest.raises(frontier.FrontierError, match="no parameter 'keep'"):
        frontier.run(suite, ["streaming"], "keep", 0.1, 1.0, 0.1, {"acc1": 0.9})
    with pytest.raises(frontier.FrontierError, match="no variant 'nope'"):
        frontier.run(suite, ["nope"], "budget", 5, 10, 1, {"acc1": 0.9})
    with pytest.raises(frontier.FrontierError, match="floors must be on"):
        frontier.run(suite, ["streaming"], "budget", 5, 10, 1, {"kl_p99": 0.9})


def test_the_plot_shows_floor_probes_and_frontier():
    pytest.importorskip("matplotlib")
    s = frontier.Search(1.0, 0.0, 0.05, {"acc1": 0.9})
    result = s.run(lambda v: _samples([1.0] * 4 if v >= 0.37 else [0.5] * 4))
    fig = plot.frontier([{"variant": "v", "param": "ratio", "floors": {"acc1": 0.9}, **result}])
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["floor"].get_ydata()) == [0.9, 0.9]
    assert list(lines[f"frontier {result['frontier']:g}"].get_xdata()) == [result["frontier"]] * 2
    assert sorted(lines["point estimate"].get_xdata()) == sorted(p["value"] for p in result["probes"])
    assert plot.frontier([]) is None
