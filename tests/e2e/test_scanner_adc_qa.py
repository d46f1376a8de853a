"""Issue 13, acceptance 5: a scanner ADC series present -> the QA comparison of the node's ADC with
it is in ``summary.json`` and in the SR.

The phantom's scanner ADC (``--scanner-maps``) is an ordinary log-linear fit of the noiseless signal
over b 0, 50, 100, 400, 800, 1000 (ground truth ``scanner_adc.bvalues_used``); the node fits its
ADC over its preferred b-range, b 50-1000 (b = 0 left out to limit perfusion). With IVIM perfusion
in the signal, including b = 0 raises the ADC, so the node's ADC is expected *below* the scanner's
by the amount the phantom computes from its noiseless signal:
``scanner_adc.expected_node_vs_scanner["b50-1000"]`` (about -3.5 % in the tumour and -3.2 % over
the tissue). Tolerance 1 percentage point: the node fits noisy signals (b0 SNR 80; the median over
~100 tumour voxels moves by a few 0.1 %) and its lesion mask is its own segmentation, not the true
tumour (edge voxels of marrow have a slightly different perfusion fraction); 1 point is still less
than a third of the expected difference, so a node that compared against the wrong map, the wrong
unit or a fit including b = 0 (difference ~0) fails.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pydicom
import pytest

from tests.phantom_fixtures import no_radiomics_config, run_analyze

pytestmark = pytest.mark.slow

#: 99SPINESBRT concept codes of the ADC QA numbers in the SR, and the summary.json value each holds
SR_CODES = {
    "ADCQA-TUM-REL": ("tumour", "median_relative_difference", 100.0),
    "ADCQA-TUM-ABS": ("tumour", "median_difference_mm2_s", 1e6),
    "ADCQA-TIS-REL": ("tissue", "median_relative_difference", 100.0),
    "ADCQA-TIS-ABS": ("tissue", "median_difference_mm2_s", 1e6),
}
TOLERANCE = 0.01  # absolute, on the relative difference


@pytest.fixture(scope="module")
def qa_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, Path]:
    from node.commands.phantom import write_phantom

    base = tmp_path_factory.mktemp("scanner-adc-qa")
    patient = base / "patient"
    truth = write_phantom(patient, seed=11, size="small", followups=1, scanner_maps=True)
    out = base / "out"
    # radiomics off: the QA comparison and its SR items do not depend on it (half the time)
    config = no_radiomics_config(base)
    run = run_analyze([patient], out, "--config", str(config))
    assert run.returncode == 0, run.stderr[-3000:]
    return truth, json.loads((out / "summary.json").read_text()), out


def _num_items(items: pydicom.Sequence) -> list[pydicom.Dataset]:
    found = []
    for item in items:
        if item.get("ValueType") == "NUM":
            found.append(item)
        if "ContentSequence" in item:
            found.extend(_num_items(item.ContentSequence))
    return found


def test_summary_has_the_qa_per_study_close_to_the_expected_difference(qa_run) -> None:
    from processing.maps import MapSettings

    truth, summary, _ = qa_run
    settings = MapSettings()
    assert (settings.adc_min_b, settings.adc_max_b) == (50.0, 1000.0)  # the node fits b 50-1000
    by_uid = {st["StudyInstanceUID"]: (key, st) for key, st in truth["studies"].items()}
    assert len(summary["studies"]) == 2
    for study in summary["studies"]:
        key, st = by_uid[study["study_instance_uid"]]
        qa = study["scanner_adc_qa"]
        assert qa["scanner_series_instance_uid"] == st["series"]["adc_scanner"]["SeriesInstanceUID"]
        scanner = st["tumour"]["scanner_adc"]
        assert scanner["bvalues_used"] == [0.0, 50.0, 100.0, 400.0, 800.0, 1000.0]
        expected = scanner["expected_node_vs_scanner"]["b50-1000"]
        tumour, tissue = qa["tumour"], qa["tissue"]
        assert tumour["n_voxels"] >= 30 and tissue["n_voxels"] >= 0.5 * scanner["tissue_voxels"]
        # the scanner medians are the stored map's (ground truth, integer 1e-6 mm²/s)
        assert tissue["median_scanner_mm2_s"] == pytest.approx(
            scanner["tissue_median_mm2_s"], abs=2e-6
        )
        assert tumour["median_scanner_mm2_s"] == pytest.approx(
            scanner["tumour_median_mm2_s"], rel=0.05
        )
        assert tumour["median_node_mm2_s"] > 0 and tissue["median_node_mm2_s"] > 0
        assert tumour["median_relative_difference"] == pytest.approx(
            expected["tumour_median_relative_difference"], abs=TOLERANCE
        ), key
        assert tissue["median_relative_difference"] == pytest.approx(
            expected["tissue_median_relative_difference"], abs=TOLERANCE
        ), key


def test_sr_carries_the_qa_numbers_and_passes_dciodvfy(qa_run) -> None:
    _, summary, out = qa_run
    srs = [
        out / name
        for name in summary["files"]
        if pydicom.dcmread(out / name, stop_before_pixels=True).SOPClassUID
        == "1.2.840.10008.5.1.4.1.1.88.34"
    ]  # Comprehensive 3D SR
    assert len(srs) == 1
    sr = pydicom.dcmread(srs[0])
    numbers: dict[str, list[float]] = {code: [] for code in SR_CODES}
    for item in _num_items(sr.ContentSequence):
        concept = item.ConceptNameCodeSequence[0]
        if concept.CodingSchemeDesignator == "99SPINESBRT" and concept.CodeValue in SR_CODES:
            numbers[concept.CodeValue].append(float(item.MeasuredValueSequence[0].NumericValue))
    for code, (region, field, scale) in SR_CODES.items():
        expected = sorted(
            study["scanner_adc_qa"][region][field] * scale for study in summary["studies"]
        )
        assert sorted(numbers[code]) == pytest.approx(expected, rel=1e-6, abs=1e-9), code
    run = subprocess.run(["dciodvfy", str(srs[0])], capture_output=True, text=True, check=False)
    errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
    assert errors == []
