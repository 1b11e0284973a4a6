"""The model card of a published bundle: what it is, how to run it (sdkiln, and the field's own runtimes:
``elsewhere``), its sections with per-component precision, size, bits per weight and parity, the upstream
models at their pinned commits with their licenses, tool versions and the recipe. Deterministic: the same manifest gives
the same bytes, so republishing an unchanged bundle changes nothing.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from sdkiln.runtime.contract.manifest import BundleManifest, Section
from sdkiln.stages.tools.publish import elsewhere

logger = logging.getLogger(__name__)

# -- the model card -----------------------------------------------------------------------------------
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_QUANTIZED_PRECISIONS = {
    "int8",
    "uint8",
    "int4",
    "uint4",
    "nf4",
    "fp8",
    "int6",
    "palettized",
    "w8a8",
    "w8a16",
}
_PARITY_WORDS = ("parity", "max_abs", "mean_abs", "sqnr", "psnr", "cosine", "snr")
_DTYPE_BITS_RE = re.compile(r"(?:fp|bf|float|int|uint|qint|qfloat)(\d{1,2})(?:_?e\dm\d)?")
# Which `sdkiln run --backend` runs which section kind, in the order the card suggests them.
_RUN_BACKENDS = (("onnx", "onnx"), ("pipeline", "torch"), ("coreml", "coreml"))


@dataclass(frozen=True)
class Upstream:
    """A Hub repo the bundle was built from, at the commit the build pinned."""

    repo: str
    sha: str
    role: str  # "base" (the pipeline), "lora", a component ("vae", "controlnet"...), or the pin's role


_PIN_RE = re.compile(r"^(?:hub:(?P<role>[^:]+):|repo:)(?P<repo>[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*)$")


def upstream_repos(manifest: BundleManifest) -> list[Upstream]:
    """Every upstream Hub repo with its pinned sha, the base pipeline first.

    Read from the pins (``hub:<role>:<repo>`` → sha or ``{"ref", "sha"}``) in the lock and the sections,
    and from ``{repo|repo_id, sha|commit|revision}`` records in the sections' model facts and details
    (``source`` is the base pipeline, ``loras`` its LoRAs, ``components`` replaced components).
    """
    found: dict[tuple[str, str], str] = {}

    def add(repo: str, sha: str, role: str) -> None:
        if found.get((repo, sha)) != "base":
            found[(repo, sha)] = role

    def pins(node: dict[str, Any]) -> None:
        for name, value in node.items():
            m = _PIN_RE.match(str(name))
            sha = value.get("sha") if isinstance(value, dict) else value
            if m and isinstance(sha, str) and _SHA_RE.match(sha):
                add(m["repo"], sha, m["role"] or "base")

    def walk(node: Any, role: str) -> None:
        if isinstance(node, dict):
            repo = node.get("repo_id") or node.get("repo")
            sha = next(
                (node[k] for k in ("sha", "commit", "revision") if _SHA_RE.match(str(node.get(k, "")))), None
            )
            if isinstance(repo, str) and "/" in repo and sha:
                add(repo, sha, role)
            for key, value in node.items():
                if key == "pins" and isinstance(value, dict):
                    pins(value)
                else:
                    walk(
                        value,
                        {"source": "base", "loras": "lora"}.get(
                            str(key), str(key) if role == "components" else role
                        ),
                    )
        elif isinstance(node, list):
            for value in node:
                walk(value, role)

    walk(manifest.lock, "other")
    for sec in manifest.sections.values():
        walk({"pins": sec.pins}, "other")
        walk(sec.model.model_dump(mode="json") if sec.model else {}, "other")
        walk(sec.details, "other")
    return sorted(
        (Upstream(r, s, role) for (r, s), role in found.items()), key=lambda u: (u.role != "base", u.repo)
    )


def recorded_license(manifest: BundleManifest) -> str | None:
    """A license the build recorded (``license`` in a section's ``model.source``), if exactly one."""
    found = {
        lic
        for sec in manifest.sections.values()
        if sec.model is not None and isinstance(lic := sec.model.source.get("license"), str) and lic
    }
    return found.pop() if len(found) == 1 else None


def upstream_licenses(api: Any, upstream: list[Upstream]) -> dict[str, str | None]:
    """Each upstream repo's license from its model card at the pinned commit (None: no card, no license,
    or the repo is not on this endpoint). A commit's card never changes, so the result is stable."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    out: dict[str, str | None] = {}
    for up in upstream:
        if up.repo in out:
            continue
        try:
            info = api.model_info(up.repo, revision=up.sha)
        except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as e:
            logger.warning("%s@%s: cannot read its license (%s)", up.repo, up.sha[:12], type(e).__name__)
            out[up.repo] = None
            continue
        card = info.card_data.to_dict() if info.card_data is not None else {}
        lic = card.get("license")
        out[up.repo] = lic if isinstance(lic, str) and lic else None
    return out


def _is_quantized(section: Section) -> bool:
    """Whether any component of the section holds fewer than 16 bits per weight, read from what its
    stage recorded about the files (component precision), never from what the recipe asked for."""
    if section.kind == "torch_quantized":
        return True
    for comp in section.components.values():
        prec = str(comp.precision).lower()
        if prec in _QUANTIZED_PRECISIONS or prec.endswith("bit"):
            return True
    return False


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: node}


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v).replace("|", "\\|")


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 10_000 else f"{n} B"


def _tags(manifest: BundleManifest) -> list[str]:
    tags = {"sdkiln", "stable-diffusion", "text-to-image"}
    for name, sec in manifest.sections.items():
        kind = sec.kind
        tags.add(
            {
                "pipeline": "diffusers",
                "torch_quantized": "optimum-quanto",
                "tensorrt": "tensorrt",
                "tensorrt_engine": "tensorrt",
                "onnx": "onnx",
                "coreml": "coreml",
                "openvino": "openvino",
            }.get(kind, kind)
        )
        if name.startswith("coreml/"):
            tags.add("core-ml")
        facts = sec.model
        if facts is not None:
            tags.add(
                {"sdxl": "stable-diffusion-xl", "ssd-1b": "stable-diffusion-xl"}.get(
                    facts.family, facts.family
                )
            )
            if facts.lcm:
                tags.update({"lcm", "latent-consistency"})
            for cn in facts.controlnets:
                tags.update({"controlnet", f"controlnet-{cn}"})
            if facts.taesd:
                tags.add("taesd")
        if _is_quantized(sec):
            tags.add("quantized")
    tags.discard("")
    return sorted(tags)


def _component_rows(section: str, sec: Section, files: dict[str, Any]) -> list[str]:
    metrics = _flat(sec.metrics)
    rows = []
    for comp, spec in sorted(sec.components.items()):
        path = spec.path or comp
        full = f"{section}/{path}"
        # A component is its file's folder (model.onnx + model.onnx_data + config.json) or its package folder.
        folder = full.rsplit("/", 1)[0] + "/" if full in files else full.rstrip("/") + "/"
        size = sum(m.size for rel, m in files.items() if rel.startswith(folder) or rel == full)
        # Metric names hold the component as dotted segments: parity.unet.max_abs, controlnet.canny.sqnr_db.
        keys = [k for k in metrics if f".{comp}." in f".{k}."]
        bits = [
            f"{_fmt(metrics[k])}" for k in keys if "bits" in k.lower() and isinstance(metrics[k], int | float)
        ]
        precision = spec.precision
        if not bits and (m := _DTYPE_BITS_RE.fullmatch(str(precision).lower())):
            bits = [f"{m.group(1)}*"]  # from the dtype: the stage recorded no bits-per-weight metric
        parity = [
            # The metric's name without the component: parity.max_abs, sqnr_db, lora_effect.max_abs.
            f"{f'.{k}.'.replace(f'.{comp}.', '.', 1).strip('.')}={_fmt(metrics[k])}"
            for k in keys
            if any(w in k.lower() for w in _PARITY_WORDS) and isinstance(metrics[k], int | float)
        ]
        rows.append(
            f"| {comp} | `{path}` | {precision} | {_mb(size)} | {', '.join(bits) or '—'} | {', '.join(parity) or '—'} |"
        )
    return rows


def render_model_card(
    manifest: BundleManifest,
    repo_id: str,
    recipe_text: str | None = None,
    license: str | None = None,
    upstream_license: dict[str, str | None] | None = None,
) -> str:
    """The README.md of a published bundle: ModelCardData front matter plus how to run it, the sections,
    per-component sizes/bits per weight/parity, all metrics, upstream repos and the recipe.

    ``license``: the card's license (else the one the build recorded, else the base model's from
    ``upstream_license``, {repo: license} as :func:`upstream_licenses` reads them from the Hub).
    Deterministic: the same inputs give the same bytes, so republishing an unchanged bundle is a no-op.
    """
    import yaml
    from huggingface_hub import ModelCard, ModelCardData

    sections = manifest.sections
    files = manifest.files
    upstream = upstream_repos(manifest)
    upstream_license = upstream_license or {}
    base = next((u for u in upstream if u.role == "base"), upstream[0] if upstream else None)
    card_license = (
        license or recorded_license(manifest) or (upstream_license.get(base.repo) if base else None)
    )
    quantized = any(_is_quantized(s) for s in sections.values())
    repos = list(dict.fromkeys(u.repo for u in upstream))
    relation = "quantized" if quantized and upstream else ("merge" if len(repos) > 1 else None)
    extra_meta: dict[str, Any] = {}
    if relation:
        extra_meta["base_model_relation"] = relation
    data = ModelCardData(
        library_name="sdkiln",
        pipeline_tag="text-to-image",
        base_model=repos or None,
        license=card_license,
        tags=_tags(manifest),
        **extra_meta,
    )
    backend = next((b for k, b in _RUN_BACKENDS if any(s.kind == k for s in sections.values())), "onnx")
    name = manifest.name or repo_id.split("/")[-1]
    recipe = manifest.recipe
    lines = [f"# {name}", ""]
    if isinstance(recipe, dict) and recipe.get("description"):
        lines += [str(recipe["description"]).strip(), ""]
    lines += [
        f"A Stable Diffusion bundle built by sdkiln from the recipe `{name}`: "
        f"{', '.join(f'`{s}`' for s in sorted(sections)) or 'no sections'}. `manifest.json` lists the sha256 and "
        "size of every file and the provenance (recipe, lock, tool versions).",
        "",
        "## Run it",
        "",
        "```bash",
        'pip install "sdkiln[runtime]"',
        f"sdkiln run sketch --model {repo_id}@main --backend {backend} --image sketch.png "
        '--prompt "a cabin in the woods" --out out.png',
        "```",
        "",
        "```python",
        "from sdkiln.runtime import load",
        "",
        f'pipe = load("{repo_id}@main", backend="{backend}")',
        'image = pipe.sketch("sketch.png", "a cabin in the woods", seed=0)',
        "```",
        "",
        "Replace `main` with a tag or a commit sha to pin what you run. The runtime downloads only the files "
        "its backend needs and checks each one's sha256 against `manifest.json` before loading it.",
        "",
    ]
    # diffusers / optimum (ONNX) and Apple's Swift package (Core ML): tools/publish/elsewhere.py.
    lines += elsewhere.render(manifest, repo_id)
    if card_license:
        why = (
            "as given"
            if license
            else ("recorded by the build" if recorded_license(manifest) else "the base model's")
        )
        lines += [f"License: `{card_license}` ({why}).", ""]
    else:
        lines += ["License: unknown (neither recorded by the build nor found on the base model's card).", ""]
    if upstream:
        lines += [
            "## Upstream models",
            "",
            "| Repo | Role | Pinned revision | License |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| [{u.repo}](/{u.repo}) | {u.role} | `{u.sha}` | {upstream_license.get(u.repo) or 'unknown'} |"
            for u in upstream
        ]
        lines.append("")
    lines += [
        "## Sections",
        "",
        "| Folder | Kind | Step | Stage | Files | Size |",
        "|---|---|---|---|---|---|",
    ]
    for sname, sec in sorted(sections.items()):
        in_sec = [m for rel, m in files.items() if rel.startswith(sname.rstrip("/") + "/")]
        lines.append(
            f"| `{sname}` | {sec.kind} | {sec.step} | {sec.stage} | "
            f"{len(in_sec)} | {_mb(sum(m.size for m in in_sec))} |"
        )
    lines.append("")
    for sname, sec in sorted(sections.items()):
        rows = _component_rows(sname, sec, files)
        metrics = {k: v for k, v in _flat(sec.metrics).items() if isinstance(v, int | float)}
        if not rows and not metrics:
            continue
        lines += [f"### `{sname}`", ""]
        if rows:
            lines += [
                "| Component | Path | Precision | Size | Bits per weight | Parity |",
                "|---|---|---|---|---|---|",
            ]
            lines += rows + [""]
            if any("* |" in r for r in rows):
                lines += [
                    "\\* from the component's dtype (the stage recorded no bits-per-weight metric).",
                    "",
                ]
        if metrics:
            lines += ["| Metric | Value |", "|---|---|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in sorted(metrics.items())] + [""]
    env: dict[str, set[str]] = {}
    for k, v in _flat(manifest.environment).items():
        env.setdefault(k, set()).add(str(v))
    for sec in sections.values():  # package versions each step ran with (the engine's per-step "env")
        for k, v in sec.env.items():
            env.setdefault(k, set()).add(str(v))
    env = {k: v for k, v in env.items() if v != {"None"}}
    if env:
        lines += ["## Tool versions", "", "| Tool | Version |", "|---|---|"]
        lines += [f"| {k} | {_fmt(' / '.join(sorted(v)))} |" for k, v in sorted(env.items())] + [""]
    if recipe_text is None and recipe:
        recipe_text = yaml.safe_dump(recipe, sort_keys=False)
    if recipe_text:
        lines += ["## Recipe", "", "```yaml", recipe_text.rstrip(), "```", ""]
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)
    return str(ModelCard(content))
