"""Real scanner series for tests, unpacked on demand into a session temporary folder.

The real exports live read-only in ``shared/data`` beside the checkout
(``tests.conftest.SHARED_DATA``): ``dwi_dcmqa/*/In/...`` and ``real_mr/*``. Some are stored gzipped
(``*.gz``, one file per DICOM object) or zipped (``*.zip``) exactly as their sources ship them;
they must be unpacked before use and never copied into the repository. This module does that once
per test session:

- :func:`real_series_dir` ``(name) -> Path`` gives a folder of plain DICOM files for one series
  folder. ``name`` is a key of :data:`REAL_SERIES` (for instance ``"philips_cl"``, ``"uih_dti16"``,
  ``"xa61"``) or a path relative to ``shared/data`` (a folder, or a ``.zip`` file). A folder that
  holds no ``.gz`` file is returned as is (read-only: do not write into it); a folder with ``.gz``
  files is copied into the session temporary folder with every ``X.gz`` gunzipped to ``X`` (other
  files, e.g. a DICOMDIR, are copied unchanged, so a CD export stays a CD export); a ``.zip`` is
  extracted there.
  Results are cached per process, so each archive is unpacked at most once per session.
- :func:`real_data_root` gives ``shared/data`` (skips the test if absent);
- :data:`REAL_SERIES` names every series folder of the corpus (the gzipped/zipped ones included).

The temporary folder is removed when the interpreter exits. Use it from a test as::

    from tests.real_data import real_series_dir

    def test_something():
        folder = real_series_dir("philips_cl")       # gunzipped, with its DICOMDIR
        ...
"""

from __future__ import annotations

import atexit
import gzip
import shutil
import tempfile
import threading
import zipfile
from pathlib import Path

import pytest

#: ``shared/data`` beside the checkout (same place as ``tests.conftest.SHARED_DATA``).
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

#: Short name -> path (relative to ``shared/data``) of each real series folder or archive.
REAL_SERIES: dict[str, str] = {
    # dwi_dcmqa/
    "canon_cl": "dwi_dcmqa/canon_dwi/In/cl",  # gzipped classic, b0 + b1500 (sagittal)
    "canon_enh": "dwi_dcmqa/canon_dwi/In/enh",  # gzipped enhanced multi-frame
    "ge_dwi": "dwi_dcmqa/ge_dwi/In/01_Ax_DWI_TENSOR_R2",  # GE oblique b0 + b1000
    "philips_cl": "dwi_dcmqa/philips_dwi/In/cl",  # gzipped classic + DICOMDIR (CD export)
    "siemens_mosaic": "dwi_dcmqa/siemens_sag_mosaic_dwi/In/4_DWI_SagAPmosaic",
    # real_mr/
    "philips_achieva_dti32": "real_mr/philips_achieva_dti32/In/Bangalore_2008/dwi_no-phi",
    "xa61": "real_mr/siemens_xa60_xa61_enhanced/In/XA61/DICOM/24100310/14440000",  # series 14/15/16
    "xa60": "real_mr/siemens_xa60_xa61_enhanced/In/XA60/DICOM/24100413/39280000",  # series 14
    "uih_dti16": "real_mr/uih_umr770_dti16/In/DTI_134434/dti_tra_dir16_PA_SaveBySlc__135612",
    "imagedata_dwi": "real_mr/imagedata_siemens/data/dicom/ep2d_RSI_b0_500_1500_6dir.zip",
    "imagedata_time": "real_mr/imagedata_siemens/data/dicom/time.zip",
    "imagedata_cohort": "real_mr/imagedata_siemens/data/dicom/cohort.zip",
    "dcmqi_sr_example": "real_mr/dcmqi_seg_sr/data/sr-example",
    "dcmqi_segmentations": "real_mr/dcmqi_seg_sr/data/segmentations",
}

_CACHE: dict[str, Path] = {}
_LOCK = threading.Lock()
_TMP: Path | None = None


def real_data_root() -> Path:
    """``shared/data``; skips the calling test when the reference data is not there."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real scanner data not found at {SHARED_DATA}")
    return SHARED_DATA


def _session_tmp() -> Path:
    global _TMP
    if _TMP is None:
        _TMP = Path(tempfile.mkdtemp(prefix="spine-real-data-"))
        atexit.register(shutil.rmtree, _TMP, True)
    return _TMP


def _unpack_folder(src: Path, dst: Path) -> None:
    for path in sorted(src.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(src)
        if path.suffix == ".gz":
            out = dst / rel.with_suffix("")
            out.parent.mkdir(parents=True, exist_ok=True)
            with gzip.open(path, "rb") as fin, open(out, "wb") as fout:
                shutil.copyfileobj(fin, fout)
        else:
            out = dst / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, out)


def real_series_dir(name: str) -> Path:
    """A folder of plain (uncompressed) DICOM files for one real series folder or archive.

    Parameters
    ----------
    name
        A key of :data:`REAL_SERIES`, or a path relative to ``shared/data`` (folder or ``.zip``).

    Returns
    -------
    Path
        The original folder when it holds no ``.gz`` file (read-only), else an unpacked copy in the
        session temporary folder (``.gz`` gunzipped, other files copied); for a ``.zip``, the folder
        it was extracted into.
    """
    rel = REAL_SERIES.get(name, name)
    with _LOCK:
        if rel in _CACHE:
            return _CACHE[rel]
        src = real_data_root() / rel
        if not src.exists():
            raise FileNotFoundError(f"no real series {name!r} at {src}")
        if src.is_file() and src.suffix == ".zip":
            dst = _session_tmp() / rel.replace("/", "__")
            with zipfile.ZipFile(src) as archive:
                archive.extractall(dst)
        elif src.is_dir() and any(p.suffix == ".gz" for p in src.rglob("*.gz")):
            dst = _session_tmp() / rel.replace("/", "__")
            _unpack_folder(src, dst)
        elif src.is_dir():
            dst = src
        else:
            raise ValueError(f"{src} is neither a folder nor a .zip archive")
        _CACHE[rel] = dst
        return dst
