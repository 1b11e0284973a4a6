"""The Hugging Face Hub side of loading: pin a revision, download only the files needed, refuse pickles.

- ``resolve_revision(repo, revision)``: branch/tag -> commit sha (network; falls back to the local cache's
  ref when offline; a clear UserError naming the repo when neither works).
- ``download(repo, sha, files)``: exactly those files, from that commit, into the HF cache.
- ``select_files``: which files of a repo a diffusers pipeline or model needs (safetensors, the
  requested variant per model folder with a fallback to its default weights, sharded indexes), refusing
  pickle checkpoints unless allowed; ``fetch``: select, read the indexes, download only those files.

The endpoint is ``HF_ENDPOINT`` read at call time (huggingface_hub reads it once, at import), so a
mirror or private hub set in the environment is always honoured; ``endpoint=`` overrides it.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sdkiln.runtime.contract.errors import UserError

logger = logging.getLogger(__name__)

SHA_RE = re.compile(r"^[0-9a-f]{40}$")
# owner/name of a Hub repo, as recipes write it
REPO_PATTERN = r"^[A-Za-z0-9][\w.-]*/[\w.-]+$"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
PICKLE_RISK = (
    "pickle checkpoints can run arbitrary code when loaded; use a safetensors copy of the weights, or "
    "set `allow_pickle: true` in the recipe only for a source you trust"
)
CONFIG_FILES = ("model_index.json", "config.json", "scheduler_config.json")


def endpoint(explicit: str | None = None) -> str | None:
    """The Hub endpoint to use: ``explicit``, else ``HF_ENDPOINT`` now, else the library default."""
    return explicit or os.environ.get("HF_ENDPOINT") or None


def _offline_error(repo: str, revision: str, err: Exception) -> UserError:
    return UserError(
        f"cannot reach the Hugging Face Hub for repo {repo!r} (revision {revision!r}) and it is not in the "
        f"local cache: {type(err).__name__}: {_short(err)}. Connect to the network (or set HF_ENDPOINT to "
        f"a reachable mirror), or download it first with `hf download {repo} --revision {revision}`."
    )


def _short(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else ""


def _cached_ref(repo: str, revision: str, repo_type: str = "model") -> str | None:
    """The commit a branch/tag pointed to when the local HF cache last saw it."""
    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE) / f"{repo_type}s--{repo.replace('/', '--')}" / "refs" / revision
    if folder.is_file():
        sha = folder.read_text().strip()
        if SHA_RE.match(sha):
            return sha
    return None


def resolve_revision(repo: str, revision: str = "main", endpoint_url: str | None = None) -> str:
    """The commit sha a Hub revision (branch, tag or sha) points to now.

    Offline, the sha the local cache recorded for that revision is used (with a warning); with neither
    network nor cache, a UserError names the repo. A missing repo or revision is a UserError too.
    """
    if SHA_RE.match(revision):
        return revision
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi(endpoint=endpoint(endpoint_url)).model_info(repo, revision=revision)
    except RevisionNotFoundError as e:
        raise UserError(f"repo {repo!r} has no revision {revision!r}") from e
    except RepositoryNotFoundError as e:
        raise UserError(
            f"repo {repo!r} not found on the Hub (or it is private: log in with `hf auth login`)"
        ) from e
    except Exception as e:  # network down, DNS, offline mode, HTTP 5xx: try the cache before giving up
        sha = _cached_ref(repo, revision)
        if sha:
            logger.warning("Hub unreachable (%s); using cached %s@%s = %s", _short(e), repo, revision, sha)
            return sha
        raise _offline_error(repo, revision, e) from e
    if not info.sha:
        raise UserError(f"the Hub returned no commit for {repo}@{revision}")
    return info.sha


def list_files(repo: str, sha: str, endpoint_url: str | None = None) -> list[str]:
    """All file paths of a repo at a commit (network, else the cached snapshot's files)."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        # model_info fails at once when the Hub is unreachable; the tree listing (list_repo_files) and
        # the file downloads retry with backoff for ~25 s first. Downloads only start after this.
        info = HfApi(endpoint=endpoint(endpoint_url)).model_info(repo, revision=sha)
        return sorted(s.rfilename for s in info.siblings or [])
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise UserError(f"repo {repo!r} at {sha} not found on the Hub: {_short(e)}") from e
    except Exception as e:
        snap = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "snapshots" / sha
        if snap.is_dir():
            return sorted(str(p.relative_to(snap)) for p in snap.rglob("*") if p.is_file())
        raise _offline_error(repo, sha, e) from e


def download(repo: str, sha: str, files: Iterable[str], endpoint_url: str | None = None) -> Path:
    """Download exactly ``files`` of ``repo`` at commit ``sha``; returns the snapshot folder."""
    from huggingface_hub import snapshot_download

    files = sorted(set(files))
    try:
        path = snapshot_download(repo, revision=sha, allow_patterns=files, endpoint=endpoint(endpoint_url))
    except Exception as e:
        raise _offline_error(repo, sha, e) from e
    missing = [f for f in files if not (Path(path) / f).is_file()]
    if missing:
        raise UserError(f"{repo}@{sha}: files missing after download: {missing}")
    return Path(path)


def is_pickle(path: str | Path) -> bool:
    """Whether a file name is a pickle-based checkpoint format."""
    return str(path).lower().endswith(PICKLE_SUFFIXES)


def refuse_pickles(folder: Path, allow_pickle: bool, what: str) -> None:
    """Refuse a folder whose weights are pickle-only (no safetensors beside them) unless allowed."""
    folder = Path(folder)
    if allow_pickle or not folder.exists():
        return
    files = [p for p in folder.rglob("*") if p.is_file()]
    pickles = [p for p in files if is_pickle(p)]
    bad = [p for p in pickles if not any(q.suffix == ".safetensors" for q in p.parent.iterdir())]
    if bad:
        names = ", ".join(str(p.relative_to(folder)) for p in bad[:5])
        raise UserError(f"{what}: refusing pickle checkpoint(s) {names}: {PICKLE_RISK}")


# Weight file names diffusers and transformers load: ``<stem>[.<variant>][-00001-of-00002].<ext>`` and
# sharded indexes ``<stem>.<ext>.index[.<variant>].json`` (older diffusers: ``<stem>.<variant>.<ext>.index.json``).
# Repos also carry other checkpoints (``v1-5-pruned.safetensors``, ``sdxl_vae.safetensors``,
# ``taesd_decoder.safetensors``, ``openvino_model.bin``): their stems are not these, so they are never taken.
WEIGHT_STEMS = ("diffusion_pytorch_model", "pytorch_model", "model")
_STEM = "|".join(WEIGHT_STEMS)
_WEIGHT_RE = re.compile(
    rf"^(?P<stem>{_STEM})(?:\.(?P<variant>\w+))?(?:-(?P<shard>\d+-of-\d+))?\.(?P<ext>safetensors|bin)$"
)
_INDEX_RE = re.compile(rf"^(?P<stem>{_STEM})\.(?P<ext>safetensors|bin)\.index(?:\.(?P<variant>\w+))?\.json$")
_OLD_INDEX_RE = re.compile(rf"^(?P<stem>{_STEM})\.(?P<variant>\w+)\.(?P<ext>safetensors|bin)\.index\.json$")


def weight_file(name: str) -> tuple[str, str | None, str, str] | None:
    """``(stem, variant, ext, role)`` of a weight file name (role ``single``, ``shard`` or ``index``),
    or None when it is not a file diffusers/transformers would load as model weights.

    >>> weight_file("diffusion_pytorch_model.fp16-00001-of-00002.safetensors")
    ('diffusion_pytorch_model', 'fp16', 'safetensors', 'shard')
    """
    name = name.rsplit("/", 1)[-1]
    if m := _WEIGHT_RE.match(name):
        return m["stem"], m["variant"], m["ext"], "shard" if m["shard"] else "single"
    for regex in (_INDEX_RE, _OLD_INDEX_RE):
        if m := regex.match(name):
            return m["stem"], m["variant"], m["ext"], "index"
    return None


def _weight_files(folder_files: list[str], variant: str | None, ext: str) -> list[str]:
    """The weights of one model folder in one format and variant (None: the default weights): the
    single file(s), else the sharded index (its shards are read from it: ``shards_of``)."""
    parsed = [(f, weight_file(f)) for f in folder_files]
    ours = [(f, w) for f, w in parsed if w is not None and w[2] == ext and w[1] == variant]
    singles = [f for f, w in ours if w[3] == "single"]
    return singles or [f for f, w in ours if w[3] == "index"]


def select_files(
    all_files: list[str],
    subfolders: Iterable[str] | None,
    variant: str | None,
    allow_pickle: bool,
    repo: str,
) -> list[str]:
    """The files needed to load ``subfolders`` of a repo (``None``: the repo root is one model; ``[]``
    would mean config files only): configs, tokenizer files, and each model's weights.

    Per model folder, the first of: safetensors of ``variant``, default safetensors, and only with
    ``allow_pickle`` the same two in ``.bin``; so a folder without the variant falls back to its default
    weights on its own. A sharded model contributes its index file here; the shards it lists are added
    by ``shards_of`` once the index is read (``fetch``). Other variants (``non_ema``), root single-file
    checkpoints and folders not asked for (safety checker, feature extractor) are never selected. A
    folder with only pickle weights is refused unless ``allow_pickle``; UserErrors name what is missing.
    """
    chosen: list[str] = [f for f in all_files if f in CONFIG_FILES]
    folders = [""] if subfolders is None else list(subfolders)
    exts = ("safetensors", "bin") if allow_pickle else ("safetensors",)
    variants = (variant, None) if variant else (None,)
    for sub in folders:
        prefix = f"{sub}/" if sub else ""
        here = [f for f in all_files if f.startswith(prefix) and "/" not in f[len(prefix) :]]
        chosen += [f for f in here if f.split("/")[-1] in CONFIG_FILES]
        if sub.startswith("tokenizer") or sub == "scheduler":
            chosen += [f for f in here if f.endswith((".json", ".txt", ".model"))]
            continue
        weights: list[str] = []
        for ext in exts:
            for v in variants:
                weights = weights or _weight_files(here, v, ext)
        if not weights:
            pickles = [
                f for f in here if (w := weight_file(f)) is not None and w[2] == "bin" and w[1] in variants
            ]
            if pickles:
                raise UserError(
                    f"{repo}: {prefix or 'the repo root'} has only pickle weights ({pickles[0]}): {PICKLE_RISK}"
                )
            found = sorted({w[1] or "default" for f in here if (w := weight_file(f)) is not None})
            also = f" (it has only the {', '.join(found)} variant weights)" if found else ""
            raise UserError(f"{repo}: no weights found in {prefix or 'the repo root'}{also}")
        chosen += weights
    return sorted(set(chosen))


def is_index(path: str) -> bool:
    """Whether a file is a sharded checkpoint's index (``*.safetensors.index[.fp16].json``)."""
    w = weight_file(path)
    return w is not None and w[3] == "index"


def shards_of(index_path: Path, rel: str, all_files: list[str], repo: str) -> list[str]:
    """The shard files a downloaded index lists (``weight_map`` values), as repo paths beside ``rel``;
    a UserError when the index is unreadable or names a shard the repo does not have."""
    import json

    try:
        weight_map = json.loads(Path(index_path).read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{repo}: unreadable sharded-weights index {rel} ({e})") from e
    folder = rel.rsplit("/", 1)[0] + "/" if "/" in rel else ""
    shards = [f"{folder}{n}" for n in names]
    missing = [s for s in shards if s not in all_files]
    if missing or not shards:
        raise UserError(f"{repo}: index {rel} lists shards the repo does not have: {missing or 'none'}")
    return shards


@dataclass(frozen=True)
class Fetched:
    """What ``fetch`` downloaded: the local snapshot folder and the repo paths in it."""

    snapshot: Path
    files: tuple[str, ...]


def fetch(
    repo: str,
    sha: str,
    subfolders: Iterable[str] | None,
    variant: str | None,
    allow_pickle: bool,
    endpoint_url: str | None = None,
) -> Fetched:
    """List a repo at a commit, select what loading ``subfolders`` needs (``select_files``), read any
    sharded index first and add exactly the shards it lists, then download all of it (nothing else).

    Example::

        got = fetch("stabilityai/sdxl-vae", sha, None, "fp16", allow_pickle=False)
        AutoencoderKL.from_pretrained(got.snapshot, variant=variant_in(got.files, "fp16"))
    """
    all_files = list_files(repo, sha, endpoint_url)
    needed = select_files(all_files, subfolders, variant, allow_pickle, repo)
    indexes = [f for f in needed if is_index(f)]
    if indexes:
        snap = download(repo, sha, indexes, endpoint_url)
        for rel in indexes:
            needed += shards_of(snap / rel, rel, all_files, repo)
    logger.info("%s@%s: downloading %d of its %d files", repo, sha[:10], len(set(needed)), len(all_files))
    return Fetched(download(repo, sha, needed, endpoint_url), tuple(sorted(set(needed))))


def variant_in(files: Iterable[str], variant: str | None) -> str | None:
    """``variant`` if any weight file of ``files`` is of that variant (else None: the default weights
    were taken everywhere)."""
    if variant and any((w := weight_file(f)) is not None and w[1] == variant for f in files):
        return variant
    return None


def resolve_ref(name: str, ref: str) -> str:
    """Resolve one ``hub:<role>:<repo>`` reference (what a stage's ``refs`` returns) to a commit sha
    (network; the cached ref when offline)."""
    kind, _, rest = name.partition(":")
    _, _, repo = rest.partition(":")
    if kind != "hub" or not re.match(REPO_PATTERN, repo):
        raise UserError(f"cannot resolve reference {name!r} (expected hub:<role>:<owner/name>)")
    return resolve_revision(repo, ref)
