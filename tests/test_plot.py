"""``fidbench plot``: each figure holds the report's data, and index.html renders in a real headless browser."""

import json
import os
import select
import shutil
import subprocess
import sys
import time

import pytest
from reports import document, record, sample, write

from fidbench import cli

pytest.importorskip("matplotlib", reason="matplotlib is optional: pip install 'fidbench[plot]'")
from fidbench import plot  # noqa: E402


def case(variant: str, acc1: float, kv: float | None, datasets=("code", "math"), model: str = "m") -> dict:
    samples = [sample(d, i, round(acc1 - 0.1 * i, 4), round((1 - acc1) * (1 + i), 4))
               for d in datasets for i in range(3)]
    return record(model, variant, samples, kv_fraction=kv)


def cases() -> list[dict]:
    return [case("origin", 1.0, None), case("topk-25", 0.95, 0.25), case("topk-10", 0.85, 0.1),
            case("snapkv-10", 0.5, 0.1, ("code",)), case("snapkv-25", 0.6, 0.25), case("kivi-2", 0.8, None)]


def lines(ax) -> dict:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()
            if not line.get_label().startswith("_")}


def test_budget_figure_has_one_line_per_method_through_its_variants():
    records = cases()
    by_id = {r["id"]: r for r in records}
    acc, kl = plot.budget(records).axes[:2]
    topk = [by_id["m-topk-10"], by_id["m-topk-25"]]  # sorted by KV kept
    snap = [by_id["m-snapkv-10"], by_id["m-snapkv-25"]]
    assert lines(acc) == {
        "topk": ([0.1, 0.25], [r["scores"]["acc1"] for r in topk]),
        "snapkv": ([0.1, 0.25], [r["scores"]["acc1"] for r in snap]),
        "origin": ([0, 1], [by_id["m-origin"]["scores"]["acc1"]] * 2),  # the base's level, across the axis
    }
    assert lines(kl) == {"topk": ([0.1, 0.25], [r["scores"]["kl_mean"] for r in topk]),
                         "snapkv": ([0.1, 0.25], [r["scores"]["kl_mean"] for r in snap])}
    assert kl.get_yscale() == "log"
    bars = [c for c in acc.containers if c.has_yerr]
    segments = [[list(map(float, s[:, 1])) for s in c.lines[2][0].get_segments()] for c in bars]
    assert segments[0] == [r["ci"]["acc1"] for r in topk]  # error bars: the records' bootstrap intervals


def test_position_and_heatmap_figures_hold_the_records_values():
    records = cases()
    ax = plot.position(records).axes[0]
    assert lines(ax)["topk-10"] == ([0, 16], records[2]["scores"]["acc1_by_position"])
    assert len(lines(ax)) == len(records)
    ax = plot.heatmap(records).axes[0]
    grid = ax.images[0].get_array()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["code", "math"]
    assert [t.get_text() for t in ax.get_yticklabels()] == [r["variant"] for r in records]
    for i, r in enumerate(records):
        for j, d in enumerate(("code", "math")):
            if d in r["datasets"]:
                assert grid[i, j] == pytest.approx(r["datasets"][d]["acc1"])
            else:
                assert grid.mask[i, j]  # blank: not scored
    labels = [t.get_text() for t in ax.texts]
    assert labels[:2] == [f"{records[0]['datasets'][d]['acc1']:.2f}" for d in ("code", "math")]
    assert len(labels) == 2 * len(records) - 1  # snapkv-10 has no math


def test_several_models_are_told_apart_and_a_zero_kl_keeps_a_linear_axis():
    records = [case("topk-10", 0.8, 0.1), case("topk-10", 1.0, 0.1, model="n")]  # n: KL 0
    acc, kl = plot.budget(records).axes[:2]
    assert set(lines(acc)) == {"m/topk", "n/topk"} and kl.get_yscale() == "linear"
    assert [t.get_text() for t in plot.heatmap(records).axes[0].get_yticklabels()] == ["m/topk-10", "n/topk-10"]


def test_cli_writes_every_figure_and_the_page(tmp_path, capsys):
    path = write(tmp_path / "r.json", cases())
    assert cli.main(["plot", str(path), "-o", str(tmp_path / "out")]) == 0
    assert "wrote 7 files" in capsys.readouterr().out
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["budget.png", "budget.svg", "heatmap.png", "heatmap.svg", "index.html", "position.png",
                     "position.svg"]
    page = (tmp_path / "out" / "index.html").read_text()
    for name in ("budget", "position", "heatmap"):
        assert f"<img src='{name}.svg'" in page
    assert "<td>m-topk-10</td>" in page and "bootstrap interval over samples" in page
    assert (tmp_path / "out" / "budget.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    no_kv = write(tmp_path / "w.json", [case("rtn-4", 0.7, None)])
    assert cli.main(["plot", str(no_kv), "-o", str(tmp_path / "w")]) == 0
    assert not (tmp_path / "w" / "budget.svg").exists()
    assert "No case in this report measured" in (tmp_path / "w" / "index.html").read_text()


def test_an_output_directory_that_cannot_be_made_is_a_clear_error(tmp_path, capsys):
    path = write(tmp_path / "r.json", cases())
    assert cli.main(["plot", str(path), "-o", str(tmp_path / "new" / "dirs")]) == 0  # missing parents are made
    (tmp_path / "file").write_text("")
    for out in (tmp_path / "file", tmp_path / "file" / "plots"):  # a file where the directory should be, or above it
        assert cli.main(["plot", str(path), "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"fidbench plot: error: cannot write to {out}: ") and "Traceback" not in err


def test_without_matplotlib_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if it were not installed
    assert cli.main(["plot", str(write(tmp_path / "r.json", cases())), "-o", str(tmp_path / "out")]) == 2
    assert "matplotlib is not installed: pip install 'fidbench[plot]'" in capsys.readouterr().err


def browser() -> str | None:
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome", "chrome"))), None)


class DevTools:
    """Chromium driven over --remote-debugging-pipe (the DevTools protocol, NUL-separated JSON on fds 3 and 4)."""

    def __init__(self, exe: str, profile):
        to_browser, self._w = os.pipe()
        self._r, from_browser = os.pipe()

        def fds():  # the browser reads commands on fd 3 and writes replies on fd 4
            a, b = os.dup(to_browser), os.dup(from_browser)  # above 2, and apart from 3 and 4 unless free
            for fd, target in ((a, 3), (b, 4)):
                os.dup2(fd, target)
                os.set_inheritable(target, True)  # dup2 onto itself (a == 3) keeps the close-on-exec flag

        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
             f"--user-data-dir={profile}", "--window-size=1280,900", "about:blank"],
            preexec_fn=fds, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self._buf, self._id = b"", 0

    def send(self, method: str, session: str | None = None, timeout: float = 30, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buf:
                if not select.select([self._r], [], [], max(0.0, deadline - time.monotonic()))[0]:
                    raise TimeoutError(f"no reply to {method}")
                chunk = os.read(self._r, 1 << 16)
                if not chunk:
                    raise EOFError("the browser closed the pipe")
                self._buf += chunk
            raw, _, self._buf = self._buf.partition(b"\0")
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def evaluate(self, session: str, expression: str):
        return self.send("Runtime.evaluate", session, expression=expression, returnByValue=True)["result"].get("value")

    def close(self):
        try:
            self.send("Browser.close", timeout=10)
        except (OSError, TimeoutError, EOFError, RuntimeError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._w)
        os.close(self._r)


def test_page_renders_in_a_headless_browser(tmp_path):
    exe = browser()
    if exe is None:
        pytest.skip("no chromium or chrome on PATH (apt-get install chromium) to render index.html in")
    records = cases()
    plot.write(document(records), tmp_path / "out", "r.json")
    tools = DevTools(exe, tmp_path / "profile")
    try:
        url = (tmp_path / "out" / "index.html").as_uri()
        target = tools.send("Target.createTarget", url="about:blank")["targetId"]
        session = tools.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        tools.send("Page.navigate", session, url=url)
        deadline = time.monotonic() + 30
        # complete: after the load event, when every image has been fetched and decoded (or failed)
        while tools.evaluate(session, "location.href + ' ' + document.readyState") != f"{url} complete":
            assert time.monotonic() < deadline, "index.html did not finish loading"
            time.sleep(0.1)
        images = tools.evaluate(session, "[...document.images].map(i => [i.getAttribute('src'), i.naturalWidth])")
        rows = tools.evaluate(session, "[...document.querySelector('table').tBodies[0].rows]"
                                       ".map(r => r.cells[0].textContent)")
        heights = tools.evaluate(session, "[...document.images].map(i => i.getBoundingClientRect().height)")
        title = tools.evaluate(session, "document.title")
    finally:
        tools.close()
    assert [src for src, _ in images] == ["budget.svg", "position.svg", "heatmap.svg"]
    assert all(width > 100 for _, width in images), images  # every figure decoded, none broken
    assert all(h > 100 for h in heights)
    assert rows == [r["id"] for r in records] and title == "fidbench: r.json"
