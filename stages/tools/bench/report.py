"""The report: recommendations, Markdown table, PNG chart, result files and the README's latest table."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from sdkiln.stages.tools.bench.variants import TASK_COMPONENTS, component_label

TARGET_RATIO = 0.33


def recommend(report: dict[str, Any]) -> dict[str, Any]:
    """What a runtime picking its configuration on this machine should choose, and whether it meets
    the speed target: per component the fastest variant whose outputs meet the family's floors; per
    task the fastest run whose components all met them (``components_parity_ok`` on each task result:
    None where a component was not measured)."""
    from sdkiln.runtime.contract.families import get_family

    ok = {
        (row["component"], r["variant"]): r["parity"]["ok"]
        for row in report["components"]
        for r in row["results"]
    }
    tes = list(get_family(report["bundle"]["family"]).text_encoders)
    out: dict[str, Any] = {"target_ratio": TARGET_RATIO, "components": {}, "tasks": {}}
    for row in report["components"]:
        if row["best"]:
            out["components"][row["component"]] = {
                "variant": row["best"],
                "ratio_to_reference": row["best_ratio"],
                "meets_target": row["best_ratio"] <= TARGET_RATIO,
            }
    for row in report["tasks"]:
        used = [*tes, *TASK_COMPONENTS[row["task"]]]
        if not row["params"].get("control"):
            used = [c for c in used if c != "controlnet.canny"]
        for r in row["results"]:
            base = r["variant"].removesuffix("+taesd")
            comps = [("taesd_decoder" if c == "vae_decoder" and r["vae"] == "tiny" else c) for c in used]
            verdicts = [ok.get((c, base)) for c in comps]
            r["components_parity_ok"] = (
                False if False in verdicts else True if all(v is True for v in verdicts) else None
            )
        fine = [r for r in row["results"] if r["components_parity_ok"] is not False]
        if fine:
            best = min(fine, key=lambda r: r["ratio_to_reference"])
            out["tasks"][row["task"]] = {
                "variant": best["variant"],
                "ratio_to_reference": best["ratio_to_reference"],
                "components_parity_ok": best["components_parity_ok"],
                "meets_target": best["ratio_to_reference"] <= TARGET_RATIO,
            }
    return out


# --------------------------------------------------------------------------------------------------
# Writing: JSON, Markdown, PNG


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def _fmt_bytes(n: float | None) -> str:
    if not n:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _fmt_parity(p: dict[str, Any], reference: bool) -> str:
    if reference:
        return "reference"
    if p.get("max_abs") is None:
        return "-"
    mark = {True: "ok", False: "BELOW FLOOR", None: ""}[p.get("ok")]
    q = "identical" if p.get("sqnr_db") is None else f"SQNR {p['sqnr_db']:.1f} dB"
    return f"{q}, max abs {p['max_abs']:.1e} {mark}".strip()


def to_markdown(report: dict[str, Any], chart: str | None = None) -> str:
    """The report as Markdown: machine line, one table for components, one for tasks."""
    m, c, pk = report["machine"], report["config"], report["peak"]
    isa = ", ".join(k for k, v in m["isa"].items() if v) or "none listed"
    fp32 = pk.get("fp32_flops_per_s")
    lines = [
        f"### `{report['bundle']['name']}` on {m['cpu_model']} ({report['created']})",
        "",
        f"{m['physical_cores']} physical cores, {c['threads']} thread(s) ({c['threads_source']}); ISA: {isa}; "
        f"GPU: {', '.join(g['name'] for g in m['gpu']) if m.get('gpu') else 'none'}. "
        f"Measured GEMM peak: "
        + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in sorted(pk.get("by_dtype", {}).items()))
        + f". {c['size']}x{c['size']} px, batch {c['batch']}; {c['warmup']} warm-up + {c['repeat']} "
        "interleaved rounds; ratio = median / reference median of this run.",
        "",
    ]
    if report["components"]:
        lines += [
            "| component | variant | median | min - max | x ref | peak RSS | artifact | GFLOP | GFLOP/s | % fp32 peak | parity vs reference |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for row in report["components"]:
            for i, r in enumerate(row["results"]):
                gflop = f"{row['flops'] / 1e9:.3g}" if row["flops"] and i == 0 else ""
                fps = f"{r['flops_per_s'] / 1e9:.1f}" if r["flops_per_s"] else "-"
                frac = f"{r['fraction_of_fp32_peak']:.0%}" if r["fraction_of_fp32_peak"] and fp32 else "-"
                best = " **best**" if r["variant"] == row["best"] and len(row["results"]) > 1 else ""
                lines.append(
                    f"| {row['label'] if i == 0 else ''} | {r['variant']}{best} | {_fmt_s(r['median_s'])} | "
                    f"{_fmt_s(r['min_s'])} - {_fmt_s(r['max_s'])} | {r['ratio_to_reference']:.2f} | "
                    f"{_fmt_bytes(r['peak_rss_bytes'])} | {_fmt_bytes(r['artifact_bytes'])} | {gflop} | {fps} | "
                    f"{frac} | {_fmt_parity(r['parity'], r['variant'] == row['reference'])} |"
                )
        lines.append("")
    if report["tasks"]:
        lines += [
            "| task | variant | median | min - max | x ref | text / denoise / decode (median) | peak RSS | PSNR vs ref |",
            "|---|---|---:|---:|---:|---|---:|---:|",
        ]
        for row in report["tasks"]:
            for i, r in enumerate(row["results"]):
                st = r["stages_median_s"]
                parts = " / ".join(_fmt_s(st.get(k)) for k in ("text_encoder", "denoise", "vae_decoder"))
                ps = r["psnr_db_vs_reference"]
                ps_s = (
                    "reference"
                    if r["variant"] == row["reference"]
                    else ("identical" if ps is None else f"{ps:.1f} dB")
                )
                label = f"{row['task']} ({row['params'].get('steps')} steps)" if i == 0 else ""
                lines.append(
                    f"| {label} | {r['variant']} | {_fmt_s(r['median_s'])} | {_fmt_s(r['min_s'])} - "
                    f"{_fmt_s(r['max_s'])} | {r['ratio_to_reference']:.2f} | {parts} | "
                    f"{_fmt_bytes(r['peak_rss_bytes'])} | {ps_s} |"
                )
        lines.append("")
    rec = report.get("recommendation") or {}
    picks = [(component_label(c), v) for c, v in rec.get("components", {}).items()]
    picks += [(f"task {t}", v) for t, v in rec.get("tasks", {}).items()]
    if picks:
        lines += [f"Fastest with parity above the floors (target: <= {TARGET_RATIO:.2f}x the reference):", ""]
        for what, v in picks:
            met = "meets" if v["meets_target"] else "misses"
            lines.append(f"- {what}: `{v['variant']}` at {v['ratio_to_reference']:.2f}x ({met} the target)")
        lines.append("")
    if report["skipped"]:
        lines += [
            "Not measured: " + "; ".join(f"{s['variant']}: {s['reason']}" for s in report["skipped"]),
            "",
        ]
    if report["errors"]:
        lines += [
            "Failed: "
            + "; ".join(f"{e['variant']} on {e['component']} ({e['stage']})" for e in report["errors"]),
            "",
        ]
    if chart:
        lines += [f"![benchmark chart]({chart})", ""]
    return "\n".join(lines)


def write_chart(report: dict[str, Any], path: Path) -> Path:
    """A PNG: per component and per task, each variant's median as a ratio to the reference's median
    of the same run (log scale when the ratios span more than 4x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    groups = [(row["label"], row["results"]) for row in report["components"]]
    groups += [(f"task: {row['task']}", row["results"]) for row in report["tasks"]]
    n_bars = sum(len(rs) for _, rs in groups) or 1
    names = list(dict.fromkeys(r["variant"] for _, rs in groups for r in rs))
    fig, ax = plt.subplots(figsize=(10, 1.4 + 0.26 * n_bars + 0.2 * len(groups)))
    colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    ratios = [r["ratio_to_reference"] for _, rs in groups for r in rs] or [1.0]
    log = max(ratios) / min(ratios) > 4
    left = min(ratios) / 2 if log else 0.0
    y, ticks, labels = 0.0, [], []
    for label, rs in groups:
        start = y
        for r in rs:
            ratio = r["ratio_to_reference"]
            ax.barh(y, ratio - left, left=left, color=colors[r["variant"]], height=0.8)
            ax.text(ratio, y, f" {_fmt_s(r['median_s'])}", va="center", fontsize=7)
            y += 1
        ticks.append((start + y - 1) / 2)
        labels.append(label)
        y += 0.8
    ax.set_yticks(ticks, labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.8)
    if log:
        ax.set_xscale("log")
    ax.set_xlim(left, max(ratios) * (2.0 if log else 1.25))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}x"))
    ax.set_xlabel(f"median time / {report['config']['reference']} median of the same run (lower is faster)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[n]) for n in names]
    ax.legend(handles, names, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    m, c = report["machine"], report["config"]
    ax.set_title(
        f"{report['bundle']['name']}: {m['cpu_model']}, {c['threads']} thread(s), {c['size']}x{c['size']} px, "
        f"{c['repeat']} interleaved rounds",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(
    report: dict[str, Any], results_dir: Path, chart: bool = True, readme: Path | None = None
) -> dict[str, Path]:
    """Write ``<timestamp>-<bundle>.json/.md/.png`` into ``results_dir`` (never overwriting an older
    run) and, if ``readme`` is given, replace its latest-results section."""
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = report["created"].replace(":", "").replace("-", "").replace("+0000", "Z")
    stem = f"{stamp}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', report['bundle']['name'])}"
    n = 1
    while (results_dir / f"{stem}.json").exists():  # two runs in one second: keep both
        n += 1
        stem = f"{stem.rsplit('~', 1)[0]}~{n}"
    paths = {"json": results_dir / f"{stem}.json", "md": results_dir / f"{stem}.md"}
    if chart and (report["components"] or report["tasks"]):
        paths["png"] = write_chart(report, results_dir / f"{stem}.png")
    md = to_markdown(report, chart=paths["png"].name if "png" in paths else None)
    paths["md"].write_text(md)
    tmp = paths["json"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1, default=_json_default) + "\n")
    os.replace(tmp, paths["json"])
    if readme is not None:
        rel = os.path.relpath(paths["png"], readme.parent) if "png" in paths else None
        update_readme(readme, to_markdown(report, chart=rel), os.path.relpath(paths["json"], readme.parent))
    return paths


README_START = "<!-- bench:latest:start -->"
README_END = "<!-- bench:latest:end -->"


def update_readme(readme: Path, markdown: str, json_rel: str) -> None:
    """Replace the text between the bench markers of ``readme`` (appending the markers if absent)."""
    text = readme.read_text() if readme.is_file() else ""
    block = f"{README_START}\n{markdown}\nFull report: [{json_rel}]({json_rel})\n{README_END}"
    if README_START in text and README_END in text:
        head, rest = text.split(README_START, 1)
        _, tail = rest.split(README_END, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + ("\n\n" if text else "") + "## Latest results\n\n" + block + "\n"
    readme.write_text(text)


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"cannot serialise {type(o).__name__}")
