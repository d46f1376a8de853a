"""VFA T1 against the OSIPI T1_mapping reference data (R1 and S0 within 0.05 + 5 %)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from processing.t1 import T1MappingError, VfaT1Model, fixed_t10, spgr_signal

T1_DIR = Path("osipi_dce") / "test" / "T1_mapping" / "data"


def _cases(shared_data: Path, name: str):
    with (shared_data / T1_DIR / name).open(newline="") as fh:
        for r in csv.DictReader(fh):
            fa = np.array(r["FA"].split(), dtype=float)
            tr = np.array(r["TR"].split(), dtype=float)
            s = np.array(r["s"].split(), dtype=float)
            if name == "t1_prostate_data.csv":  # TR in ms, reference T1 (ms) of the nonlinear fit
                yield (
                    fa,
                    tr[0] / 1000.0,
                    s,
                    1000.0 / float(r[" T1 nonlinear"]),
                    float(r[" s0 nonlinear"]),
                )
            elif name == "t1_quiba_data.csv":  # R1 given in /ms
                yield fa, tr[0], s, float(r["R1"]) * 1000.0, float(r["s0"])
            else:
                yield fa, tr[0], s, float(r["R1"]), float(r["s0"])


@pytest.mark.parametrize(
    "name, count",
    [("t1_brain_data.csv", 76), ("t1_quiba_data.csv", 45), ("t1_prostate_data.csv", 50)],
)
def test_vfa_t1_osipi(shared_data: Path, name: str, count: int) -> None:
    cases = list(_cases(shared_data, name))
    assert len(cases) == count
    for fa, tr, s, r1_ref, s0_ref in cases:
        fit = VfaT1Model(fa, tr).fit(s)
        assert fit.valid
        np.testing.assert_allclose(fit.r1, r1_ref, rtol=0.05, atol=0.05)
        np.testing.assert_allclose(fit.m0, s0_ref, rtol=0.05, atol=0.05)


def test_vfa_volume_noiseless_exact_and_linear_method() -> None:
    fa = np.array([2.0, 5.0, 10.0, 15.0, 20.0])
    t1 = np.linspace(0.3, 3.0, 24).reshape(4, 6)
    s = spgr_signal(1000.0, 1.0 / t1[..., None], fa, 0.005)
    for method in ("nonlinear", "linear"):
        fit = VfaT1Model(fa, 0.005, method=method).fit(s)
        np.testing.assert_allclose(fit.t1, t1, rtol=1e-6)
        np.testing.assert_allclose(fit.m0, 1000.0, rtol=1e-6)
    assert fit.provenance["t1_method_code"][0] == "126350"


def test_vfa_degenerate_input() -> None:
    fa = np.array([3.0, 15.0])
    s = np.array([[100.0, 200.0], [0.0, 0.0], [np.nan, 3.0]])
    fit = VfaT1Model(fa, 0.005).fit(s)
    assert fit.valid.tolist()[1:] == [False, False]
    assert np.isnan(fit.t1[1:]).all()
    with pytest.raises(T1MappingError, match="two distinct flip angles"):
        VfaT1Model([10.0, 10.0], 0.005)


def test_fixed_t10_fallback_is_flagged() -> None:
    fb = fixed_t10((2, 3), 1.2, reason="VFA series missing")
    assert fb.is_fallback and fb.method == "fixed value"
    assert fb.provenance["t1_method_code"][0] == "126352"
    np.testing.assert_allclose(fb.t1, 1.2)
    with pytest.raises(ValueError, match="physical range"):
        fixed_t10((2,), 100.0)
