"""A Markdown table of step times and memory as ratios to the fastest peer."""

from __future__ import annotations

from typing import Any

PEERS = ("adamw", "hb_kl_shampoo", "hb_soap", "po_soap")


def table(results: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    ok = {name: r for name, r in results.items() if "error" not in r}
    peers = [name for name in PEERS if name in ok] or list(ok)
    fastest = min(peers, key=lambda n: ok[n]["median_ms"]) if peers else None
    lines = [f"device {meta['device']}, torch {meta['torch']}, shapes {meta['shapes']}, T = {meta['every']}, "
             f"max dim {meta['max_dim']}, {meta['steps']} timed steps after {meta['warmup']}",
             "",
             f"| optimizer | median ms | max ms | mean ms | median / {fastest} | mean / {fastest} | max / median "
             "| extra peak GB | state GB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:80]} | | | | | | | |")
            continue
        base = ok[fastest]
        lines.append(
            f"| {name} | {r['median_ms']:.2f} | {r['max_ms']:.2f} | {r['mean_ms']:.2f} | "
            f"{r['median_ms'] / base['median_ms']:.2f} | {r['mean_ms'] / base['mean_ms']:.2f} | "
            f"{r['max_ms'] / r['median_ms']:.2f} | {r.get('extra_peak_gb', float('nan')):.2f} | {r['state_gb']:.2f} |")
    return "\n".join(lines)


def training_table(results: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    ok = {name: r for name, r in results.items() if "error" not in r}
    base = ok.get("adamw")
    lines = [f"device {meta['device']}, torch {meta['torch']}, GPT {meta['model']}, batch {meta['batch']}x"
             f"{meta['length']}, bf16 autocast, T = {meta['every']}, max dim {meta['max_dim']}, "
             f"{meta['steps']} timed steps after {meta['warmup']}",
             "",
             "| optimizer | tokens/s | vs adamw | median ms | max ms | max / median | peak GB | loss at end |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:80]} | | | | | | |")
            continue
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
        lines.append(f"| {name} | {r['tokens_per_s']:.0f} | {ratio:.2f} | {r['median_ms']:.1f} | {r['max_ms']:.1f} | "
                     f"{r['max_ms'] / r['median_ms']:.2f} | {r.get('peak_gb', float('nan')):.2f} | "
                     f"{r['final_loss']:.3f} |")
    return "\n".join(lines)
