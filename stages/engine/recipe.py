"""Recipes: YAML → validated ``Recipe`` → steps in dependency order.

Every problem is collected and reported at once, each with its path::

    recipes/tiny.yaml: 2 problem(s)
      steps[2] (unet_6bit).params.nbits: Input should be less than or equal to 8
      steps[3] (onnx).inputs.model: no step 'base2' (steps are: base, fused, unet_6bit)

Validators reject; they never rewrite what the user wrote.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sdkiln.runtime.contract.errors import RecipeError, UserError
from sdkiln.stages.engine.core import Stage, StageParams

_ID = r"^[a-z0-9][a-z0-9_\-]*$"


class StepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=_ID, max_length=64)
    stage: str
    inputs: dict[str, str] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict)
    # True: the stage's default place in the bundle; False: not in the bundle; a string: that folder.
    bundle: bool | str = True
    description: str = ""


class RecipeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=_ID, max_length=64)
    description: str = ""
    steps: list[StepSpec] = Field(min_length=1)


@dataclass(frozen=True)
class Step:
    id: str
    stage: Stage
    inputs: dict[str, str]
    params: StageParams
    bundle_dir: str | None


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    path: Path
    steps: tuple[Step, ...]  # in dependency order
    raw: dict[str, Any]  # the recipe as loaded, with overrides applied

    @property
    def dir(self) -> Path:
        return self.path.parent

    def step(self, step_id: str) -> Step:
        for s in self.steps:
            if s.id == step_id:
                return s
        raise KeyError(step_id)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of silently keeping the last one."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    mapping: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in mapping:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        mapping[key] = loader.construct_object(value_node, deep=deep)
    return mapping


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(path: Path) -> dict[str, Any]:
    """Read a recipe file; a missing file, a syntax error or an empty file is a UserError."""
    if not path.exists():
        raise UserError(f"{path}: no such recipe file")
    if not path.is_file():
        raise UserError(f"{path}: not a file (give the path of a recipe .yaml)")
    try:
        data = yaml.load(path.read_text(), Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise UserError(f"{path}: YAML syntax error{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    if data is None:
        raise UserError(f"{path}: the recipe is empty (it needs `name:` and `steps:`)")
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe is a mapping with `name:` and `steps:`, not {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides: ``steps.<id or index>.params.nbits=4``; values parse as YAML."""
    import copy

    data = copy.deepcopy(data)
    for item in overrides:
        dotted, sep, raw = item.partition("=")
        if not sep or not dotted:
            raise UserError(f"override {item!r}: expected key=value, e.g. steps.unet_6bit.params.nbits=4")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as e:
            raise UserError(f"override {item!r}: value is not valid YAML ({e})") from None
        parts = dotted.split(".")
        node: Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                idx = _list_index(node, part)
                if idx is None:
                    ids = ", ".join(str(s.get("id")) for s in node if isinstance(s, dict))
                    raise UserError(f"override {item!r}: no step {part!r} at {where} (steps are: {ids})")
                if last:
                    node[idx] = value
                else:
                    node = node[idx]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                raise UserError(f"override {item!r}: {'.'.join(parts[:i])} is not a mapping or list")
    return data


def _list_index(items: list[Any], part: str) -> int | None:
    for i, s in enumerate(items):
        if isinstance(s, dict) and s.get("id") == part:
            return i
    if re.fullmatch(r"\d+", part) and int(part) < len(items):
        return int(part)
    return None


def _loc(loc: tuple[Any, ...], steps: list[Any] | None = None) -> str:
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
            if i == 1 and loc[0] == "steps" and steps is not None and part < len(steps):
                sid = steps[part].get("id") if isinstance(steps[part], dict) else None
                if sid:
                    out += f" ({sid})"
        else:
            out += ("." if out else "") + str(part)
    return out


def _errors(e: ValidationError, prefix: tuple[Any, ...], steps: list[Any] | None) -> list[str]:
    out = []
    for err in e.errors():
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (not allowed here; check its spelling)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        out.append(f"{_loc(prefix + tuple(err['loc']), steps)}: {msg}")
    return out


def validate(data: dict[str, Any], source: Path, stages: dict[str, Stage]) -> Recipe:
    """Validate a loaded recipe against the stage registry; raises RecipeError with every problem."""
    problems: list[str] = []
    try:
        spec = RecipeSpec.model_validate(data)
    except ValidationError as e:
        # Report what can be reported of the structure, then stop: steps may be unusable.
        raise RecipeError(
            str(source), _errors(e, (), data.get("steps") if isinstance(data, dict) else None)
        ) from None

    raw_steps = data["steps"]
    params_by_id: dict[str, StageParams] = {}
    seen: dict[str, int] = {}
    for i, st in enumerate(spec.steps):
        where = f"steps[{i}] ({st.id})"
        if st.id in seen:
            problems.append(f"{where}.id: duplicate id (also steps[{seen[st.id]}])")
        seen.setdefault(st.id, i)
        stage = stages.get(st.stage)
        if stage is None:
            known = ", ".join(sorted(stages))
            problems.append(f"{where}.stage: unknown stage {st.stage!r} (known: {known})")
            continue
        try:
            params_by_id[st.id] = stage.params.model_validate(st.params)
        except ValidationError as e:
            problems.extend(_errors(e, ("steps", i, "params"), raw_steps))
        for name in st.inputs:
            if name not in stage.inputs:
                accepted = ", ".join(stage.inputs) or "none"
                problems.append(
                    f"{where}.inputs.{name}: stage {stage.name} takes no input {name!r} (it takes: {accepted})"
                )
        for name in stage.inputs:
            if name not in st.inputs and name not in stage.optional_inputs:
                problems.append(f"{where}.inputs.{name}: required input is missing (a step id)")

    by_id = {st.id: st for st in spec.steps}
    for i, st in enumerate(spec.steps):
        stage = stages.get(st.stage)
        for name, ref in st.inputs.items():
            where = f"steps[{i}] ({st.id}).inputs.{name}"
            if ref not in by_id:
                problems.append(f"{where}: no step {ref!r} (steps are: {', '.join(by_id)})")
                continue
            if ref == st.id:
                problems.append(f"{where}: a step cannot consume its own output")
                continue
            up = stages.get(by_id[ref].stage)
            if stage is not None and up is not None and name in stage.inputs:
                accepted = stage.inputs[name]
                if up.output_kind not in accepted:
                    problems.append(
                        f"{where}: step {ref!r} produces a {up.output_kind!r} artifact; "
                        f"{stage.name} needs {' or '.join(repr(k) for k in accepted)}"
                    )
        if stage is not None and st.id in params_by_id and stage.check is not None:
            for p in stage.check(params_by_id[st.id], source.parent):
                problems.append(f"steps[{i}] ({st.id}).params.{p}")

    order = _topological(spec.steps, problems)
    if problems:
        raise RecipeError(str(source), problems)

    steps = []
    for st in (by_id[i] for i in order):
        stage = stages[st.stage]
        params = params_by_id[st.id]
        if st.bundle is True:
            bundle_dir = stage.bundle_dir(params)
        elif st.bundle is False:
            bundle_dir = None
        else:
            bundle_dir = st.bundle.strip("/")
        steps.append(Step(st.id, stage, dict(st.inputs), params, bundle_dir))
    _check_bundle_dirs(steps, source)
    return Recipe(spec.name, spec.description, source, tuple(steps), data)


def _check_bundle_dirs(steps: list[Step], source: Path) -> None:
    problems = []
    taken: dict[str, str] = {}
    for s in steps:
        if s.bundle_dir is None:
            continue
        for other_dir, other in taken.items():
            if (
                s.bundle_dir == other_dir
                or s.bundle_dir.startswith(other_dir + "/")
                or other_dir.startswith(s.bundle_dir + "/")
            ):
                problems.append(
                    f"steps ({s.id}).bundle: bundle folder {s.bundle_dir!r} collides with step {other!r} "
                    f"({other_dir!r}); set `bundle: <folder>` or `bundle: false` on one of them"
                )
        taken[s.bundle_dir] = s.id
    if problems:
        raise RecipeError(str(source), problems)


def _topological(steps: list[StepSpec], problems: list[str]) -> list[str]:
    """Kahn's algorithm in file order; a cycle is reported with its members."""
    ids = [s.id for s in steps]
    deps = {s.id: [r for r in s.inputs.values() if r in ids and r != s.id] for s in steps}
    done: list[str] = []
    remaining = list(dict.fromkeys(ids))
    while remaining:
        ready = [i for i in remaining if all(d in done for d in deps[i])]
        if not ready:
            problems.append(f"steps: dependency cycle among {', '.join(remaining)}")
            return done
        for i in ready:
            done.append(i)
            remaining.remove(i)
    return done


def load_recipe(path: Path, stages: dict[str, Stage], overrides: list[str] | None = None) -> Recipe:
    """Load, override and validate a recipe file."""
    path = Path(path)
    data = load_yaml(path)
    if overrides:
        data = apply_overrides(data, overrides)
    return validate(data, path, stages)
