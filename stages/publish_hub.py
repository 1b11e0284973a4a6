"""Stage ``publish_hub``: publish the outputs of earlier steps to a Hub repo, in the bundle layout.

    - id: publish
      stage: publish_hub
      inputs: {onnx: onnx_fp32, onnx_int8: unet_int8, coreml: coreml}
      params: {repo_id: me/sd15-lcm-scribble, tag: v1}

Each input lands in the folder its step has in the recipe's bundle (the step's ``bundle:`` setting, else
its stage's default, e.g. ``onnx/fp32``); the input names only say which role each step plays. The stage
assembles those folders plus ``manifest.json``, ``recipe.yaml`` and ``build.lock.json`` in its scratch
dir, then publishes them with :func:`sdkiln.stages.publish.publish_bundle` (one verified commit, then the
tag). Its output (Kind.PUBLISHED) is ``published.json``: repo, endpoint, commit, tag and the file table.

It needs the network, and a token from HF_TOKEN or ``hf auth login`` (never a recipe param). The step is
cached like any other: rebuilding with the same inputs and params does not publish again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from sdkiln.runtime.contract.digest import write_json_atomic
from sdkiln.runtime.contract.errors import UserError
from sdkiln.runtime.contract.layout import Kind
from sdkiln.runtime.contract.manifest import SCHEMA_VERSION, BundleManifest
from sdkiln.stages.engine.core import Stage, StageContext, StageParams
from sdkiln.stages.tools.publish.commit import REPO_ID_PATTERN, TAG_PATTERN, publish_bundle

# Named roles, all optional: a recipe wires the steps it wants to publish. The folder each lands in comes
# from the step's bundle setting, not from the role's name.
INPUTS: dict[str, tuple[str, ...]] = {
    "torch": (Kind.PIPELINE,),
    "torch_quantized": (Kind.TORCH_QUANTIZED,),
    "onnx": (Kind.ONNX,),
    "onnx_fp16": (Kind.ONNX,),
    "onnx_int8": (Kind.ONNX,),
    "coreml": (Kind.COREML,),
    "coreml_palettized": (Kind.COREML,),
    "tensorrt": (Kind.TENSORRT,),
}


class PublishHubParams(StageParams):
    repo_id: str = Field(
        pattern=REPO_ID_PATTERN, description="owner/name of the model repo (created if missing)"
    )
    endpoint: str | None = Field(
        default=None,
        pattern=r"^https?://\S+$",
        description="Hub URL; default $HF_ENDPOINT, else huggingface.co",
    )
    private: bool = False
    create_pr: bool = False
    tag: str | None = Field(default=None, pattern=TAG_PATTERN)
    license: str | None = Field(
        default=None, min_length=1, description="for the card when the build recorded none"
    )


def section_dir(ctx: StageContext, step_id: str) -> str:
    """Where a step's output sits in the recipe's bundle (its ``bundle:`` folder, else its stage's
    default), as the engine planned it."""
    if step_id not in ctx.bundle_dirs:
        raise UserError(f"{ctx.step_id}: input step {step_id!r} is not in the recipe")
    folder = ctx.bundle_dirs[step_id]
    if not folder:
        raise UserError(
            f"{ctx.step_id}: step {step_id!r} has no bundle folder (`bundle: false`, or its stage has no "
            f"default); give it one (`bundle: onnx/fp32`) to publish it"
        )
    return folder.strip("/")


def assemble_bundle(ctx: StageContext, dest: Path) -> BundleManifest:
    """Lay the inputs out in ``dest`` as the engine lays out a bundle (section folders, ``recipe.yaml``,
    ``build.lock.json``, ``manifest.json`` with files/sections/lock) and return the manifest.

    The engine writes the recipe's bundle only after every step, this one included, so the stage builds
    its own from its inputs; the lock holds the key data of the published steps.
    """
    from sdkiln.stages.engine.bundle import BundlePart, write_bundle_tree

    if not ctx.inputs:
        raise UserError(f"{ctx.step_id}: publish_hub needs at least one input (one of: {', '.join(INPUTS)})")
    parts: list[BundlePart] = []
    lock_steps: dict[str, Any] = {}
    for _role, inp in sorted(ctx.inputs.items()):
        folder = section_dir(ctx, inp.step_id)
        clash = next(
            (
                p
                for p in parts
                if p.folder == folder
                or folder.startswith(p.folder + "/")
                or p.folder.startswith(folder + "/")
            ),
            None,
        )
        if clash is not None:
            raise UserError(f"{ctx.step_id}: steps {clash.step!r} and {inp.step_id!r} both go to {folder!r}")
        m = inp.manifest
        parts.append(BundlePart(folder, inp.step_id, inp.path, m))
        lock_steps[inp.step_id] = {
            "stage": m.stage,
            "version": m.stage_version,
            "params": m.params,
            "inputs": {name: i.digest for name, i in m.inputs.items()},
            "env": m.env,
            "pins": m.pins,
            "key": m.key,
            "digest": m.digest,
        }
    lock = {"schema": SCHEMA_VERSION, "recipe": ctx.recipe.get("name", ""), "steps": lock_steps}
    return write_bundle_tree(
        dest,
        name=ctx.recipe.get("name", ctx.step_id),
        description=ctx.recipe.get("description", ""),
        recipe_raw=ctx.recipe,
        parts=parts,
        lock=lock,
        note="Published by its publish_hub step.",
    )


def run(ctx: StageContext) -> None:
    p: PublishHubParams = ctx.params
    bundle = ctx.work_dir / "bundle"
    bundle.mkdir(parents=True, exist_ok=True)
    manifest = assemble_bundle(ctx, bundle)
    with ctx.timed("publish_s"):
        result = publish_bundle(
            bundle,
            p.repo_id,
            endpoint=p.endpoint,
            token=None,
            private=p.private,
            create_pr=p.create_pr,
            tag=p.tag,
            dry_run=False,
            license=p.license,
        )
    record = {
        "repo_id": result.repo_id,
        "endpoint": result.endpoint,
        "commit": result.commit,
        "committed": result.committed,
        "tag": result.tag,
        "pr_url": result.pr_url,
        "url": result.url,
        "files": {f.path: {"sha256": f.sha256, "size": f.size} for f in result.files},
    }
    write_json_atomic(ctx.out_dir / "published.json", record)
    ctx.metrics.update(
        files=len(result.files),
        bytes=sum(f.size for f in result.files),
        uploaded_files=len(result.uploads),
        uploaded_bytes=sum(f.size for f in result.uploads),
        sections=len(manifest.sections),
    )
    ctx.details.update(repo_id=result.repo_id, commit=result.commit, tag=result.tag, endpoint=result.endpoint)
    ctx.log.info("%s: published %s@%s", ctx.step_id, result.repo_id, result.commit)


STAGE = Stage(
    name="publish_hub",
    version="1",
    inputs=INPUTS,
    optional_inputs=frozenset(INPUTS),
    output_kind=Kind.PUBLISHED,
    params=PublishHubParams,
    run=run,
    description="publish earlier steps' outputs to a Hugging Face Hub repo in the bundle layout, verified",
    env_packages=("huggingface_hub",),
    needs=frozenset({"network"}),
)
