"""The hash memo re-hashes an edited file even when its mtime was put back; the shape grammar and input
checks; one meaning of "identical"; every gate's floors come from one table."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from sdkiln.runtime.contract.digest import HashMemo, sha256_file
from sdkiln.runtime.contract.errors import InputSpecError
from sdkiln.runtime.contract.floors import E2E_PSNR_DB, TOLERANCES, e2e_floor, gate
from sdkiln.runtime.contract.metrics import EXACT_DB, compare, compare_images, identical
from sdkiln.runtime.contract.specs import ComponentIO, TensorSpec, check_inputs, resolve_shape


def test_memo_sees_an_in_place_edit_with_mtime_restored(tmp_path: Path) -> None:
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 1000)
    memo = HashMemo(tmp_path / "memo.sqlite")
    first = memo.sha256(f)
    st = f.stat()
    with open(f, "r+b") as fh:  # same size, one byte changed, then the timestamps put back
        fh.write(b"b")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_mtime_ns == st.st_mtime_ns and f.stat().st_size == st.st_size
    assert memo.sha256(f) == sha256_file(f) != first


def test_shape_grammar() -> None:
    assert resolve_shape(
        ["batch", 4, "latent_height / 2", "latent_width * 8"],
        {"batch": 2, "latent_height": 64, "latent_width": 8},
    ) == [2, 4, 32, 64]
    with pytest.raises(KeyError):
        resolve_shape(["height"], {})
    with pytest.raises(ValueError):
        resolve_shape(["height + 1"], {"height": 8})


def test_check_inputs_optional_and_errors() -> None:
    io = ComponentIO(
        inputs={
            "sample": TensorSpec("sample", "float32", ("batch", 4, "latent_height", "latent_width")),
            "cond": TensorSpec("cond", "float32", ("batch", 3, "latent_height * 8", "latent_width * 8")),
            "res": TensorSpec("res", "float32", ("batch", 4, "latent_height", "latent_width"), optional=True),
        },
        outputs={},
    )
    x = np.zeros((2, 4, 8, 8), np.float32)
    c = np.zeros((2, 3, 64, 64), np.float32)
    assert check_inputs("unet", io, {"sample": x, "cond": c}) == {
        "batch": 2,
        "latent_height": 8,
        "latent_width": 8,
    }
    with pytest.raises(InputSpecError, match="missing input"):
        check_inputs("unet", io, {"sample": x})
    with pytest.raises(InputSpecError, match="expected latent_height \\* 8 = 64"):
        check_inputs("unet", io, {"sample": x, "cond": np.zeros((2, 3, 32, 64), np.float32)})
    with pytest.raises(InputSpecError, match="dtype float64"):
        check_inputs("unet", io, {"sample": x.astype(np.float64), "cond": c})


def test_one_meaning_of_identical() -> None:
    a = np.linspace(-1, 1, 1000, dtype=np.float32)
    same = compare(a, a.copy())
    assert identical(same) and same["sqnr_db"] == same["psnr_db"] == EXACT_DB
    near = compare(a, a + np.float32(1e-7))
    assert not identical(near) and 100 < near["sqnr_db"] < EXACT_DB  # its real number, not the cap
    img = np.random.default_rng(0).random((8, 8, 3))
    assert compare_images(img, img)["psnr_db"] == EXACT_DB
    assert np.isnan(compare(a, np.full_like(a, np.nan))["sqnr_db"])


def test_every_component_kind_and_precision_has_a_floor() -> None:
    for kind in TOLERANCES:
        assert gate(kind, "fp32").max_abs is not None
    assert gate("unet", "int8-static").min_sqnr_db == gate("unet", "int8").min_sqnr_db
    assert gate("controlnet.canny", "bf16").min_sqnr_db == gate("controlnet", "fp16").min_sqnr_db
    with pytest.raises(KeyError, match="no SQNR floor"):
        gate("vae_decoder", "qint4")
    assert e2e_floor("mixed", ["fp32", "int8"]) == E2E_PSNR_DB["int8"] < e2e_floor("fp32")
