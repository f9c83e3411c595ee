"""Markdown tables of a long-context run (suites/LOG.md, "long.yaml"): per case acc@1, acc@5, KL, first
divergence, kept fraction, acc@1 by quarter of the reference, answers reproduced, the case's prefill and
decode seconds summed over its samples; then acc@1 per task. Cases sorted by acc@1.

    python scripts/long_table.py REPORT.json
"""

import argparse
import json


def fmt(value, spec="{:.3f}"):
    return "" if value is None else spec.format(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report")
    args = parser.parse_args()
    cases = sorted(json.load(open(args.report))["cases"], key=lambda c: -(c["scores"].get("acc1") or 0))
    print("| case | acc@1 | acc@5 | KL | 1st div | kept | acc@1 by position (quarters) | answers reproduced | s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for c in cases:
        s, t = c["scores"], c["timing"]
        quarters = " / ".join(f"{q:.2f}" for q in s.get("acc1_by_position") or [])
        seconds = sum(t.get(k) or 0 for k in ("prefill_s", "decode_s"))
        print(f"| {c['variant']} | {fmt(s['acc1'])} | {fmt(s['acc5'])} | {fmt(s['kl_mean'])} "
              f"| {fmt(s['first_divergence'], '{:.1f}')} | {fmt(c['kept'].get('kv_fraction'))} | {quarters} "
              f"| {fmt(s.get('answers_reproduced'), '{:.2f}')} | {seconds:.0f} |")
    tasks = list(cases[0]["datasets"])
    print("\nacc@1 per task:\n")
    print("| case | " + " | ".join(tasks) + " |")
    print("| --- |" + " --- |" * len(tasks))
    for c in cases:
        print(f"| {c['variant']} | " + " | ".join(fmt(c["datasets"][t]["acc1"]) for t in tasks) + " |")


if __name__ == "__main__":
    main()
