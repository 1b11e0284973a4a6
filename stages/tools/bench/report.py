"""The report: recommendations, Markdown table, PNG chart, result files and the README's latest table."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from sdkiln.stages.tools.bench.variants import component_label

# The speed targets (issue 14), as ratios to the PyTorch eager fp32 reference of the same run: the exact
# profile (the same algorithm, every component within its floor, end-to-end parity measured) and the
# fast profile (declared trade-offs, each with its measured deviation from the exact output).
TARGETS = {"exact": 0.45, "fast": 0.20}
TARGET_RATIO = TARGETS["exact"]
# How many times one run of a task calls a component (per step for the UNet and ControlNet).
_STAGES = (
    ("text_encoder", "text encoder"),
    ("controlnet", "ControlNet"),
    ("unet", "UNet"),
    ("vae_decoder", "decoder"),
)


def recommend(report: dict[str, Any]) -> dict[str, Any]:
    """What a runtime picking its configuration on this machine should choose, per component and per
    task and profile, and whether each pick meets its target. Only what was checked in this run is
    recommended (issue 12):

    - a component: the fastest variant whose outputs met the contract's floor in this run;
    - a task, exact profile: the fastest exact run whose every component met its floor in this run
      (``components_parity_ok``) *and* whose end-to-end parity (image PSNR vs the reference, against the
      floor of its precisions) was measured and passed;
    - a task, fast profile: the fastest run whose every component met its floor, an exact run with its
      end-to-end parity passed or a fast run with its deviation from the exact output measured; a fast
      run is labelled with that deviation, never "with parity".

    Each task result gets ``components_parity_ok`` (None where a component was not measured) and
    ``recommendable`` with the reason when it is not. A pick that misses its target carries
    ``bounds``: its per-stage split and each stage's achieved FLOP/s against the measured peak."""
    ok = {
        (row["component"], r["variant"]): r["parity"]["ok"]
        for row in report["components"]
        for r in row["results"]
    }
    out: dict[str, Any] = {
        "targets": dict(TARGETS),
        "target_ratio": TARGET_RATIO,
        "components": {},
        "tasks": {},
    }
    for row in report["components"]:
        if row["best"]:
            best = next(r for r in row["results"] if r["variant"] == row["best"])
            out["components"][row["component"]] = {
                "variant": row["best"],
                "precision": best.get("precision"),
                "ratio_to_reference": row["best_ratio"],
                "meets_target": row["best_ratio"] <= TARGETS["exact"],
            }
    for row in report["tasks"]:
        picks: dict[str, Any] = {}
        for r in row["results"]:
            verdicts = [ok.get((c, _source_of(r, row, c))) for c in r.get("precisions", {})]
            r["components_parity_ok"] = (
                False
                if False in verdicts
                else True
                if verdicts and all(v is True for v in verdicts)
                else None
            )
            r["recommendable"], r["why_not"] = _recommendable(r, row["reference"])
        for profile in ("exact", "fast"):
            fine = [
                r
                for r in row["results"]
                if r["recommendable"] and (profile == "fast" or r.get("profile", "exact") == "exact")
            ]
            if not fine:
                picks[profile] = None
                continue
            best = min(fine, key=lambda r: r["ratio_to_reference"])
            pick = {
                "variant": best["variant"],
                "profile_of_run": best.get("profile", "exact"),
                "ratio_to_reference": best["ratio_to_reference"],
                "median_s": best["median_s"],
                "settings": best.get("settings"),
                "precisions": best.get("precisions"),
                "components_parity_ok": best["components_parity_ok"],
                "e2e_parity": best.get("e2e_parity"),
                "deviation": best.get("deviation"),
                "label": _label(best, row["reference"]),
                "meets_target": best["ratio_to_reference"] <= TARGETS[profile],
                "target": TARGETS[profile],
            }
            if not pick["meets_target"]:
                pick["bounds"] = _bounds(report, best, row)
            picks[profile] = pick
        out["tasks"][row["task"]] = picks
    return out


def _worker_of(r: dict[str, Any], row: dict[str, Any]) -> str:
    """The variant whose component rows judge a task run (a fast run's base)."""
    name = r["variant"]
    levers = r.get("levers") or []
    return name[: -len("+" + "+".join(levers))] if levers else name


def _source_of(r: dict[str, Any], row: dict[str, Any], component: str) -> str:
    """The variant whose measurement of ``component`` judges a task run: a composed run's per-component
    source (``compose_mixed``), else the run's base."""
    return (r.get("component_sources") or {}).get(component) or _worker_of(r, row)


def _recommendable(r: dict[str, Any], reference: str) -> tuple[bool, str]:
    if r["components_parity_ok"] is not True:
        what = "failed" if r["components_parity_ok"] is False else "was not measured"
        return False, f"a component's parity {what} in this run"
    if r["variant"] == reference:
        return True, ""
    if r.get("profile", "exact") == "exact":
        parity = r.get("e2e_parity")
        if parity is None:
            return False, "end-to-end parity was not measured"
        if not parity["ok"]:
            return False, f"end-to-end PSNR below its {parity['floor_db']:g} dB floor"
        return True, ""
    if r.get("deviation") is None:
        return False, "its deviation from the exact output was not measured"
    return True, ""


def _label(r: dict[str, Any], reference: str) -> str:
    if r["variant"] == reference:
        return "the reference"
    if r.get("profile", "exact") == "exact":
        d = r.get("deviation") or {}
        psnr = "identical" if d.get("psnr_db") is None else f"PSNR {d['psnr_db']:.1f} dB"
        return f"with parity ({psnr} >= {r['e2e_parity']['floor_db']:g} dB floor)"
    return "fast: " + _fmt_dev(r.get("deviation"))


def _fmt_dev(d: dict[str, Any] | None) -> str:
    if not d:
        return "-"
    psnr = "identical" if d.get("psnr_db") is None else f"{d['psnr_db']:.1f} dB"
    lat = "identical" if d.get("latents_sqnr_db") is None else f"{d['latents_sqnr_db']:.1f} dB"
    return f"PSNR {psnr}, SSIM {d.get('ssim', 0):.3f}, latents SQNR {lat}"


def _bounds(report: dict[str, Any], r: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    """Why a pick misses its target: where its time goes (per stage, from the runtime's own timings) and
    how close each stage's component runs to the machine's measured peak for its precision."""
    st = r.get("stages_median_s", {})
    total = r["median_s"]
    comp_rows = {x["component"]: x for x in report["components"]}
    stages = {}
    for key, label in _STAGES:
        seconds = st.get(key)
        if key == "vae_decoder" and r.get("vae") == "tiny":
            label = "decoder (TAESD)"
        if seconds is None:
            continue
        comp = {
            "vae_decoder": "taesd_decoder" if r.get("vae") == "tiny" else "vae_decoder",
            "controlnet": next(
                (c for c in r.get("precisions") or {} if c.startswith("controlnet.")), "controlnet"
            ),
        }.get(key, key)
        source = _source_of(r, row, comp)
        measured = next(
            (x for x in comp_rows.get(comp, {}).get("results", []) if x["variant"] == source), None
        )
        stages[label] = {
            "seconds": seconds,
            "share": seconds / total if total else None,
            "component": comp,
            "precision": (r.get("precisions") or {}).get(comp),
            "fraction_of_dtype_peak": measured.get("fraction_of_dtype_peak") if measured else None,
            "flops_per_s": measured.get("flops_per_s") if measured else None,
        }
    ref_total = r["reference_median_s"]
    return {
        "stages": stages,
        "other_seconds": max(0.0, total - sum(v["seconds"] for v in stages.values())),
        "target_seconds": None if ref_total is None else ref_total * TARGETS[r.get("profile", "exact")],
    }


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


def _fmt_kernels(k: dict[str, Any] | None) -> str:
    """The kernels a variant ran, in a few words: ORT op types by share of kernel time; OpenVINO's
    execution-graph node counts by runtime precision."""
    if not k or not k.get("nodes"):
        return "-"
    nodes = k["nodes"]
    first = next(iter(nodes.values()))
    if isinstance(first, dict):  # ORT: {op: {count, time_share}}
        top = [(op, v) for op, v in nodes.items() if v.get("time_share")][:4]
        return ", ".join(f"{op} {v['time_share']:.0%}" for op, v in top)
    return ", ".join(f"{name} x{n}" for name, n in sorted(nodes.items(), key=lambda kv: -kv[1])[:4])


def _fmt_precisions(p: dict[str, str] | None) -> str:
    if not p:
        return "-"
    short = {
        "text_encoder": "TE",
        "text_encoder_2": "TE2",
        "unet": "UNet",
        "vae_decoder": "VAE",
        "vae_encoder": "VAE enc",
        "taesd_decoder": "TAESD",
        "taesd_encoder": "TAESD enc",
    }
    return " · ".join(f"{short.get(c, 'CN' if c.startswith('controlnet') else c)} {v}" for c, v in p.items())


def to_markdown(report: dict[str, Any], chart: str | None = None) -> str:
    """The report as Markdown: machine line, one table for components, one for tasks, the picks."""
    m, c, pk = report["machine"], report["config"], report["peak"]
    isa = ", ".join(k for k, v in m["isa"].items() if v) or "none listed"
    lines = [
        f"### `{report['bundle']['name']}` on {m['cpu_model']} ({report['created']})",
        "",
        f"{m['physical_cores']} physical cores, {c['threads']} thread(s) ({c['threads_source']}); ISA: {isa}; "
        f"GPU: {', '.join(g['name'] for g in m['gpu']) if m.get('gpu') else 'none'}"
        + (f"; machine key `{m['machine_key']}`" if m.get("machine_key") else "")
        + ". Measured GEMM peak (best probe per precision, this run): "
        + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in sorted(pk.get("by_dtype", {}).items()))
        + f". {c['size']}x{c['size']} px, batch {c['batch']}; {c['warmup']} warm-up + {c['repeat']} "
        "interleaved rounds; ratio = median / reference median of this run. Weights are random: quality is "
        "measured as deviation from the exact (reference) output.",
        "",
    ]
    if report["components"]:
        lines += [
            "| component | variant | precision | median | min - max | x ref | x ref (CPU s) | peak RSS | artifact | GFLOP/s | % of its precision's peak | kernels | parity vs reference |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
        ]
        for row in report["components"]:
            ref_cpu = next(
                (x.get("cpu_median_s") for x in row["results"] if x["variant"] == row["reference"]), None
            )
            for i, r in enumerate(row["results"]):
                fps = f"{r['flops_per_s'] / 1e9:.1f}" if r["flops_per_s"] else "-"
                frac = r.get("fraction_of_dtype_peak")
                frac_s = f"{frac:.0%} ({_peak_name(r.get('precision', ''))})" if frac else "-"
                best = " **best**" if r["variant"] == row["best"] and len(row["results"]) > 1 else ""
                label = row["label"] + (f" ({row['flops'] / 1e9:.3g} GFLOP)" if row["flops"] else "")
                lines.append(
                    f"| {label if i == 0 else ''} | {r['variant']}{best} | {r.get('precision', '-')} | "
                    f"{_fmt_s(r['median_s'])} | {_fmt_s(r['min_s'])} - {_fmt_s(r['max_s'])} | "
                    f"{r['ratio_to_reference']:.2f} | {_cpu_ratio(r, ref_cpu)} | {_fmt_bytes(r['peak_rss_bytes'])} | "
                    f"{_fmt_bytes(r['artifact_bytes'])} | {fps} | {frac_s} | {_fmt_kernels(r.get('kernels'))} | "
                    f"{_fmt_parity(r['parity'], r['variant'] == row['reference'])} |"
                )
        lines.append("")
    if report["tasks"]:
        lines += [
            "| task | run | profile | precision per component | median | x ref | x ref (CPU s) | text / ControlNet / UNet / decode | peak RSS | deviation from the exact output | end-to-end parity |",
            "|---|---|---|---|---:|---:|---:|---|---:|---|---|",
        ]
        for row in report["tasks"]:
            ref_cpu = next(
                (x.get("cpu_median_s") for x in row["results"] if x["variant"] == row["reference"]), None
            )
            for i, r in enumerate(row["results"]):
                st = r["stages_median_s"]
                parts = " / ".join(
                    _fmt_s(st.get(k)) for k in ("text_encoder", "controlnet", "unet", "vae_decoder")
                )
                ref = r["variant"] == row["reference"]
                dev = "reference" if ref else _fmt_dev(r.get("deviation"))
                par = r.get("e2e_parity")
                par_s = (
                    "reference"
                    if ref
                    else "n/a (fast: a declared trade-off)"
                    if r.get("profile") == "fast"
                    else ("ok" if par and par["ok"] else "BELOW FLOOR")
                    + (f" (floor {par['floor_db']:g} dB)" if par else "")
                )
                label = f"{row['task']} ({row['params'].get('steps')} steps)" if i == 0 else ""
                lines.append(
                    f"| {label} | {r['variant']} | {r.get('profile', 'exact')} | {_fmt_precisions(r.get('precisions'))} | "
                    f"{_fmt_s(r['median_s'])} | {r['ratio_to_reference']:.2f} | {_cpu_ratio(r, ref_cpu)} | {parts} | "
                    f"{_fmt_bytes(r.get('peak_rss_bytes'))} | {dev} | {par_s} |"
                )
        lines.append("")
    for row in report["tasks"]:
        dc = (row.get("experiments") or {}).get("deepcache")
        if dc:
            unet = (
                f"; UNet stage {_fmt_s(dc['unet_median_s'])} ({dc['unet_ratio_to_reference']:.2f}x the reference's)"
                if dc.get("unet_ratio_to_reference")
                else ""
            )
            lines += [
                f"DeepCache-style reuse on the {row['task']} task (PyTorch reference, full every "
                f"{dc['interval']} steps: {', '.join(dc['calls'])}): {_fmt_s(dc['median_s'])}, "
                f"{dc['ratio_to_reference']:.2f}x the reference{unet}; deviation from the exact output "
                f"{_fmt_dev(dc['deviation'])}. Not a runtime option unless that deviation is small.",
                "",
            ]
    rec = report.get("recommendation") or {}
    if rec.get("components"):
        lines += ["Fastest per component with parity above its floor (measured in this run):", ""]
        for comp, v in rec["components"].items():
            lines.append(
                f"- {component_label(comp)}: `{v['variant']}` ({v.get('precision')}) at {v['ratio_to_reference']:.2f}x"
            )
        lines.append("")
    for task, picks in (rec.get("tasks") or {}).items():
        for profile in ("exact", "fast"):
            v = (picks or {}).get(profile)
            target = TARGETS[profile]
            if v is None:
                lines += [
                    f"- **{task}, {profile} profile** (target <= {target:.2f}x): nothing qualified in this run",
                    "",
                ]
                continue
            met = "meets" if v["meets_target"] else "**misses**"
            lines.append(
                f"- **{task}, {profile} profile** (target <= {target:.2f}x): `{v['variant']}` at "
                f"{v['ratio_to_reference']:.2f}x ({_fmt_s(v['median_s'])}; {met} the target); {v['label']}; "
                f"{_fmt_precisions(v.get('precisions'))}"
            )
            if v.get("bounds"):
                b = v["bounds"]
                lines.append(
                    f"  - best reached {v['ratio_to_reference']:.2f}x; the target needs "
                    f"{_fmt_s(b['target_seconds'])}. Where the time goes, and how close each stage runs to "
                    "the machine's measured peak for its precision:"
                )
                for label, st in b["stages"].items():
                    frac = st.get("fraction_of_dtype_peak")
                    peak = f", {frac:.0%} of the {_peak_name(st.get('precision') or '')} peak" if frac else ""
                    share = f"{st['share']:.0%}" if st.get("share") is not None else "-"
                    lines.append(
                        f"    - {label}: {_fmt_s(st['seconds'])} ({share}; {st.get('precision') or '-'}{peak})"
                    )
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


def _cpu_ratio(r: dict[str, Any], ref_cpu: float | None) -> str:
    """The median process CPU seconds (all threads) over the reference's: steadier than wall time on a
    shared machine, though it counts ONNX Runtime's and OpenMP's spin-waiting too."""
    cpu = r.get("cpu_median_s")
    return f"{cpu / ref_cpu:.2f}" if cpu and ref_cpu else "-"


def _peak_name(precision: str) -> str:
    return "int8" if precision.startswith("int8") else "bf16" if precision == "bf16" else "fp32"


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
    report: dict[str, Any], results_dir: Path, chart: bool = True, readme: Path | list[Path] | None = None
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
    for one in [readme] if isinstance(readme, Path) else readme or []:
        rel = os.path.relpath(paths["png"], one.parent) if "png" in paths else None
        update_readme(one, to_markdown(report, chart=rel), os.path.relpath(paths["json"], one.parent))
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


def record_for_auto(report: dict[str, Any], json_path: Path) -> Path | None:
    """Record this run's task picks for ``backend="auto"`` on this machine (``runtime.auto``): one JSON per
    machine key, one entry per bundle digest (a later run of the same bundle replaces it)."""
    from sdkiln.runtime.auto import RECORD_SCHEMA, record_path

    picks = (report.get("recommendation") or {}).get("tasks") or {}
    digest = report["bundle"].get("digest")
    if not picks or not digest:
        return None
    key = report["machine"].get("machine_key")
    path = record_path(key)
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        data = {}
    if data.get("schema") != RECORD_SCHEMA:
        data = {}
    m = report["machine"]
    data.update({"schema": RECORD_SCHEMA, "machine_key": key, "cpu_model": m["cpu_model"], "isa": m["isa"]})
    data.setdefault("bundles", {})[digest] = {
        "name": report["bundle"]["name"],
        "path": report["bundle"]["path"],
        "created": report["created"],
        "report": str(json_path),
        "threads": report["config"]["threads"],
        "tasks": picks,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_json_default) + "\n")
    os.replace(tmp, path)
    return path
