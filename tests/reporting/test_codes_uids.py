"""Coded concepts checked against dcmqi's Parametric Map contexts and PS3.16; deterministic UIDs."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path

import pytest
from pydicom.sr._concepts_dict import concepts

from processing.results import Comparability, ResponseCategory
from reporting import codes as rcodes
from reporting.uids import deterministic_uid, digest_arrays

CONTEXTS = "dicom_encoding_examples/dcmqi/doc/pmContexts"


def _ps316(scheme: str, value: str) -> str | None:
    for entry in concepts.get(scheme, {}).values():
        if value in entry:
            return entry[value][0]
    return None


def test_quantity_codes_and_units_match_dcmqi_contexts(shared_data: Path) -> None:
    definitions = {}
    for name in ("pm-dwi-context.json", "pm-dce-context.json"):
        data = json.loads((shared_data / CONTEXTS / name).read_text())
        for item in data["QuantityDefinitions"]:
            definitions[item["CodeValue"]] = (
                item["CodeMeaning"],
                {u["CodeValue"] for u in item["MeasurementUnitsCode"]},
            )
    in_dcmqi = 0
    for spec in rcodes.QUANTITIES.values():
        code = spec.quantity
        # every quantity code is a PS3.16 DCM code with the same meaning
        assert _ps316(code.scheme_designator, code.value) == code.meaning, spec.name
        if code.value in definitions:
            meaning, units = definitions[code.value]
            assert meaning == code.meaning
            assert spec.unit in units, (spec.name, spec.unit, units)
            in_dcmqi += 1
        if spec.method is not None:
            assert _ps316("DCM", spec.method.value) == spec.method.meaning
    # ADC, Dapp, IVIM D/D*/f, FA, Ktrans, kep, ve, vp, IAUC60, TTP are in dcmqi's contexts
    assert in_dcmqi == 12


def test_units_and_conversions() -> None:
    assert rcodes.QUANTITIES["ADC"].scale == 1e6
    assert rcodes.QUANTITIES["T1"].scale == 1e3
    assert rcodes.conversion_factor("mL", "mm3") == 1e3
    assert rcodes.unit_code("mL").value == "cm3"
    with pytest.raises(ValueError, match="no conversion"):
        rcodes.conversion_factor("s", "mm")
    with pytest.raises(ValueError, match="no UCUM code"):
        rcodes.unit_code("furlong")


def test_segment_anatomy_and_private_codes() -> None:
    assert rcodes.segment_type("metastasis").value == "14799000"
    assert rcodes.segment_type("neoplasm").value == "108369006"
    assert rcodes.SEGMENT_CATEGORY.value == "49755003"
    expected = {
        "C1": "14806007",
        "C2": "39976000",
        "T1": "64864005",
        "T12": "23215003",
        "L1": "66794005",
        "L2": "14293000",
        "L5": "49668003",
        "S1": "54735007",
    }
    for level, value in expected.items():
        assert rcodes.vertebra_code(level).value == value
    assert rcodes.vertebra_code(None).value == "51282000"
    # all 24 presacral levels resolve to a specific code
    levels = (
        [f"C{i}" for i in range(1, 8)]
        + [f"T{i}" for i in range(1, 13)]
        + [f"L{i}" for i in range(1, 6)]
    )
    assert all(rcodes.vertebra_code(lv).value != "51282000" for lv in levels)
    assert set(rcodes.RESPONSE_CATEGORIES) == set(ResponseCategory)
    assert set(rcodes.COMPARABILITY_VALUES) == set(Comparability)
    sh = re.compile(r"^[\x20-\x7e]{1,16}$")
    for code in [
        *rcodes.RESPONSE_CATEGORIES.values(),
        *rcodes.VCF_VALUES.values(),
        rcodes.criterion_code("a-very-long-criterion-identifier", "x"),
        rcodes.rule_set_code("spine-sbrt-response 1.0"),
    ]:
        assert code.scheme_designator == "99SPINESBRT" and sh.match(code.value)
    # the private scheme is documented in the module docstring, code by code
    for code in [
        *rcodes.RESPONSE_CATEGORIES.values(),
        *rcodes.VCF_VALUES.values(),
        *rcodes.COMPARABILITY_VALUES.values(),
        *rcodes.CHANGE_METHODS.values(),
        rcodes.EPIDURAL_PROGRESSION,
        rcodes.EVENT_SBRT_START,
        rcodes.PROGRESSION_PROBABILITY,
    ]:
        assert re.search(rf"^{code.value}\s", rcodes.__doc__, re.M), code.value


def test_radiomics_codes() -> None:
    assert rcodes.ibsi_code("RNU0").meaning == "Volume of Mesh"
    private = rcodes.radiomics_feature_code("original_glcm_MCC")
    # pyradiomics-dcm's Metadata.makeHash: b64encode(sha1(text)).decode('ascii')[:6]
    expected = base64.b64encode(hashlib.sha1(b"original_glcm_MCC").digest()).decode("ascii")[:6]
    assert (private.scheme_designator, private.value) == ("99PYRADIOMICS", expected)
    assert private.meaning == "original_glcm_MCC"
    assert (
        rcodes.radiomics_feature_code("original_glcm_Contrast", {"glcm_Contrast": "ACUI"}).value
        == "ACUI"
    )
    with pytest.raises(ValueError, match="not an IBSI code"):
        rcodes.ibsi_code("ZZZZ")


def test_deterministic_uid() -> None:
    args = dict(
        source_study_uid="1.2.3",
        tracking_uid="1.2.3.4",
        kind="seg/instance",
        algorithm_version="0.1.0",
        input_digest=digest_arrays(),
    )
    uid = deterministic_uid(**args)
    assert uid == deterministic_uid(**args)
    assert re.fullmatch(r"2\.25\.[1-9][0-9]{0,38}", uid)
    for key, other in (
        ("algorithm_version", "0.1.1"),
        ("kind", "seg/series"),
        ("tracking_uid", "1.2.3.5"),
        ("input_digest", "x"),
        ("source_study_uid", "1.2.4"),
    ):
        assert deterministic_uid(**{**args, key: other}) != uid
    with pytest.raises(ValueError, match="algorithm_version"):
        deterministic_uid(**{**args, "algorithm_version": ""})


def test_every_map_of_processing_maps_has_an_encoding() -> None:
    """Each quantity processing.maps produces can become a Parametric Map, from its unit."""
    from processing.maps import UNITS as MAP_UNITS

    for quantity, unit in MAP_UNITS.items():
        spec = rcodes.quantity_spec(quantity)
        assert rcodes.normalize_unit(unit) == rcodes.normalize_unit(spec.internal_unit), quantity
