"""Acquisition protocol of the phantom: series, grids, b-values, flip angles, timing.

Units: TR/TE/TI in ms (as DICOM writes them), b in s/mm², flip angles in degrees, times in s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

SIZES = ("full", "small")

#: field strength (T), and the r1 relaxivity of gadoterate meglumine in plasma at 3 T (/mM/s),
#: Rohrer M et al., Invest Radiol 2005;40:715-724 (3.5 L/mmol/s at 3 T, 37 °C).
FIELD_STRENGTH_T = 3.0
R1_PER_MM_PER_S = 3.5
HCT = 0.42
BOLUS_ARRIVAL_S = 30.0
CONTRAST_AGENT = "Gadoterate meglumine (Dotarem) 0.5 mmol/mL"
CONTRAST_DOSE_MMOL_PER_KG = 0.1
#: gadolinium content of a 0.5 mmol/mL agent in mg/mL (0.5 mmol/mL x 157.25 mg/mmol)
GADOLINIUM_MG_PER_ML = 78.6

#: field strengths (T) the phantom can declare (the tabulated fields of processing.relaxivity)
FIELD_STRENGTHS_T = (1.5, 3.0)


@dataclass(frozen=True)
class ContrastAgent:
    """A contrast agent the phantom can declare (Contrast/Bolus module and signal simulation).

    ``generic`` is a key of :data:`processing.relaxivity.R1_PLASMA_ROHRER_2005`; the true r1 of a
    phantom is that table's value at its field strength. ``sct`` names the SNOMED CT concept
    (pydicom ``codes.SCT`` keyword) written in the Enhanced Contrast/Bolus Agent Sequence.
    """

    generic: str
    agent_text: str  # Contrast/Bolus Agent (0018,0010)
    sct: str
    mmol_per_ml: float
    dose_mmol_per_kg: float = 0.1

    @property
    def gadolinium_mg_per_ml(self) -> float:
        """Contrast/Bolus Ingredient Concentration (Gd, mg/mL; 157.25 mg/mmol)."""
        return round(self.mmol_per_ml * 157.25, 1)


#: agents the phantom declares (``--contrast-agent``), by generic name
CONTRAST_AGENTS: dict[str, ContrastAgent] = {
    a.generic: a
    for a in (
        ContrastAgent("gadoterate", CONTRAST_AGENT, "GadoterateMeglumine", 0.5),
        ContrastAgent("gadobutrol", "Gadobutrol (Gadovist) 1.0 mmol/mL", "Gadobutrol", 1.0),
        ContrastAgent("gadoteridol", "Gadoteridol (ProHance) 0.5 mmol/mL", "Gadoteridol", 0.5),
        ContrastAgent(
            "gadobenate",
            "Gadobenate dimeglumine (MultiHance) 0.5 mmol/mL",
            "GadobenateDimeglumine",
            0.5,
        ),
        ContrastAgent(
            "gadopentetate",
            "Gadopentetate dimeglumine (Magnevist) 0.5 mmol/mL",
            "GadopentetateDimeglumine",
            0.5,
        ),
        ContrastAgent("gadodiamide", "Gadodiamide (Omniscan) 0.5 mmol/mL", "Gadodiamide", 0.5),
        ContrastAgent(
            "gadoxetate",
            "Gadoxetate disodium (Primovist) 0.25 mmol/mL",
            "GadoxetateDisodium",
            0.25,
            dose_mmol_per_kg=0.025,
        ),
    )
}


def contrast_truth(agent: str, field_strength_t: float) -> dict[str, Any]:
    """The declared agent and its true r1 (plasma, Rohrer 2005) at ``field_strength_t``."""
    from processing.relaxivity import R1_PLASMA_ROHRER_2005

    if agent not in CONTRAST_AGENTS:
        raise ValueError(
            f"unknown phantom contrast agent {agent!r}; choose one of {sorted(CONTRAST_AGENTS)}"
        )
    if float(field_strength_t) not in FIELD_STRENGTHS_T:
        raise ValueError(
            f"phantom field strength must be one of {FIELD_STRENGTHS_T} T, got {field_strength_t}"
        )
    a = CONTRAST_AGENTS[agent]
    return {
        "generic": a.generic,
        "agent_text": a.agent_text,
        "sct": a.sct,
        "mmol_per_ml": a.mmol_per_ml,
        "dose_mmol_per_kg": a.dose_mmol_per_kg,
        "gadolinium_mg_per_ml": a.gadolinium_mg_per_ml,
        "field_strength_t": float(field_strength_t),
        "r1_per_mM_per_s": R1_PLASMA_ROHRER_2005[agent][float(field_strength_t)],
        "r1_source": "Rohrer et al. Invest Radiol 2005;40:715-724, plasma 37 °C",
    }


#: DWI b-values (s/mm²) and number of directions per shell
DWI_SHELLS: tuple[tuple[float, int], ...] = (
    (0.0, 1),
    (50.0, 3),
    (100.0, 3),
    (400.0, 3),
    (800.0, 3),
    (1000.0, 15),
    (1500.0, 3),
    (2000.0, 15),
)
#: two-point high-b body protocol (Canon/Siemens body DWI): b 0 and one b 1500 shell, 3 directions
TWO_POINT_SHELLS: tuple[tuple[float, int], ...] = ((0.0, 1), (1500.0, 3))
#: diffusion schemes the phantom can acquire (``--diffusion-scheme``)
DIFFUSION_SCHEMES: dict[str, tuple[tuple[float, int], ...]] = {
    "standard": DWI_SHELLS,
    "two-point": TWO_POINT_SHELLS,
}
#: b-values (s/mm²) over which the phantom's scanner computes its ADC series, per scheme
#: (``--scanner-maps``): every shell up to b 1000 — as Siemens' inline ADC does with the b-values
#: of its protocol — or both points of a two-point scheme
SCANNER_ADC_BVALUES: dict[str, tuple[float, ...]] = {
    "standard": (0.0, 50.0, 100.0, 400.0, 800.0, 1000.0),
    "two-point": (0.0, 1500.0),
}
#: b-value (s/mm²) of the high-b trace volume of the scanner's TRACEW series, per scheme
SCANNER_TRACE_B: dict[str, float] = {"standard": 1000.0, "two-point": 1500.0}


@dataclass(frozen=True)
class SeriesProtocol:
    role: str
    series_number: int
    description: str
    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    tr_ms: float
    te_ms: float
    flip_deg: float
    ti_ms: float | None = None
    snr: float = 40.0  # tumour signal / noise sigma (at b = 0 for DWI, pre-contrast for DCE)
    scanning_sequence: tuple[str, ...] = ("SE",)
    sequence_variant: tuple[str, ...] = ("SK",)
    acquisition_type: str = "2D"
    orientation: str = "axial"

    @property
    def key(self) -> str:
        """Key of the series in ground_truth.json: the role, suffixed for a sagittal series."""
        return self.role if self.orientation == "axial" else f"{self.role}_sag"

    @property
    def direction(self) -> tuple[float, ...]:
        """Row-major direction matrix (columns: row, column, slice normal) in LPS."""
        if self.orientation == "sagittal":
            # rows run anterior->posterior, columns superior->inferior; normal = row x column
            return (0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0)
        return (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@dataclass(frozen=True)
class Protocol:
    size_name: str
    series: tuple[SeriesProtocol, ...]
    vfa_flip_deg: tuple[float, ...]
    dce_frames: int
    dce_dt_s: float
    dwi_shells: tuple[tuple[float, int], ...] = DWI_SHELLS
    diffusion_scheme: str = "standard"

    def by_role(self, role: str) -> SeriesProtocol:
        for s in self.series:
            if s.role == role:
                return s
        raise KeyError(role)


def protocol_for(
    size: str, *, sagittal: bool = False, diffusion_scheme: str = "standard"
) -> Protocol:
    """The phantom's MR protocol for ``size`` ('full' or 'small'), optionally with a sagittal T2w.

    ``diffusion_scheme`` 'standard' (b 0-2000, 8 shells) or 'two-point' (b 0 + b 1500 x 3).
    """
    if diffusion_scheme not in DIFFUSION_SCHEMES:
        raise ValueError(
            f"unknown diffusion scheme {diffusion_scheme!r}; choose one of "
            f"{sorted(DIFFUSION_SCHEMES)}"
        )
    vfa: tuple[float, ...]
    if size == "full":
        anat = ((256, 256, 25), (0.78125, 0.78125, 4.0))
        dwi = ((112, 112, 20), (1.8, 1.8, 5.0))
        dce = ((128, 128, 20), (1.5625, 1.5625, 4.0))
        vfa, frames, dt = (2.0, 5.0, 10.0, 15.0, 20.0), 60, 4.5
        sag = ((320, 320, 15), (0.875, 0.875, 3.0))
    elif size == "small":
        anat = ((128, 128, 16), (1.5625, 1.5625, 5.0))
        dwi = ((64, 64, 12), (3.125, 3.125, 5.0))
        dce = ((64, 64, 10), (3.125, 3.125, 5.0))
        vfa, frames, dt = (3.0, 10.0, 20.0), 40, 5.0
        sag = ((160, 160, 11), (1.75, 1.75, 4.0))
    else:
        raise ValueError(f"unknown phantom size {size!r}; choose one of {SIZES}")
    series: tuple[SeriesProtocol, ...] = (
        SeriesProtocol(
            "t2w", 2, "T2 TSE AX", *anat, tr_ms=4000.0, te_ms=100.0, flip_deg=150.0, snr=40.0
        ),
        SeriesProtocol(
            "t1w", 3, "T1 TSE AX", *anat, tr_ms=600.0, te_ms=10.0, flip_deg=150.0, snr=40.0
        ),
        SeriesProtocol(
            "stir",
            4,
            "STIR AX",
            *anat,
            tr_ms=5000.0,
            te_ms=60.0,
            flip_deg=150.0,
            ti_ms=round(float(np.log(2.0) * 380.0), 1),
            snr=30.0,
            scanning_sequence=("IR", "SE"),
            sequence_variant=("SK", "SP"),
        ),
        SeriesProtocol(
            "dwi",
            5,
            "DWI IVIM DKI AX" if diffusion_scheme == "standard" else "DWI AX b0 b1500",
            *dwi,
            tr_ms=5000.0,
            te_ms=70.0,
            flip_deg=90.0,
            snr=80.0,
            scanning_sequence=("EP",),
            sequence_variant=("SK", "SP"),
        ),
        SeriesProtocol(
            "vfa_t1",
            6,
            "T1 MAP VFA 3D",
            *dce,
            tr_ms=4.0,
            te_ms=1.5,
            flip_deg=15.0,
            snr=60.0,
            scanning_sequence=("GR",),
            sequence_variant=("SP", "SS"),
            acquisition_type="3D",
        ),
        SeriesProtocol(
            "dce",
            7,
            "DCE 3D SPGR AX",
            *dce,
            tr_ms=4.0,
            te_ms=1.5,
            flip_deg=15.0,
            snr=60.0,
            scanning_sequence=("GR",),
            sequence_variant=("SP", "SS"),
            acquisition_type="3D",
        ),
    )
    if sagittal:
        series = series + (
            SeriesProtocol(
                "t2w",
                8,
                "T2 TSE SAG",
                *sag,
                tr_ms=3500.0,
                te_ms=100.0,
                flip_deg=150.0,
                snr=40.0,
                orientation="sagittal",
            ),
        )
    return Protocol(
        size, series, vfa, frames, dt, DIFFUSION_SCHEMES[diffusion_scheme], diffusion_scheme
    )


def gradient_directions(n: int) -> NDArray[np.float64]:
    """``n`` well-spread unit vectors on a hemisphere (Fibonacci lattice), LPS."""
    if n == 1:
        return np.array([[0.0, 0.0, 1.0]])
    if n == 3:
        return np.eye(3)
    i = np.arange(n) + 0.5
    z = 1.0 - i / n  # upper hemisphere
    phi = np.pi * (1 + 5**0.5) * i
    r = np.sqrt(1 - z**2)
    v = np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)
    unit: NDArray[np.float64] = np.round(v / np.linalg.norm(v, axis=1, keepdims=True), 6)
    return unit


def dwi_volumes(
    shells: tuple[tuple[float, int], ...] = DWI_SHELLS,
) -> list[tuple[float, NDArray[np.float64]]]:
    """(b, unit gradient in LPS) per DWI volume in acquisition order; b = 0 has a zero vector."""
    volumes: list[tuple[float, NDArray[np.float64]]] = []
    for b, n in shells:
        if b == 0:
            volumes.append((0.0, np.zeros(3)))
            continue
        for g in gradient_directions(n):
            volumes.append((b, g / np.linalg.norm(g)))
    return volumes


#: b-value subsets a mono-exponential ADC fit may use (ground_truth ``adc_by_bvalues``)
ADC_SUBSETS: dict[str, tuple[float, ...]] = {
    "b50-1000": (50.0, 100.0, 400.0, 800.0, 1000.0),
    "b0,1000": (0.0, 1000.0),
    "b0,800": (0.0, 800.0),
    "b0-1000": (0.0, 50.0, 100.0, 400.0, 800.0, 1000.0),
    "b50,800": (50.0, 800.0),
    "b50,1000": (50.0, 1000.0),
    "b100-1000": (100.0, 400.0, 800.0, 1000.0),
    "b400-1000": (400.0, 800.0, 1000.0),
}
#: further ADC subsets recorded for the two-point scheme
TWO_POINT_ADC_SUBSETS: dict[str, tuple[float, ...]] = {"b0,1500": (0.0, 1500.0)}
#: b-value subsets for the apparent-kurtosis truth (OLS of ln S = ln S0 − bD + b²D²K/6)
KURTOSIS_SUBSETS: dict[str, tuple[float, ...]] = {
    "b0-2000": (0.0, 50.0, 100.0, 400.0, 800.0, 1000.0, 1500.0, 2000.0),
    "b400-2000": (400.0, 800.0, 1000.0, 1500.0, 2000.0),
    "b0,1000,2000": (0.0, 1000.0, 2000.0),
}
