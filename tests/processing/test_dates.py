import datetime as dt

import pytest

from processing.dates import dicom_date


@pytest.mark.parametrize(
    "value, expected",
    [
        ("20260105", dt.date(2026, 1, 5)),
        ("20260105093000.000000", dt.date(2026, 1, 5)),  # DT
        (" 20260105 ", dt.date(2026, 1, 5)),
        ("2026-01-05", dt.date(2026, 1, 5)),  # ISO, as the index stores it
        (dt.datetime(2026, 1, 5, 9, 30), dt.date(2026, 1, 5)),
        (dt.date(2026, 1, 5), dt.date(2026, 1, 5)),
        ("20261305", None),
        ("2026", None),
        ("", None),
        (None, None),
        ("garbage!", None),
    ],
)
def test_dicom_date(value, expected):
    assert dicom_date(value) == expected
