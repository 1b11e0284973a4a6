"""``make gpu-check``: prove the NVIDIA path on a machine with an NVIDIA GPU and a CUDA PyTorch, in one run.

    python3 stages/gpu_check.py --out artifacts/gpu-check [--wheels .whl] [--budget 480]

Runs as a file, before sdkiln is installed (the first phase uses the standard library only):

1. **Machine.** ``nvidia-smi`` must list a GPU and ``torch.cuda`` must see it; otherwise exit 2 with what
   is missing, before touching anything. Missing Python packages are installed from ``--wheels`` (the
   project's own wheel folder: ``make gpu-wheels`` fills it where pip works; no index is contacted), sdkiln
   itself is imported from this checkout. TensorRT, the CUDA runtime bindings and onnxruntime-gpu are
   optional: what is absent is said, and what needs it is listed as skipped.
2. **Tiny NVIDIA build.** ``recipes/tiny-nvidia.yaml`` (without its engine steps when TensorRT is absent).
3. **Parity.** sketch, text and edit on each GPU backend available (``torch_cuda`` eager and compiled,
   ONNX Runtime's CUDA provider, TensorRT with and without CUDA graphs) against the CPU PyTorch
   reference, same seeds and initial latents: PSNR / SSIM of the final images, gated at the fp16 floor.
4. **Real-size timings** (random weights, real shapes; 512x512): SD 1.5 + scribble ControlNet and
   SD-Turbo presets. UNet step; 4-step sketch (SD 1.5, LCM-style: no CFG) and 1-step text (SD-Turbo)
   end to end, batch 1 and 4. CUDA events around each call after warm-up; median of the repeats.
   TensorRT engines of the real models come from the build engine (``export_onnx`` ->
   ``prepare_tensorrt`` -> ``build_tensorrt``), cached, so a second run reuses them.

Everything that does not fit the time budget (default 8 minutes) is skipped and listed with the reason;
one JSON and one Markdown report go to ``--out``. Exit 0 when every check that ran passed, 1 when one
failed, 2 when the machine cannot run the check at all.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]  # stages/ is one level below the checkout
DEFAULT_BUDGET_S = 480
# Issue 15's targets on an H200 (batch 1, 512x512, end to end).
TARGETS_MS = {
    "sd-turbo text 1-step b1": 25.0,
    "sd15-controlnet sketch 4-step b1": 60.0,
}
# What sdkiln imports on a GPU machine: (import name, distribution). torch is the machine's own.
REQUIRED = [
    ("pydantic", "pydantic"),
    ("pydantic_core", "pydantic-core"),
    ("annotated_types", "annotated-types"),
    ("typing_inspection", "typing-inspection"),
    ("yaml", "pyyaml"),
    ("tqdm", "tqdm"),
    ("PIL", "pillow"),
    ("safetensors", "safetensors"),
    ("huggingface_hub", "huggingface-hub"),
    ("tokenizers", "tokenizers"),
    ("transformers", "transformers"),
    ("importlib_metadata", "importlib-metadata"),
    ("diffusers", "diffusers"),
    ("peft", "peft"),
    ("accelerate", "accelerate"),
    ("onnx", "onnx"),
    ("onnxscript", "onnxscript"),
    ("onnxruntime", "onnxruntime"),
    ("cv2", "opencv-python-headless"),
]
FP16_PSNR_FLOOR_DB = 28.0  # runtime.parity.PSNR_FLOORS_DB["fp16"]


class NoGpu(Exception):
    """This machine cannot run the check (exit 2)."""


# --------------------------------------------------------------------------------------------------
# Report


class Report:
    def __init__(self, out: Path):
        self.out = out
        self.data: dict[str, Any] = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "environment": {"python": platform.python_version(), "platform": platform.platform()},
            "phases": {},
            "parity": [],
            "timings": [],
            "targets": {},
            "skipped": [],
            "failures": [],
        }

    def skip(self, what: str, why: str) -> None:
        print(f"gpu-check: skipped {what}: {why}", flush=True)
        self.data["skipped"].append({"what": what, "why": why})

    def fail(self, what: str, why: str) -> None:
        print(f"gpu-check: FAILED {what}: {why}", flush=True)
        self.data["failures"].append({"what": what, "why": why})

    def phase(self, name: str, seconds: float, **info: Any) -> None:
        self.data["phases"][name] = {"seconds": round(seconds, 1), **info}

    def write(self) -> tuple[Path, Path]:
        self.out.mkdir(parents=True, exist_ok=True)
        self.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        j = self.out / "gpu-check.json"
        j.write_text(json.dumps(self.data, indent=2, sort_keys=True, default=str) + "\n")
        m = self.out / "gpu-check.md"
        m.write_text(markdown(self.data))
        return j, m


def markdown(d: dict[str, Any]) -> str:
    env = d["environment"]
    lines = ["# sdkiln gpu-check", "", f"Started {d['started']}, finished {d.get('finished', '?')}.", ""]
    lines += ["## Machine", ""] + [f"- {k}: {v}" for k, v in sorted(env.items())] + [""]
    if d["phases"]:
        lines += ["## Phases", "", "| phase | seconds | notes |", "| --- | ---: | --- |"]
        for name, p in d["phases"].items():
            notes = ", ".join(f"{k}={v}" for k, v in p.items() if k != "seconds")
            lines.append(f"| {name} | {p['seconds']} | {notes} |")
        lines.append("")
    if d["parity"]:
        lines += ["## Parity (tiny model vs CPU PyTorch reference)", ""]
        lines += [
            "| backend | task | PSNR dB | SSIM | pass | runs on |",
            "| --- | --- | ---: | ---: | --- | --- |",
        ]
        for r in d["parity"]:
            lines.append(
                f"| {r['backend']} | {r['task']} | {r['psnr_db']} | {r['ssim']} | "
                f"{'yes' if r['pass'] else 'NO'} | {r['description']} |"
            )
        lines.append("")
    if d["timings"]:
        lines += ["## Timings (CUDA events, median after warm-up; 512x512)", ""]
        lines += ["| model | backend | what | batch | median ms | min ms | repeats |"]
        lines += ["| --- | --- | --- | ---: | ---: | ---: | ---: |"]
        for t in d["timings"]:
            lines.append(
                f"| {t['model']} | {t['backend']} | {t['what']} | {t['batch']} | {t['median_ms']} | "
                f"{t['min_ms']} | {t['repeats']} |"
            )
        lines.append("")
    if d["targets"]:
        lines += ["## Targets", "", "| target | limit ms | best measured ms | backend | met |"]
        lines += ["| --- | ---: | ---: | --- | --- |"]
        for name, t in d["targets"].items():
            lines.append(
                f"| {name} | {t['limit_ms']} | {t.get('best_ms', 'not measured')} | {t.get('backend', '')} | "
                f"{t.get('met', 'not measured')} |"
            )
        lines.append("")
    for title, key in (("Skipped", "skipped"), ("Failures", "failures")):
        if d[key]:
            lines += [f"## {title}", ""] + [f"- {x['what']}: {x['why']}" for x in d[key]] + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Phase 1: the machine (standard library + torch only)


def nvidia_smi() -> list[dict[str, str]]:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index,name,compute_cap,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    if out.returncode != 0:
        return []
    keys = ("index", "name", "compute_cap", "memory", "driver")
    return [
        dict(zip(keys, (p.strip() for p in line.split(",")), strict=False))
        for line in out.stdout.splitlines()
        if line.strip()
    ]


def check_machine(report: Report) -> Any:
    """The GPU and CUDA PyTorch, or NoGpu saying which is missing."""
    gpus = nvidia_smi()
    if not gpus:
        raise NoGpu(
            "no NVIDIA GPU found (nvidia-smi is missing or lists none). gpu-check needs an NVIDIA GPU with "
            "its driver and a CUDA build of PyTorch; on this machine run `make test` instead"
        )
    report.data["environment"]["gpus"] = gpus
    try:
        import torch
    except ImportError as e:
        raise NoGpu(f"PyTorch is not installed ({e}); install a CUDA build of PyTorch for this GPU") from e
    report.data["environment"]["torch"] = torch.__version__
    if torch.version.cuda is None or not torch.cuda.is_available():
        raise NoGpu(
            f"torch {torch.__version__} cannot use the GPU ({'a CPU-only build' if torch.version.cuda is None else 'torch.cuda.is_available() is False'}); "
            "install a CUDA build of PyTorch matching the driver"
        )
    report.data["environment"]["cuda"] = torch.version.cuda
    report.data["environment"]["device"] = torch.cuda.get_device_name(0)
    return torch


def ensure_packages(wheels: Path | None, site: Path, report: Report) -> None:
    """Import what sdkiln needs; install what is missing from the wheel folder (no index), then sdkiln
    itself from this checkout (a link tree for its package layout)."""
    import importlib

    missing = []
    for mod, dist in REQUIRED:
        try:
            importlib.import_module(mod)
        except ImportError:
            missing.append(dist)
    installed: list[str] = []
    if missing:
        if wheels is None or not wheels.is_dir():
            raise NoGpu(
                f"missing Python packages {missing} and no wheel folder to install them from "
                "(make gpu-wheels fills .whl/ where pip can reach an index; pass --wheels)"
            )
        site.mkdir(parents=True, exist_ok=True)
        names = [w for w in sorted(wheels.glob("*.whl")) if _dist_of(w) in {_norm(m) for m in missing}]
        absent = sorted({_norm(m) for m in missing} - {_dist_of(w) for w in names})
        if absent:
            raise NoGpu(f"missing Python packages with no wheel in {wheels}: {absent}")
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
        cmd += ["--target", str(site), *map(str, names)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise NoGpu(f"installing {missing} from {wheels} failed:\n{res.stderr[-2000:]}")
        sys.path.insert(0, str(site))
        importlib.invalidate_caches()
        installed = [w.name for w in names]
    report.data["environment"]["installed_wheels"] = installed
    tree = site.parent / "sdkiln-src"
    pkg = tree / "sdkiln"
    pkg.mkdir(parents=True, exist_ok=True)
    for name, target in (("stages", REPO / "stages"), ("runtime", REPO / "runtime")):
        link = pkg / name
        if not link.exists():
            link.symlink_to(target, target_is_directory=True)
    sys.path.insert(0, str(tree))


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


def _dist_of(wheel: Path) -> str:
    return _norm(wheel.name.split("-", 1)[0])


def optional_libraries(report: Report) -> dict[str, bool]:
    """TensorRT, the CUDA runtime bindings and onnxruntime's CUDA provider: which are here, and why not."""
    have = {}
    env = report.data["environment"]
    try:
        from sdkiln.runtime.backends import nvidia

        trt = nvidia.require_tensorrt()
        env["tensorrt"] = trt.__version__
        have["tensorrt"] = True
    except Exception as e:
        env["tensorrt"] = f"absent: {e}"
        have["tensorrt"] = False
    try:
        from sdkiln.runtime.backends.cuda_rt import CudaRuntime

        rt = CudaRuntime.open()
        env["cuda_bindings"] = f"ok ({rt.name}, sm{rt.compute_capability[0]}{rt.compute_capability[1]})"
        have["cuda_bindings"] = True
    except Exception as e:
        env["cuda_bindings"] = f"absent: {e}"
        have["cuda_bindings"] = False
    try:
        import onnxruntime as ort

        provs = ort.get_available_providers()
        env["onnxruntime"] = f"{ort.__version__} ({', '.join(provs)})"
        have["ort_cuda"] = "CUDAExecutionProvider" in provs
    except Exception as e:
        env["onnxruntime"] = f"absent: {e}"
        have["ort_cuda"] = False
    if not have["tensorrt"] or not have["cuda_bindings"]:
        report.skip(
            "TensorRT (engines, tensorrt backend)",
            f"{env['tensorrt']}; cuda-bindings: {env['cuda_bindings']}",
        )
    if not have["ort_cuda"]:
        report.skip("ONNX Runtime CUDA provider", "onnxruntime-gpu is not installed (CPU provider only)")
    return have


# --------------------------------------------------------------------------------------------------
# Phases 2-4


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def allows(self, estimate_s: float) -> bool:
        return self.left() >= estimate_s


def build_recipe(path: Path, artifacts: Path, drop_stages: set[str], drop_steps: set[str]) -> Path:
    """Build a recipe (without some steps) with the real engine; returns the bundle folder."""
    import yaml

    from sdkiln.stages.engine import build

    raw = yaml.safe_load(path.read_text())
    raw["steps"] = [s for s in raw["steps"] if s["stage"] not in drop_stages and s["id"] not in drop_steps]
    tmp = Path(tempfile.mkdtemp()) / path.name
    tmp.write_text(
        f"# Build: sdkiln build {path.name} (gpu-check's copy)\n" + yaml.safe_dump(raw, sort_keys=False)
    )
    from sdkiln.stages import STAGES

    return build(tmp, artifacts, stages=STAGES).bundle


def tiny_backends(have: dict[str, bool]) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = [
        ("torch_cuda fp16", {"backend": "torch_cuda"}),
        ("torch_cuda fp16 compiled", {"backend": "torch_cuda", "compile": "default"}),
        ("torch_cuda fp16 CUDA graphs", {"backend": "torch_cuda", "cuda_graphs": True}),
    ]
    if have.get("ort_cuda"):
        out.append(("onnx CUDA", {"backend": "onnx", "provider": "cuda"}))
    if have.get("tensorrt") and have.get("cuda_bindings"):
        out.append(("tensorrt", {"backend": "tensorrt"}))
        out.append(("tensorrt CUDA graphs", {"backend": "tensorrt", "cuda_graphs": True}))
    return out


def parity_phase(bundle: Path, have: dict[str, bool], report: Report, budget: Budget) -> None:
    from sdkiln.runtime.load import load
    from sdkiln.runtime.parity import available_cases, compare, run_case

    ref = load(bundle, backend="torch")
    cases = available_cases(ref)
    expected = {c.task: run_case(ref, c) for c in cases}
    for label, kwargs in tiny_backends(have):
        if not budget.allows(30):
            report.skip(f"parity {label}", "out of time budget")
            continue
        t0 = time.perf_counter()
        try:
            pipe = load(bundle, **kwargs)
            for c in cases:
                m = compare(expected[c.task], run_case(pipe, c))
                ok = m["psnr_db"] >= FP16_PSNR_FLOOR_DB
                report.data["parity"].append(
                    {
                        "backend": label,
                        "task": c.task,
                        **m,
                        "pass": ok,
                        "description": pipe.backend.description,
                    }
                )
                if not ok:
                    report.fail(
                        f"parity {label} {c.task}", f"PSNR {m['psnr_db']} dB < {FP16_PSNR_FLOOR_DB} dB"
                    )
            origins = getattr(pipe.backend, "origins", None)
            report.phase(
                f"parity {label}", time.perf_counter() - t0, **({"engines": origins} if origins else {})
            )
        except Exception as e:
            report.fail(f"parity {label}", f"{type(e).__name__}: {e}")
            traceback.print_exc()


def cuda_time(fn: Any, warmup: int, repeats: int) -> dict[str, Any]:
    """Median and min of ``repeats`` calls timed with CUDA events, after ``warmup`` untimed calls."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()  # every backend's call returns only when its results are on the host
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return {
        "median_ms": round(statistics.median(times), 2),
        "min_ms": round(min(times), 2),
        "repeats": repeats,
    }


REAL = {
    # preset: (task, steps, guidance)
    "sd-turbo": ("text", 1, 0.0),
    "sd15-controlnet": ("sketch", 4, 1.0),  # LCM-style: 4 steps, no classifier-free guidance
}


def unet_feeds(pipe: Any, batch: int, size: int = 512) -> dict[str, Any]:
    from sdkiln.stages.common.onnx.io import spec_feeds as random_feeds

    unet = pipe.backend.component("unet")
    f = pipe.info.vae_scale_factor
    axes = {
        "batch": batch,
        "latent_height": size // f,
        "latent_width": size // f,
        "height": size,
        "width": size,
    }
    spec = [{"name": n, "dtype": t.dtype, "shape": list(t.shape)} for n, t in unet.io.inputs.items()]
    return random_feeds(spec, {n: list(unet.io.resolve(n, axes)) for n in unet.io.inputs}, seed=0)


def time_pipeline(model: str, label: str, pipe: Any, report: Report, warmup: int, repeats: int) -> None:
    from dataclasses import replace

    from sdkiln.runtime.examples import SKETCHES
    from sdkiln.runtime.tasks import sketch_request, text_request

    task, steps, guidance = REAL[model]
    unet = pipe.backend.component("unet")
    for batch in (1, 4):
        feeds = unet_feeds(pipe, batch)
        row = cuda_time(lambda feeds=feeds: unet(**feeds), warmup, repeats)
        report.data["timings"].append(
            {"model": model, "backend": label, "what": "UNet step", "batch": batch, **row}
        )
        if task == "text":
            req = text_request(
                pipe,
                ["a lighthouse at dusk"] * batch,
                steps=steps,
                guidance=guidance,
                seed=7,
                height=512,
                width=512,
            )
        else:
            req = sketch_request(
                pipe,
                SKETCHES["car"](),
                "a red sports car",
                steps=steps,
                guidance=guidance,
                seed=42,
                height=512,
                width=512,
            )
            req = replace(req, prompts=req.prompts * batch)
        row = cuda_time(lambda req=req: pipe.generate(req), warmup, repeats)
        what = f"{task} {steps}-step e2e"
        report.data["timings"].append({"model": model, "backend": label, "what": what, "batch": batch, **row})
        target = f"{model} {task} {steps}-step b{batch}"
        if target in TARGETS_MS:
            t = report.data["targets"].setdefault(target, {"limit_ms": TARGETS_MS[target]})
            if "best_ms" not in t or row["median_ms"] < t["best_ms"]:
                t.update(best_ms=row["median_ms"], backend=label, met=row["median_ms"] <= TARGETS_MS[target])


def real_phase(out: Path, have: dict[str, bool], report: Report, budget: Budget, args: Any) -> None:
    import torch

    from sdkiln.runtime.load import load, open_section
    from sdkiln.stages.common.torch.presets import save_preset

    # Eager fp16 on both models first (the targets' numbers), then the compiled variants, then the
    # ONNX Runtime / TensorRT builds: the most informative measurements come first when time runs short.
    entries: dict[str, Any] = {}
    for model in REAL:
        if not budget.allows(120):
            report.skip(f"real-size {model}", "out of time budget (building its random-weight pipeline)")
            continue
        folder = out / "real" / model / "pipeline"
        t0 = time.perf_counter()
        manifest_file = folder.parent / "manifest.json"
        if manifest_file.is_file():
            entries[model] = json.loads(manifest_file.read_text())
        else:
            entries[model] = save_preset(model, folder, seed=0)
            manifest_file.write_text(json.dumps(entries[model], default=str))
        report.phase(f"real {model}: random-weight pipeline", time.perf_counter() - t0)
    variants = (
        ("torch_cuda fp16", {}, 60),
        ("torch_cuda fp16 compiled + CUDA graphs", {"compile": "reduce-overhead", "cuda_graphs": True}, 240),
    )
    for label, kwargs, estimate in variants:
        for model, entry in entries.items():
            if not budget.allows(estimate):
                report.skip(f"timing {model} {label}", f"needs ~{estimate} s, {budget.left():.0f} s left")
                continue
            t0 = time.perf_counter()
            pipe = None
            try:
                pipe = open_section(out / "real" / model / "pipeline", entry, "torch_cuda", **kwargs)
                time_pipeline(model, label, pipe, report, args.warmup, args.repeats)
            except Exception as e:
                report.fail(f"timing {model} {label}", f"{type(e).__name__}: {e}")
                traceback.print_exc()
            finally:
                del pipe
                torch.cuda.empty_cache()
            report.phase(f"timing {model} {label}", time.perf_counter() - t0)
    for model in entries:
        if not (have.get("tensorrt") and have.get("cuda_bindings")) and not have.get("ort_cuda"):
            continue
        # ONNX / TensorRT: the graphs come from the build engine (cached between runs).
        estimate = 150 if (out / "artifacts" / f"gpu-check-{model}").is_dir() else 420
        if not budget.allows(estimate):
            report.skip(
                f"real-size {model} on ONNX Runtime CUDA / TensorRT",
                f"export + engine build need ~{estimate} s, {budget.left():.0f} s left (rerun with a larger --budget; "
                "engines and the timing cache are kept for the next run)",
            )
            continue
        t0 = time.perf_counter()
        try:
            bundle = build_recipe(real_recipe(model, out, have), out / "artifacts", set(), set())
        except Exception as e:
            report.fail(f"build real-size {model}", f"{type(e).__name__}: {e}")
            traceback.print_exc()
            continue
        report.phase(f"build real-size {model} (ONNX, TensorRT)", time.perf_counter() - t0)
        variants = []
        if have.get("ort_cuda"):
            variants.append(("onnx CUDA fp32", {"backend": "onnx", "provider": "cuda"}))
        if have.get("tensorrt") and have.get("cuda_bindings"):
            variants += [
                ("tensorrt fp16", {"backend": "tensorrt"}),
                ("tensorrt fp16 + CUDA graphs", {"backend": "tensorrt", "cuda_graphs": True}),
            ]
        for label, kwargs in variants:
            if not budget.allows(40):
                report.skip(f"timing {model} {label}", "out of time budget")
                continue
            t0 = time.perf_counter()
            try:
                pipe = load(bundle, **kwargs)
                time_pipeline(model, label, pipe, report, args.warmup, args.repeats)
            except Exception as e:
                report.fail(f"timing {model} {label}", f"{type(e).__name__}: {e}")
                traceback.print_exc()
            report.phase(f"timing {model} {label}", time.perf_counter() - t0)


def real_recipe(model: str, out: Path, have: dict[str, bool]) -> Path:
    """A recipe for the real-size preset's ONNX (+ TensorRT-ready graphs and engines) at 512x512."""
    import yaml

    parity = {"batch_sizes": [1], "image_sizes": [64]}
    comps = ["text_encoder", "unet", "vae_decoder"] + (
        ["controlnet.scribble"] if model == "sd15-controlnet" else []
    )
    steps: list[dict[str, Any]] = [
        {"id": "base", "stage": "load_pipeline", "params": {"source": "preset", "preset": model, "seed": 0}},
        {
            "id": "onnx",
            "stage": "export_onnx",
            "inputs": {"model": "base"},
            "params": {"precision": "fp32", "components": comps, "parity": parity},
        },
    ]
    if have.get("tensorrt") and have.get("cuda_bindings"):
        steps += [
            {
                "id": "trt_onnx",
                "stage": "prepare_tensorrt",
                "inputs": {"onnx": "onnx", "model": "base"},
                "params": {
                    "components": comps,
                    "batch": [1, 1, 4],
                    "height": [512, 512, 512],
                    "width": [512, 512, 512],
                    "cfg": False,
                    "parity": parity,
                },
            },
            {
                "id": "engines",
                "stage": "build_tensorrt",
                "inputs": {"onnx": "trt_onnx"},
                "params": {"optimization_level": 3},
            },
        ]
    path = out / f"gpu-check-{model}.yaml"
    path.write_text(
        f"# Build: sdkiln build {path.name} (written by gpu-check)\n"
        + yaml.safe_dump(
            {"name": f"gpu-check-{model}", "description": f"gpu-check: real-size {model}", "steps": steps},
            sort_keys=False,
        )
    )
    return path


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "artifacts" / "gpu-check")
    ap.add_argument("--wheels", type=Path, default=REPO / ".whl", help="wheel folder for missing packages")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for the whole check")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--skip-real", action="store_true", help="tiny build and parity only")
    args = ap.parse_args(argv)
    budget = Budget(args.budget)
    report = Report(args.out)
    try:
        check_machine(report)
    except NoGpu as e:
        print(f"gpu-check: {e}", file=sys.stderr)
        report.skip("everything", str(e))
        report.write()
        return 2
    try:
        ensure_packages(args.wheels if args.wheels.is_dir() else None, args.out / "site", report)
    except NoGpu as e:
        print(f"gpu-check: {e}", file=sys.stderr)
        report.skip("everything", str(e))
        report.write()
        return 2
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    have = optional_libraries(report)
    artifacts = args.out / "artifacts"
    t0 = time.perf_counter()
    drop_stages = set() if have.get("tensorrt") and have.get("cuda_bindings") else {"build_tensorrt"}
    bundle = None
    try:
        bundle = build_recipe(REPO / "recipes" / "tiny-nvidia.yaml", artifacts, drop_stages, set())
        report.phase("tiny-nvidia build", time.perf_counter() - t0, bundle=str(bundle))
    except Exception as e:
        report.fail("tiny-nvidia build", f"{type(e).__name__}: {e}")
        traceback.print_exc()
    if bundle is not None:
        parity_phase(bundle, have, report, budget)
    if args.skip_real:
        report.skip("real-size timings", "--skip-real")
    else:
        real_phase(args.out, have, report, budget, args)
    for name, limit in TARGETS_MS.items():
        report.data["targets"].setdefault(name, {"limit_ms": limit})
    j, m = report.write()
    print(
        f"gpu-check: report {j} and {m}; {len(report.data['failures'])} failure(s), "
        f"{len(report.data['skipped'])} skipped",
        flush=True,
    )
    return 1 if report.data["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
