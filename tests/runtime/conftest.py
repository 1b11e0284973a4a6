"""Runtime fixtures: a tiny bundle (torch/fused + onnx/fp32 + onnx/int8) built offline once per session.

The PIPELINE section is the shared ``tiny_sd15_dir`` preset (SD 1.5 family, scribble + canny ControlNets
with randomised zero-convs, TAESD). The ONNX sections are exported here with ``torch.onnx.export``
(TorchScript exporter: seconds for tiny models) in the contract layout, I/O names and manifest specs,
so the runtime's tests do not wait on the build stages; the bundle manifest is what the engine writes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

try:
    import torch
except ImportError:  # a runtime-only install: the bundle fixtures skip, the numpy-only tests still run
    torch = None
_Module: Any = torch.nn.Module if torch is not None else object


@pytest.fixture(scope="session", autouse=True)
def _private_hash_memo(tmp_path_factory: pytest.TempPathFactory):
    """The runtime memoises sha256s under $XDG_CACHE_HOME; keep the tests' memo out of the user's home."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        yield


def _export(module: Any, args: tuple, path: Path, inputs: list[str], outputs: list[str], axes: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )


class _TextEncoder(_Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids):
        out = self.m(input_ids.long())
        return out.last_hidden_state, out.pooler_output


class _Unet(_Module):
    def __init__(self, m, n_down):
        super().__init__()
        self.m, self.n = m, n_down

    def forward(self, sample, timestep, encoder_hidden_states, *res):
        return self.m(
            sample,
            timestep,
            encoder_hidden_states,
            down_block_additional_residuals=list(res[: self.n]),
            mid_block_additional_residual=res[self.n],
            return_dict=False,
        )[0]


class _ControlNet(_Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale):
        downs, mid = self.m(
            sample,
            timestep,
            encoder_hidden_states,
            controlnet_cond,
            conditioning_scale=conditioning_scale,
            return_dict=False,
        )
        return (*downs, mid)


class _VaeEncoder(_Module):
    def __init__(self, m, tiny):
        super().__init__()
        self.m, self.tiny = m, tiny

    def forward(self, sample):
        out = self.m.encode(sample)
        return out.latents if self.tiny else out.latent_dist.mean


class _VaeDecoder(_Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, latent_sample):
        return self.m.decode(latent_sample, return_dict=False)[0]


def export_onnx_section(pipeline_dir: Path, out: Path, describe: dict[str, Any]) -> dict[str, Any]:
    """Export a PIPELINE folder to the contract's ONNX layout; returns the section's manifest entry."""
    import diffusers
    import transformers

    from sdkiln.stages.families import component_specs, controlnet_residual_count

    fam = describe["extra"]["family"]
    cns = describe["extra"]["controlnets"]
    unet = diffusers.UNet2DConditionModel.from_pretrained(pipeline_dir / "unet").eval()
    te = transformers.CLIPTextModel.from_pretrained(pipeline_dir / "text_encoder").eval()
    vae = diffusers.AutoencoderKL.from_pretrained(pipeline_dir / "vae").eval()
    taesd = diffusers.AutoencoderTiny.from_pretrained(pipeline_dir / "vae_tiny").eval()
    n_down = controlnet_residual_count(unet.config.block_out_channels, unet.config.layers_per_block)
    lat = 8
    b = {0: "batch"}
    ehs = torch.randn(1, 77, unet.config.cross_attention_dim)
    sample = torch.randn(1, 4, lat, lat)
    t = torch.tensor([500.0])
    with torch.no_grad():
        downs, mid = diffusers.ControlNetModel.from_pretrained(pipeline_dir / "controlnet" / cns[0])(
            sample, t, ehs, torch.rand(1, 3, lat * 8, lat * 8), return_dict=False
        )
    res_names = [f"down_block_additional_residual_{i}" for i in range(n_down)] + [
        "mid_block_additional_residual"
    ]
    lat_axes = {0: "batch", 2: "latent_height", 3: "latent_width"}
    _export(
        _TextEncoder(te),
        (torch.zeros(1, 77, dtype=torch.int32),),
        out / "text_encoder" / "model.onnx",
        ["input_ids"],
        ["last_hidden_state", "pooler_output"],
        {"input_ids": b, "last_hidden_state": b, "pooler_output": b},
    )
    _export(
        _Unet(unet, n_down),
        (sample, t, ehs, *downs, mid),
        out / "unet" / "model.onnx",
        ["sample", "timestep", "encoder_hidden_states", *res_names],
        ["out_sample"],
        {
            "sample": lat_axes,
            "timestep": b,
            "encoder_hidden_states": b,
            "out_sample": lat_axes,
            **{n: lat_axes for n in res_names},
        },
    )
    for ctype in cns:
        cn = diffusers.ControlNetModel.from_pretrained(pipeline_dir / "controlnet" / ctype).eval()
        outs = [f"down_block_res_sample_{i}" for i in range(n_down)] + ["mid_block_res_sample"]
        _export(
            _ControlNet(cn),
            (sample, t, ehs, torch.rand(1, 3, lat * 8, lat * 8), torch.tensor([1.0])),
            out / "controlnet" / ctype / "model.onnx",
            ["sample", "timestep", "encoder_hidden_states", "controlnet_cond", "conditioning_scale"],
            outs,
            {
                "sample": lat_axes,
                "timestep": b,
                "encoder_hidden_states": b,
                "controlnet_cond": {0: "batch", 2: "height", 3: "width"},
                **{n: lat_axes for n in outs},
            },
        )
        cn.save_config(out / "controlnet" / ctype)
    img_axes = {0: "batch", 2: "height", 3: "width"}
    for name, model, tiny in (("vae", vae, False), ("taesd", taesd, True)):
        _export(
            _VaeEncoder(model, tiny),
            (torch.rand(1, 3, lat * 8, lat * 8) * 2 - 1),
            out / f"{name}_encoder" / "model.onnx",
            ["sample"],
            ["latent_sample"],
            {"sample": img_axes, "latent_sample": lat_axes},
        )
        _export(
            _VaeDecoder(model),
            (torch.randn(1, 4, lat, lat),),
            out / f"{name}_decoder" / "model.onnx",
            ["latent_sample"],
            ["sample"],
            {"latent_sample": lat_axes, "sample": img_axes},
        )
        for half in ("encoder", "decoder"):
            model.save_config(out / f"{name}_{half}")
    unet.save_config(out / "unet")
    te.config.to_json_file(out / "text_encoder" / "config.json")
    for folder in ("tokenizer", "scheduler"):
        shutil.copytree(pipeline_dir / folder, out / folder)
    shutil.copy(pipeline_dir / "model_index.json", out / "model_index.json")
    configs = {
        "unet": dict(unet.config),
        "vae": dict(vae.config),
        "text_encoder": te.config.to_dict(),
        "vae_tiny": dict(taesd.config),
    }
    paths = {
        "text_encoder": "text_encoder/model.onnx",
        "unet": "unet/model.onnx",
        "vae_encoder": "vae_encoder/model.onnx",
        "vae_decoder": "vae_decoder/model.onnx",
        "taesd_encoder": "taesd_encoder/model.onnx",
        "taesd_decoder": "taesd_decoder/model.onnx",
        **{f"controlnet.{c}": f"controlnet/{c}/model.onnx" for c in cns},
    }
    comps = component_specs(fam, configs, controlnets=cns, taesd=True, paths=paths, unet_residual_inputs=True)
    return {
        "kind": "onnx",
        "stage": "export_onnx (test fixture)",
        "params": {"precision": "fp32"},
        "metrics": {},
        "components": comps,
        "extra": {"family": fam, "precision": "fp32", "controlnets": cns, "taesd": True},
    }


def quantize_section(src: Path, out: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """An INT8 section: dynamic INT8 MatMuls in the text encoder, UNet and ControlNets; VAEs stay fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    shutil.copytree(src, out)
    comps = json.loads(json.dumps(entry["components"]))
    for name, comp in comps.items():
        if name.startswith(("unet", "text_encoder", "controlnet")):
            path = out / comp["path"]
            tmp = path.with_name("model.fp32.onnx")
            path.rename(tmp)
            quantize_dynamic(
                str(tmp), str(path), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8
            )
            tmp.unlink()
            comp["precision"] = "int8"
    return {
        **entry,
        "params": {"precision": "int8"},
        "components": comps,
        "extra": {**entry["extra"], "precision": "int8"},
    }


def write_bundle_manifest(root: Path, sections: dict[str, dict[str, Any]]) -> None:
    from sdkiln.stages.manifest import file_table

    manifest = {"name": root.name, "files": file_table(root), "sections": sections}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """A read-only tiny bundle: ``torch/fused`` (the preset), ``onnx/fp32`` and ``onnx/int8``."""
    if torch is None:
        pytest.skip("building the tiny bundle needs the build extra (torch, diffusers)")
    tiny_sd15_artifact = request.getfixturevalue("tiny_sd15_artifact")
    root = tmp_path_factory.mktemp("bundle") / "tiny"
    shutil.copytree(tiny_sd15_artifact.path, root / "torch" / "fused")
    fused = {**tiny_sd15_artifact.manifest, "step": "fused", "stage": "load_pipeline"}
    fp32 = export_onnx_section(root / "torch" / "fused", root / "onnx" / "fp32", tiny_sd15_artifact.manifest)
    int8 = quantize_section(root / "onnx" / "fp32", root / "onnx" / "int8", fp32)
    write_bundle_manifest(
        root,
        {
            "torch/fused": fused,
            "onnx/fp32": {**fp32, "step": "onnx"},
            "onnx/int8": {**int8, "step": "onnx_int8"},
        },
    )
    return root


@pytest.fixture(scope="session")
def tiny_lcm_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path) -> Path:
    """``tiny_bundle`` with an LCM scheduler (as after LCM-LoRA fusion): 4 steps, no CFG by default."""
    root = tmp_path_factory.mktemp("bundle-lcm") / "tiny-lcm"
    shutil.copytree(tiny_bundle, root)
    manifest = json.loads((root / "manifest.json").read_text())
    lcm = {
        "_class_name": "LCMScheduler",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "original_inference_steps": 50,
        "timestep_scaling": 10.0,
    }
    for section in ("torch/fused", "onnx/fp32", "onnx/int8"):
        (root / section / "scheduler" / "scheduler_config.json").write_text(json.dumps(lcm))
        manifest["sections"][section]["extra"]["lcm"] = True
    write_bundle_manifest(root, manifest["sections"])
    return root
