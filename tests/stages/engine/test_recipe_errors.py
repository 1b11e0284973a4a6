"""Bad recipes: each exits 2 with a message naming the place, and no traceback."""

from __future__ import annotations

import pytest

GOOD_STEP = "  - {id: a, stage: t_write, params: {text: hi}}\n"

CASES = {
    "unknown_stage": (
        "name: r\nsteps:\n  - {id: a, stage: t_nope, params: {}}\n",
        "steps[0] (a).stage: unknown stage 't_nope'",
    ),
    "unknown_key": (
        "name: r\nsteps:\n  - {id: a, stage: t_write, params: {text: hi, colour: red}}\n",
        "steps[0] (a).params.colour: unknown key",
    ),
    "unknown_top_key": ("name: r\nflavour: x\nsteps:\n" + GOOD_STEP, "flavour: unknown key"),
    "wrong_type": (
        "name: r\nsteps:\n  - {id: a, stage: t_write, params: {text: hi, repeat: lots}}\n",
        "steps[0] (a).params.repeat: Input should be a valid integer",
    ),
    "out_of_range": (
        "name: r\nsteps:\n"
        + GOOD_STEP
        + "  - {id: c, stage: t_concat, inputs: {a: a}, params: {nbits: 9}}\n",
        "steps[1] (c).params.nbits: Input should be less than or equal to 8",
    ),
    "missing_input": (
        "name: r\nsteps:\n  - {id: c, stage: t_concat, inputs: {a: nowhere}}\n",
        "steps[0] (c).inputs.a: no step 'nowhere'",
    ),
    "missing_required_input": (
        "name: r\nsteps:\n  - {id: c, stage: t_concat}\n",
        "steps[0] (c).inputs.a: required input is missing",
    ),
    "cycle": (
        "name: r\nsteps:\n  - {id: x, stage: t_concat, inputs: {a: y}}\n  - {id: y, stage: t_concat, inputs: {a: x}}\n",
        "steps: dependency cycle among x, y",
    ),
    "kind_mismatch": (
        "name: r\nsteps:\n" + GOOD_STEP + "  - {id: s, stage: t_summarize, inputs: {report: a}}\n",
        "steps[1] (s).inputs.report: step 'a' produces a 'data' artifact; t_summarize needs 'report'",
    ),
    "duplicate_id": ("name: r\nsteps:\n" + GOOD_STEP + GOOD_STEP, "steps[1] (a).id: duplicate id"),
    "duplicate_yaml_key": ("name: r\nname: s\nsteps:\n" + GOOD_STEP, "duplicate key 'name'"),
    "yaml_syntax": ("name: r\nsteps:\n  - {id: a, stage: t_write\n", "YAML syntax error at line"),
    "empty_file": ("", "the recipe is empty"),
    "not_a_mapping": ("- a\n- b\n", "a recipe is a mapping"),
    "no_steps": ("name: r\nsteps: []\n", "steps: List should have at least 1 item"),
    "bad_name": ("name: 'Not OK!'\nsteps:\n" + GOOD_STEP, "name: String should match pattern"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_recipe_exits_2_naming_the_place(sdk, case):
    body, expected = CASES[case]
    path = sdk.root / "bad.yaml"
    path.write_text(body)
    for command in ("validate", "plan", "build"):
        out = sdk.run(command, str(path), check=2)
        assert expected in out.stderr, f"{command}: {out.stderr}"
        assert "Traceback" not in out.stderr
    assert not sdk.started()


def test_all_problems_reported_at_once(sdk):
    path = sdk.root / "bad.yaml"
    path.write_text(
        "name: r\nsteps:\n"
        "  - {id: a, stage: t_write, params: {text: hi, repeat: 0, colour: red}}\n"
        "  - {id: c, stage: t_concat, inputs: {a: nowhere}, params: {nbits: 0}}\n"
    )
    err = sdk.run("validate", str(path), check=2).stderr
    for expected in (
        "steps[0] (a).params.repeat",
        "steps[0] (a).params.colour",
        "steps[1] (c).params.nbits",
        "steps[1] (c).inputs.a: no step 'nowhere'",
    ):
        assert expected in err
    assert "4 problem(s)" in err


def test_missing_recipe_file(sdk):
    out = sdk.run("build", str(sdk.root / "nope.yaml"), check=2)
    assert "nope.yaml: no such recipe file" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("steps.zzz.params.text=x", "no step 'zzz'"),
        ("nonsense", "expected key=value"),
        (
            "steps.a.params.repeat=-1",
            "steps[0] (a).params.repeat: Input should be greater than or equal to 1",
        ),
    ],
)
def test_bad_overrides_exit_2(sdk, override, expected):
    path = sdk.root / "ok.yaml"
    path.write_text("name: r\nsteps:\n" + GOOD_STEP.replace("text: hi", "text: hi, repeat: 2"))
    out = sdk.run("build", str(path), override, check=2)
    assert expected in out.stderr


def test_bad_arguments_exit_2(sdk):
    assert "error:" in sdk.run("build", check=2).stderr
    assert "no such bundle" in sdk.run("verify", str(sdk.root / "nothing"), check=2).stderr
    path = sdk.root / "ok.yaml"
    path.write_text("name: r\nsteps:\n" + GOOD_STEP)
    assert "--force zz: no such step" in sdk.run("build", str(path), "--force", "zz", check=2).stderr
