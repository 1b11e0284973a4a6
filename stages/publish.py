"""Publish a bundle to the Hugging Face Hub as one verified commit, with a generated model card.

    sdkiln publish artifacts/tiny --repo-id me/sdkiln-tiny --tag v1 [--dry-run]

What happens, in order:
1. the bundle is checked against its ``manifest.json`` (every file's sha256 and size; no stray files);
2. ``README.md`` is rendered from the manifest (huggingface_hub ``ModelCard``/``ModelCardData``);
3. ``create_repo(exist_ok=True)``, then the branch head and its tree are read and diffed with the bundle;
4. if anything differs, ONE ``create_commit`` with exactly the changed files (and deletions of files the
   bundle no longer has), ``parent_commit`` = the head just read: a concurrent publish makes the Hub
   refuse the commit (a clear PublishConflictError) instead of interleaving two bundles;
5. the new commit's tree is read back and every file's size and hash compared with the manifest;
6. only then the tag is created (an existing tag is never moved).

An unchanged bundle makes no commit (the tag is still ensured). ``dry_run`` reads the repo (nothing is
written) and reports what each file would do. The token comes from huggingface_hub's usual sources
(``HF_TOKEN``, ``hf auth login``) unless given, and is never logged. The endpoint is ``endpoint=``, else
``$HF_ENDPOINT``, else huggingface.co. Against a server without Xet storage set ``HF_HUB_DISABLE_XET=1``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdkiln.runtime.hub import git_blob_oid, hub_errors, resolve_endpoint
from sdkiln.stages.core import BuildError, UserError, VerifyError
from sdkiln.stages.manifest import MANIFEST, read_manifest, verify_tree

logger = logging.getLogger(__name__)

README = "README.md"
# Files a bundle folder may hold besides its manifest's table (written by the engine next to it).
BUNDLE_METADATA = ("recipe.yaml", "build.lock.json")
# Files of a Hub repo that are the Hub's, not the bundle's: never deleted, never compared.
HUB_FILES = frozenset({".gitattributes"})
REPO_ID_PATTERN = r"^[A-Za-z0-9][\w.\-]{0,95}/[A-Za-z0-9][\w.\-]{0,95}$"
TAG_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$"
BRANCH = "main"


class PublishConflictError(BuildError):
    """The branch moved between reading its head and committing (another publish won). Exit code 1."""


class PublishVerifyError(VerifyError):
    """The commit on the Hub does not hold exactly the bundle's files. Exit code 1; no tag was made."""


@dataclass(frozen=True)
class PlannedFile:
    """One file of the published bundle and what publishing does with it."""

    path: str
    size: int
    sha256: str
    action: str  # "add" (new in the repo), "update" (differs), "unchanged"
    source: Path | None = None  # the local file, or None for generated content (the model card)
    content: bytes | None = None

    def git_oid(self) -> str:
        if self.content is not None:
            return hashlib.sha1(b"blob %d\0" % len(self.content) + self.content).hexdigest()
        assert self.source is not None
        return git_blob_oid(self.source)


@dataclass(frozen=True)
class PublishResult:
    """What a publish did (or, with ``dry_run``, would do)."""

    repo_id: str
    endpoint: str
    branch: str
    commit: str | None  # the commit holding the bundle (the head before, for a dry run; None: no repo yet)
    committed: bool  # a new commit was made
    files: tuple[PlannedFile, ...]
    deletions: tuple[str, ...]
    tag: str | None
    tag_created: bool
    pr_url: str | None
    dry_run: bool

    @property
    def url(self) -> str:
        return f"{self.endpoint}/{self.repo_id}"

    @property
    def uploads(self) -> tuple[PlannedFile, ...]:
        return tuple(f for f in self.files if f.action != "unchanged")

    @property
    def changed(self) -> bool:
        return bool(self.uploads or self.deletions)


# -- the bundle ---------------------------------------------------------------------------------------
def load_bundle(bundle: Path) -> dict[str, Any]:
    """Read the bundle's manifest and check every file against it; all problems are reported at once."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise UserError(f"{bundle}: no such bundle folder (build one with `sdkiln build RECIPE`)")
    manifest = read_manifest(bundle)
    report = verify_tree(bundle, manifest)
    extra = [p for p in report.extra if p not in BUNDLE_METADATA]
    problems = (
        [f"missing: {p}" for p in report.missing]
        + [f"changed: {p}" for p in report.changed]
        + [f"extra:   {p} (not in manifest.json)" for p in extra]
    )
    if problems:
        raise VerifyError(
            f"{bundle}: the bundle does not match its manifest.json; refusing to publish it:\n"
            + "\n".join(f"  {p}" for p in problems)
        )
    return manifest


def plan_files(bundle: Path, manifest: dict[str, Any], card: str) -> list[PlannedFile]:
    """Every file of the repo-to-be, sorted: the manifest's table, the manifest, metadata and the card."""
    files: dict[str, PlannedFile] = {}
    for rel, meta in manifest["files"].items():
        files[rel] = PlannedFile(rel, int(meta["size"]), meta["sha256"], "add", source=bundle / rel)
    for rel in (MANIFEST, *BUNDLE_METADATA):
        if rel not in files and (bundle / rel).is_file():
            data = (bundle / rel).read_bytes()
            files[rel] = PlannedFile(
                rel, len(data), hashlib.sha256(data).hexdigest(), "add", source=bundle / rel
            )
    if README not in files:  # a README the engine listed in the manifest wins over the generated card
        data = card.encode()
        files[README] = PlannedFile(README, len(data), hashlib.sha256(data).hexdigest(), "add", content=data)
    return [files[k] for k in sorted(files)]


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


def upstream_repos(manifest: dict[str, Any]) -> list[Upstream]:
    """Every upstream Hub repo with its pinned sha, the base pipeline first.

    Read from the pins (``hub:<role>:<repo>`` → sha or ``{"ref", "sha"}``) in the lock and the sections,
    and from ``{repo|repo_id, sha|commit|revision}`` records in the sections' extra (``source`` is the
    base pipeline, ``loras`` its LoRAs, ``components`` replaced components).
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

    walk(manifest.get("lock") or {}, "other")
    for sec in (manifest.get("sections") or {}).values():
        walk({"pins": sec.get("pins") or {}}, "other")
        walk(sec.get("extra") or {}, "other")
    return sorted(
        (Upstream(r, s, role) for (r, s), role in found.items()), key=lambda u: (u.role != "base", u.repo)
    )


def recorded_license(manifest: dict[str, Any]) -> str | None:
    """A license the build recorded (``license`` in a section's ``extra.source``), if exactly one."""
    found = {
        lic
        for sec in (manifest.get("sections") or {}).values()
        if isinstance(lic := ((sec.get("extra") or {}).get("source") or {}).get("license"), str) and lic
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


def _is_quantized(section: dict[str, Any]) -> bool:
    if section.get("kind") == "torch_quantized":
        return True
    params = section.get("params") or {}
    extra = section.get("extra") or {}
    for source in (params, extra):
        for key in ("precision", "scheme", "weights", "dtype"):
            if str(source.get(key, "")).lower() in _QUANTIZED_PRECISIONS:
                return True
        nbits = source.get("nbits") or source.get("bits")
        if isinstance(nbits, int) and nbits < 16:
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


def _tags(manifest: dict[str, Any]) -> list[str]:
    tags = {"sdkiln", "stable-diffusion", "text-to-image"}
    for name, sec in (manifest.get("sections") or {}).items():
        kind = sec.get("kind", "")
        tags.add(
            {
                "pipeline": "diffusers",
                "torch_quantized": "optimum-quanto",
                "tensorrt": "tensorrt",
                "onnx": "onnx",
                "coreml": "coreml",
            }.get(kind, kind)
        )
        if name.startswith("coreml/"):
            tags.add("core-ml")
        extra = sec.get("extra") or {}
        family = extra.get("family")
        if isinstance(family, str):
            tags.add({"sdxl": "stable-diffusion-xl", "ssd-1b": "stable-diffusion-xl"}.get(family, family))
        if extra.get("lcm"):
            tags.update({"lcm", "latent-consistency"})
        for cn in extra.get("controlnets") or []:
            tags.update({"controlnet", f"controlnet-{cn}"})
        if extra.get("taesd"):
            tags.add("taesd")
        if _is_quantized(sec):
            tags.add("quantized")
    tags.discard("")
    return sorted(tags)


def _component_rows(section: str, sec: dict[str, Any], files: dict[str, dict[str, Any]]) -> list[str]:
    metrics = _flat(sec.get("metrics") or {})
    rows = []
    for comp, spec in sorted((sec.get("components") or {}).items()):
        path = str(spec.get("path", comp)) if isinstance(spec, dict) else comp
        full = f"{section}/{path}"
        # A component is its file's folder (model.onnx + model.onnx_data + config.json) or its package folder.
        folder = full.rsplit("/", 1)[0] + "/" if full in files else full.rstrip("/") + "/"
        size = sum(int(m["size"]) for rel, m in files.items() if rel.startswith(folder) or rel == full)
        # Metric names hold the component as dotted segments: parity.unet.max_abs, controlnet.canny.sqnr_db.
        keys = [k for k in metrics if f".{comp}." in f".{k}."]
        bits = [
            f"{_fmt(metrics[k])}" for k in keys if "bits" in k.lower() and isinstance(metrics[k], int | float)
        ]
        precision = spec.get("precision", "") if isinstance(spec, dict) else ""
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
    manifest: dict[str, Any],
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

    sections: dict[str, Any] = manifest.get("sections") or {}
    files: dict[str, dict[str, Any]] = manifest["files"]
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
    backend = next(
        (b for k, b in _RUN_BACKENDS if any(s.get("kind") == k for s in sections.values())), "onnx"
    )
    name = manifest.get("name") or repo_id.split("/")[-1]
    recipe = manifest.get("recipe") or {}
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
            f"| `{sname}` | {sec.get('kind', '')} | {sec.get('step', '')} | {sec.get('stage', '')} | "
            f"{len(in_sec)} | {_mb(sum(int(m['size']) for m in in_sec))} |"
        )
    lines.append("")
    for sname, sec in sorted(sections.items()):
        rows = _component_rows(sname, sec, files)
        metrics = {k: v for k, v in _flat(sec.get("metrics") or {}).items() if isinstance(v, int | float)}
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
    for k, v in _flat(manifest.get("environment") or {}).items():
        env.setdefault(k, set()).add(str(v))
    for sec in sections.values():  # package versions each step ran with (the engine's per-step "env")
        for k, v in (sec.get("env") or {}).items():
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


# -- the Hub ------------------------------------------------------------------------------------------
def _diff(planned: list[PlannedFile], remote: dict[str, Any]) -> tuple[list[PlannedFile], list[str]]:
    """Mark each file add/update/unchanged against the remote tree; list remote files to delete."""
    out = []
    for f in planned:
        r = remote.get(f.path)
        if r is None:
            action = "add"
        elif _same(f, r):
            action = "unchanged"
        else:
            action = "update"
        out.append(PlannedFile(f.path, f.size, f.sha256, action, f.source, f.content))
    names = {f.path for f in planned}
    deletions = sorted(p for p in remote if p not in names and p not in HUB_FILES)
    return out, deletions


def _same(f: PlannedFile, remote: Any) -> bool:
    if remote.size != f.size:
        return False
    if remote.lfs is not None:
        return remote.lfs.sha256 == f.sha256
    return remote.blob_id == f.git_oid()


def _verify_remote(planned: list[PlannedFile], remote: dict[str, Any], repo_id: str, commit: str) -> None:
    problems = []
    for f in planned:
        r = remote.get(f.path)
        if r is None:
            problems.append(f"missing: {f.path}")
        elif not _same(f, r):
            problems.append(f"differs: {f.path} ({r.size} bytes on the Hub, {f.size} in the bundle)")
    names = {f.path for f in planned}
    problems += [f"extra:   {p}" for p in sorted(remote) if p not in names and p not in HUB_FILES]
    if problems:
        raise PublishVerifyError(
            f"{repo_id}@{commit}: the commit does not hold exactly the bundle (no tag was created):\n"
            + "\n".join(f"  {p}" for p in problems)
        )


@contextlib.contextmanager
def _commit_errors(repo_id: str, head: str) -> Iterator[None]:
    from huggingface_hub.errors import HfHubHTTPError

    try:
        yield
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (409, 412):
            raise PublishConflictError(
                f"{repo_id}: the branch '{BRANCH}' moved while publishing (it was at {head[:12]} when this publish "
                "started; someone else committed). Nothing was committed; run the publish again to update it."
            ) from None
        raise
    except RuntimeError as e:
        # huggingface_hub wraps a failed LFS upload ("Error while uploading 'x' to the Hub.") around its cause.
        if e.__cause__ is None:
            raise
        raise BuildError(
            f"{repo_id}: {e} ({type(e.__cause__).__name__}: {e.__cause__}); nothing was committed"
        ) from e


def publish_bundle(
    bundle: Path,
    repo_id: str,
    *,
    endpoint: str | None = None,
    token: str | bool | None = None,
    private: bool = False,
    create_pr: bool = False,
    tag: str | None = None,
    dry_run: bool = False,
    license: str | None = None,
) -> PublishResult:
    """Publish the bundle folder ``bundle`` to the model repo ``repo_id`` (see the module docstring).

    Raises UserError (bad arguments, not authorized, a tag that exists elsewhere: exit 2), VerifyError
    (the bundle or the resulting commit does not match the manifest) or PublishConflictError.
    """
    bundle = Path(bundle)
    if not re.match(REPO_ID_PATTERN, repo_id):
        raise UserError(f"--repo-id {repo_id!r}: expected 'owner/name' (letters, digits, '-', '_', '.')")
    if tag is not None and not re.match(TAG_PATTERN, tag):
        raise UserError(f"--tag {tag!r}: use letters, digits, '.', '_' and '-' (e.g. v1 or 2026.01)")
    if tag is not None and create_pr:
        raise UserError("--tag with --create-pr: a pull request is not merged yet; tag after merging it")
    endpoint = resolve_endpoint(endpoint)
    manifest = load_bundle(bundle)

    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    api = HfApi(endpoint=endpoint, token=token, library_name="sdkiln")
    with hub_errors(repo_id, BRANCH, endpoint):
        upstream = upstream_repos(manifest)
        licenses = upstream_licenses(api, upstream) if upstream and not license else {}
    recipe_path = bundle / "recipe.yaml"
    recipe_text = recipe_path.read_text() if recipe_path.is_file() else None
    card = render_model_card(manifest, repo_id, recipe_text, license, licenses)
    planned = plan_files(bundle, manifest, card)
    total = sum(f.size for f in planned)
    logger.info(
        "publishing %s (%d files, %.1f MB) to %s/%s", bundle, len(planned), total / 1e6, endpoint, repo_id
    )
    with hub_errors(repo_id, BRANCH, endpoint):
        if dry_run:
            try:
                head = api.model_info(repo_id, revision=BRANCH).sha
            except RepositoryNotFoundError:
                files, _ = _diff(planned, {})
                return PublishResult(
                    repo_id, endpoint, BRANCH, None, False, tuple(files), (), tag, tag is not None, None, True
                )
        else:
            api.create_repo(repo_id, private=private, exist_ok=True)
            head = api.model_info(repo_id, revision=BRANCH).sha
        remote = _tree(api, repo_id, head)
        files, deletions = _diff(planned, remote)
        tag_at = _existing_tag(api, repo_id, tag) if tag else None
        if tag_at is not None:
            tagged = remote if tag_at == head else _tree(api, repo_id, tag_at)
            tagged_files, tagged_del = _diff(planned, tagged)
            if any(f.action != "unchanged" for f in tagged_files) or tagged_del:
                raise UserError(
                    f"{repo_id}: tag {tag!r} already exists at {tag_at[:12]} with other content; tags are never "
                    "moved. Choose a new tag."
                )
        if dry_run:
            return PublishResult(
                repo_id,
                endpoint,
                BRANCH,
                head,
                False,
                tuple(files),
                tuple(deletions),
                tag,
                tag is not None and tag_at is None,
                None,
                True,
            )

        commit, pr_url = head, None
        changed = [f for f in files if f.action != "unchanged"]
        if changed or deletions:
            ops: list[Any] = []
            for f in changed:
                op = CommitOperationAdd(
                    path_in_repo=f.path, path_or_fileobj=f.content if f.content is not None else str(f.source)
                )
                # The bundle check just hashed every file: spare huggingface_hub a second full read.
                op.upload_info.sha256 = bytes.fromhex(f.sha256)
                ops.append(op)
            ops += [CommitOperationDelete(path_in_repo=p) for p in deletions]
            n_add = sum(f.action == "add" for f in changed)
            message = f"sdkiln: publish {manifest.get('name') or bundle.name}"
            description = (
                f"{n_add} added, {len(changed) - n_add} updated, {len(deletions)} deleted; "
                f"{len(planned)} files, {total} bytes. manifest.json sha256 "
                f"{next(f.sha256 for f in planned if f.path == MANIFEST)}."
            )
            with _commit_errors(repo_id, head):
                info = api.create_commit(
                    repo_id,
                    ops,
                    commit_message=message,
                    commit_description=description,
                    revision=BRANCH,
                    parent_commit=head,
                    create_pr=create_pr,
                )
            commit, pr_url = info.oid, info.pr_url
            logger.info(
                "committed %s to %s (%d changed, %d deleted)",
                commit[:12],
                repo_id,
                len(changed),
                len(deletions),
            )
            remote = _tree(api, repo_id, commit)
        _verify_remote(planned, remote, repo_id, commit)

        tag_created = False
        if tag and tag_at is None:
            api.create_tag(
                repo_id, tag=tag, revision=commit, tag_message=f"sdkiln bundle {manifest.get('name', '')}"
            )
            tag_created = True
    return PublishResult(
        repo_id,
        endpoint,
        BRANCH,
        commit,
        commit != head,
        tuple(files),
        tuple(deletions),
        tag,
        tag_created,
        pr_url,
        False,
    )


def _tree(api: Any, repo_id: str, revision: str) -> dict[str, Any]:
    from huggingface_hub.hf_api import RepoFile

    return {
        f.path: f
        for f in api.list_repo_tree(repo_id, recursive=True, revision=revision)
        if isinstance(f, RepoFile)
    }


def _existing_tag(api: Any, repo_id: str, tag: str) -> str | None:
    refs = api.list_repo_refs(repo_id)
    return next((t.target_commit for t in refs.tags if t.name == tag), None)


# -- CLI glue (wired into stages/cli.py by the lead) -------------------------------------------------
def add_publish_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``sdkiln publish`` to an argparse subparsers object; sets ``func=publish_command``."""
    p = subparsers.add_parser(
        "publish",
        help="publish a built bundle to the Hugging Face Hub (one verified commit, then the tag)",
        description=(
            "Upload BUNDLE (artifacts/<name>) to a Hub model repo as one commit based on the branch head, "
            "verify the commit against manifest.json, then create --tag. An unchanged bundle makes no commit. "
            "The token comes from HF_TOKEN or `hf auth login`."
        ),
    )
    p.add_argument("bundle", type=Path, help="the bundle folder, e.g. artifacts/tiny")
    p.add_argument("--repo-id", required=True, help="owner/name of the model repo (created if missing)")
    p.add_argument(
        "--endpoint",
        default=None,
        help="Hub URL (default: $HF_ENDPOINT, else https://huggingface.co); for a server without Xet storage "
        "set HF_HUB_DISABLE_XET=1",
    )
    p.add_argument("--private", action="store_true", help="create the repo private (ignored if it exists)")
    p.add_argument(
        "--create-pr", action="store_true", help="open a pull request instead of committing to main"
    )
    p.add_argument("--tag", default=None, help="tag the verified commit (never moves an existing tag)")
    p.add_argument(
        "--license", default=None, help="license id for the model card when the build recorded none"
    )
    p.add_argument("--dry-run", action="store_true", help="read the repo and print what would be uploaded")
    p.set_defaults(func=publish_command)
    return p


def format_result(result: PublishResult) -> str:
    """Human-readable report: one line per file that changes, then what happened."""
    lines = []
    for f in result.files:
        if f.action != "unchanged":
            lines.append(f"  {f.action:<9} {f.path}  ({f.size} bytes)")
    lines += [f"  delete    {p}" for p in result.deletions]
    unchanged = sum(f.action == "unchanged" for f in result.files)
    up_bytes = sum(f.size for f in result.uploads)
    if result.dry_run:
        head = (
            f"[dry run] {result.url}: {len(result.uploads)} file(s) to upload ({up_bytes} bytes), "
            f"{len(result.deletions)} to delete, {unchanged} unchanged"
        )
    else:
        head = (
            f"{result.url}: {len(result.uploads)} file(s) uploaded ({up_bytes} bytes), "
            f"{len(result.deletions)} deleted, {unchanged} unchanged"
        )
    out = [head, *lines]
    if result.dry_run:
        if result.tag:
            out.append(f"would {'create' if result.tag_created else 'keep'} tag {result.tag}")
        if result.commit is None:
            out.append("the repo does not exist yet; it would be created")
    else:
        out.append(
            f"committed {result.commit}"
            if result.committed
            else f"no commit needed: the repo is at {result.commit}"
        )
        if result.pr_url:
            out.append(f"pull request: {result.pr_url}")
        if result.tag:
            out.append(
                f"tag {result.tag} created at {result.commit}"
                if result.tag_created
                else f"tag {result.tag} already exists with this content"
            )
    return "\n".join(out)


def publish_command(args: argparse.Namespace) -> int:
    """``sdkiln publish``: call the library, print the report. Errors propagate as SdkilnError."""
    # httpx2 logs every request URL at INFO; LFS upload URLs carry pre-signed credentials.
    logging.getLogger("httpx2").setLevel(max(logging.WARNING, logging.getLogger("httpx2").level))
    result = publish_bundle(
        args.bundle,
        args.repo_id,
        endpoint=args.endpoint,
        token=None,
        private=args.private,
        create_pr=args.create_pr,
        tag=args.tag,
        dry_run=args.dry_run,
        license=args.license,
    )
    print(format_result(result))
    return 0
