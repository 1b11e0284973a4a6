"""`sdkiln bench` with OpenVINO beside ONNX Runtime, the fast-profile levers, the per-profile picks (only
what was measured and passed in the run), the machine record, and `sdkiln run --backend auto` following
it. No timing assertions: what is checked is how every number and pick is derived."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sdkiln.runtime.contract.floors import E2E_PSNR_DB
from sdkiln.stages.tools import bench

pytest.importorskip("openvino", reason="the OpenVINO variants need the openvino extra")

LEVERS = "taesd,taesd+steps2+cn1"
BACKENDS = ["torch", "onnx/fp32", "openvino/fp32", "openvino/int8"]


def _native_bf16() -> bool:
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def _sdkiln(*args: str, cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sdkiln.stages.cli", *args],
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def ov_run(tiny_openvino_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench-ov")
    env = {"SDKILN_BENCH_CACHE": str(out / "records")}
    # Where the CPU has native bf16, the int8 section at bf16 too: the run composes openvino/int8@mixed.
    backends = [*BACKENDS, "openvino/int8@bf16"] if _native_bf16() else BACKENDS
    proc = _sdkiln(
        "bench",
        str(tiny_openvino_bundle),
        "--backends",
        ",".join(backends),
        "--tasks",
        "sketch",
        "--levers",
        LEVERS,
        "--deepcache",
        "2",
        "--repeat",
        "1",
        "--warmup",
        "0",
        "--threads",
        "1",
        "--peak-max-n",
        "256",
        "--settle",
        "0",
        "--no-chart",
        "--results-dir",
        str(out / "results"),
        cwd=out,
        env=env,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    report = json.loads(next((out / "results").glob("*.json")).read_text())
    return {"report": report, "out": out, "env": env, "stdout": proc.stdout}


def test_openvino_is_measured_beside_onnx_runtime_on_every_component(ov_run: dict[str, Any]) -> None:
    report = ov_run["report"]
    assert not report["errors"], report["errors"]
    names = [v["name"] for v in report["variants"]]
    assert names[:4] == BACKENDS
    assert names[4:] in ([], ["openvino/int8@bf16"], ["openvino/int8@bf16", "openvino/int8@mixed"])
    peaks = {p["name"] for p in report["peak"]["probes"]}
    assert {"openvino MatMul f32", "openvino MatMul bf16", "openvino MatMul int8"} <= peaks
    rows = {r["component"]: r for r in report["components"]}
    assert {"text_encoder", "unet", "controlnet.scribble", "vae_decoder", "taesd_decoder"} <= set(rows)
    for comp, row in rows.items():
        by = {r["variant"]: r for r in row["results"]}
        assert {"onnx/fp32", "openvino/fp32"} <= set(by), comp  # side by side on every component
        # which kernels ran: ORT from a profiled call, OpenVINO from its execution graph
        assert by["onnx/fp32"]["kernels"]["nodes"] and by["openvino/fp32"]["kernels"]["nodes"]
        assert "kernels" not in by["torch"]
        # fp32 IR at f32 inference precision passes the same fp32 gate as the ONNX graph
        assert by["openvino/fp32"]["precision"] == "fp32" and by["openvino/fp32"]["parity"]["ok"] is True
    unet = {r["variant"]: r for r in rows["unet"]["results"]}
    assert unet["openvino/int8"]["precision"] == "int8"
    assert unet["openvino/int8"]["parity"]["floor"] == {"min_sqnr_db": 18.0}
    assert any(k.endswith(":u8") or k.endswith(":i8") for k in unet["openvino/int8"]["kernels"]["nodes"])
    assert all(k.endswith(":f32") for k in unet["openvino/fp32"]["kernels"]["nodes"])
    assert {"MatMul", "Conv"} & set(unet["onnx/fp32"]["kernels"]["nodes"])
    # the int8 UNet is compared with the int8 peak, fp32 ones with the fp32 peak
    for r in unet.values():
        dtype = "int8" if r["precision"].startswith("int8") else "fp32"  # int8+bf16 keeps int8 kernels
        assert r["fraction_of_dtype_peak"] == r["flops_per_s"] / report["peak"]["by_dtype"][dtype]


def test_exact_and_fast_runs_and_the_picks(ov_run: dict[str, Any]) -> None:
    report = ov_run["report"]
    (task,) = report["tasks"]
    runs = {r["variant"]: r for r in task["results"]}
    base = report["config"]["fast_base"]
    variants = [v["name"] for v in report["variants"]]
    assert base in variants and base not in ("torch", "openvino/int8@bf16")  # auto: components all passed
    assert set(runs) == {*variants, f"{base}+taesd", f"{base}+taesd+steps2+cn1"}
    fast = runs[f"{base}+taesd+steps2+cn1"]
    assert (
        fast["profile"] == "fast"
        and fast["steps"] == 2
        and fast["control_end"] == 0.5
        and fast["vae"] == "tiny"
    )
    assert fast["e2e_parity"] is None and fast["deviation"]["ssim"] <= 1.0
    assert "taesd_decoder" in fast["precisions"] and "vae_decoder" not in fast["precisions"]
    assert {"unet", "controlnet", "vae_decoder", "text_encoder"} <= set(fast["stages_median_s"])
    for name in ("onnx/fp32", "openvino/fp32", "openvino/int8"):
        r = runs[name]
        assert r["profile"] == "exact" and r["e2e_parity"]["floor_db"] == (
            E2E_PSNR_DB["int8"] if name.endswith("int8") else E2E_PSNR_DB["fp32"]
        )
        assert r["e2e_parity"]["ok"] == (
            r["deviation"]["psnr_db"] is None or r["deviation"]["psnr_db"] >= r["e2e_parity"]["floor_db"]
        )
        assert r["components_parity_ok"] is True  # every component it uses was measured and passed
    assert (
        runs["openvino/fp32"]["deviation"]["psnr_db"] is None
        or runs["openvino/fp32"]["deviation"]["psnr_db"] > 40
    )

    if "openvino/int8@bf16" in runs:
        assert runs["openvino/int8@bf16"]["profile"] == "fast"  # bf16 on every component: a trade-off
    if "openvino/int8@mixed" in runs:
        _check_mixed(report, runs["openvino/int8@mixed"])

    rec = report["recommendation"]["tasks"]["sketch"]
    exact_ok = [r for r in task["results"] if r["recommendable"] and r["profile"] == "exact"]
    assert rec["exact"]["variant"] == min(exact_ok, key=lambda r: r["ratio_to_reference"])["variant"]
    all_ok = [r for r in task["results"] if r["recommendable"]]
    assert rec["fast"]["variant"] == min(all_ok, key=lambda r: r["ratio_to_reference"])["variant"]
    for profile, pick in rec.items():
        assert pick["meets_target"] == (pick["ratio_to_reference"] <= bench.TARGETS[profile])
        assert ("bounds" in pick) == (not pick["meets_target"])
        if pick["profile_of_run"] == "fast":
            assert pick["label"].startswith("fast: PSNR") and "parity" not in pick["label"]
        elif pick["variant"] != "torch":
            assert pick["label"].startswith("with parity")
    dc = task["experiments"]["deepcache"]
    assert dc["calls"] == ["full", "shallow", "full", "shallow"] and dc["interval"] == 2
    assert dc["ratio_to_reference"] == dc["median_s"] / runs["torch"]["median_s"]
    assert dc["deviation"]["psnr_db"] is not None  # reuse is not exact
    md = bench.to_markdown(report)
    assert "DeepCache-style reuse on the sketch task" in md
    assert "| openvino/int8 | int8 |" in md or "openvino/int8 **best** | int8 |" in md
    assert "n/a (fast: a declared trade-off)" in md and "deviation from the exact output" in md


def test_the_record_drives_backend_auto(ov_run: dict[str, Any], tiny_openvino_bundle: Path) -> None:
    from sdkiln.runtime.machine import machine_key

    report, env, out = ov_run["report"], ov_run["env"], ov_run["out"]
    record = json.loads((Path(env["SDKILN_BENCH_CACHE"]) / f"{machine_key()}.json").read_text())
    entry = record["bundles"][report["bundle"]["digest"]]
    picks = report["recommendation"]["tasks"]["sketch"]
    assert entry["tasks"]["sketch"]["fast"]["variant"] == picks["fast"]["variant"]
    assert "recorded for backend='auto'" in ov_run["stdout"]

    sketch = Path(__file__).resolve().parents[3] / "runtime/data/examples/house.png"
    for profile in ("exact", "fast"):
        pick = picks[profile]
        proc = _sdkiln(
            "run",
            "sketch",
            "--model",
            str(tiny_openvino_bundle),
            "--backend",
            "auto",
            "--profile",
            profile,
            "--prompt",
            "a house",
            "--image",
            str(sketch),
            "--height",
            "64",
            "--width",
            "64",
            "--out",
            str(out / f"auto-{profile}.png"),
            cwd=out,
            env=env,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        s = pick["settings"]
        assert f"auto ({profile} profile): backend {s['backend']}, section {s['section']}" in proc.stdout
        assert "fastest" in proc.stdout and f"{pick['ratio_to_reference']:.2f}x" in proc.stdout
        assert (out / f"auto-{profile}.png").is_file()


def _check_mixed(report: dict[str, Any], run: dict[str, Any]) -> None:
    """The composed run: bf16 exactly where the component's bf16 row passed its floor and was faster, judged
    by those rows, and an exact-profile run with its end-to-end parity."""
    rows = {r["component"]: {x["variant"]: x for x in r["results"]} for r in report["components"]}
    spec = run["settings"]["inference_precision"]
    assert spec.startswith("f32,") and run["profile"] == "exact"
    for comp, by in rows.items():
        f, b = by["openvino/int8"], by["openvino/int8@bf16"]
        want_bf16 = b["parity"]["ok"] is True and (
            f["parity"]["ok"] is not True or b["median_s"] < f["median_s"]
        )
        assert (f"{comp}=bf16" in spec) == want_bf16, (comp, spec)
        assert run["component_sources"][comp] == ("openvino/int8@bf16" if want_bf16 else "openvino/int8")
        if comp in run["precisions"]:
            assert run["precisions"][comp].endswith("bf16") == want_bf16
    assert run["e2e_parity"] is not None


def test_compose_mixed_picks_bf16_only_where_it_passed_and_paid() -> None:
    """Synthetic component rows: bf16 is taken where it met its floor and was faster (or f32 failed), never
    where it missed its floor; components the run did not measure stay f32; the report then judges the
    composed run's components by the rows that chose them."""
    from sdkiln.stages.tools.bench.report import recommend
    from sdkiln.stages.tools.bench.run import compose_mixed
    from sdkiln.stages.tools.bench.variants import Variant

    def row(comp: str, f: tuple[float, bool], b: tuple[float, bool]) -> dict[str, Any]:
        results = [
            {"variant": "openvino/int8", "median_s": f[0], "parity": {"ok": f[1]}},
            {"variant": "openvino/int8@bf16", "median_s": b[0], "parity": {"ok": b[1]}},
        ]
        return {"component": comp, "results": results, "best": None}

    comp_rows = [
        row("unet", (1.5, True), (1.3, False)),  # faster but below its floor: f32
        row("vae_decoder", (9.3, True), (2.6, True)),  # faster and above: bf16
        row("text_encoder", (0.05, True), (0.06, True)),  # passes but slower: f32
        row("controlnet.scribble", (5.0, False), (5.5, True)),  # f32 failed, bf16 passed: bf16
    ]
    variants = [
        Variant("torch", "torch", "torch/base", "fp32"),
        Variant("openvino/int8", "openvino", "openvino/int8", "int8", {"inference_precision": "f32"}),
        Variant(
            "openvino/int8@bf16", "openvino", "openvino/int8", "int8+bf16", {"inference_precision": "bf16"}
        ),
        Variant("openvino/fp32", "openvino", "openvino/fp32", "fp32", {"inference_precision": "f32"}),
    ]
    skipped: list[dict[str, str]] = []
    (mixed,) = compose_mixed(variants, comp_rows, skipped, steps=4)
    assert mixed.name == "openvino/int8@mixed" and mixed.section == "openvino/int8"
    assert mixed.settings["inference_precision"] == "f32,controlnet.scribble=bf16,vae_decoder=bf16"
    assert mixed.settings["sources"] == {
        "unet": "openvino/int8",
        "vae_decoder": "openvino/int8@bf16",
        "text_encoder": "openvino/int8",
        "controlnet.scribble": "openvino/int8@bf16",
    }
    assert skipped == []  # openvino/fp32 has no @bf16 variant in this run: nothing to compose, nothing said

    # Two sections compose: only the one whose chosen components cost least per task runs end to end.
    fp32_rows = [
        {
            **r,
            "results": [
                *r["results"],
                *(
                    {**x, "variant": x["variant"].replace("int8", "fp32"), "median_s": 2 * x["median_s"]}
                    for x in r["results"]
                ),
            ],
        }
        for r in comp_rows
    ]
    both = [
        *variants,
        Variant("openvino/fp32@bf16", "openvino", "openvino/fp32", "bf16", {"inference_precision": "bf16"}),
    ]
    (cheapest,) = compose_mixed(both, fp32_rows, skipped, steps=4)
    assert cheapest.name == "openvino/int8@mixed"
    assert skipped[-1]["variant"] == "openvino/fp32@mixed" and "only the cheapest" in skipped[-1]["reason"]
    skipped.clear()

    # Nothing worth composing: said, not composed.
    assert compose_mixed(variants, [row("unet", (1.0, True), (1.3, True))], skipped) == []
    assert skipped[0]["variant"] == "openvino/int8@mixed"

    # The report judges each component of the composed run by the row that chose it.
    for comp in comp_rows:
        for r in comp["results"]:
            r["ratio_to_reference"] = r["median_s"]
    task = {
        "variant": "openvino/int8@mixed",
        "profile": "exact",
        "levers": [],
        "precisions": {"unet": "int8", "vae_decoder": "bf16", "text_encoder": "fp32"},
        "component_sources": mixed.settings["sources"],
        "ratio_to_reference": 0.3,
        "median_s": 3.0,
        "reference_median_s": 10.0,
        "e2e_parity": {"ok": True, "floor_db": 18.0},
        "deviation": {"psnr_db": 40.0},
        "stages_median_s": {},
    }
    report = {"components": comp_rows, "tasks": [{"task": "sketch", "reference": "torch", "results": [task]}]}
    rec = recommend(report)
    assert task["components_parity_ok"] is True  # unet by its f32 row, vae_decoder by its bf16 row
    assert rec["tasks"]["sketch"]["exact"]["variant"] == "openvino/int8@mixed"
    task["component_sources"] = {**mixed.settings["sources"], "unet": "openvino/int8@bf16"}
    recommend(report)
    assert task["components_parity_ok"] is False  # judged by a row below its floor: not recommendable
