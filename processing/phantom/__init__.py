r"""Synthetic CyberKnife spine patients with known answers (``spine-node phantom``).

Pure: :func:`generate_patient` builds numpy arrays, pydicom Datasets (lazily, through
:meth:`Phantom.iter_datasets`, or as Part 10 bytes through :meth:`Phantom.iter_files`) and the
ground-truth dict in memory; ``node/commands/phantom.py``
writes them to disk. Deterministic for (seed, scenario, vendor, size): same pixel data and UIDs
(``2.25.<uuid5>``). Different vendors/scenarios/sizes of one seed are different patients (their
identifiers and UIDs differ), so they can coexist on one node.

Output layout (other packages and tests depend on it)
-----------------------------------------------------
::

    DIR/baseline/series002/00001.dcm ...   T2w (series number 2)
    DIR/baseline/series003/...             T1w
    DIR/baseline/series004/...             STIR
    DIR/baseline/series005/...             DWI (b 0,50,100,400,800,1000,1500,2000)
    DIR/baseline/series006/...             VFA T1 (3D SPGR, 3-5 flip angles, same TR); with
                                           vfa_series=True / --vfa-series one series per flip
                                           angle instead: series061, series062, ... (ground
                                           truth ``vfa_t1.separate_series``)
    DIR/baseline/series007/...             DCE (3D SPGR, >= 40 phases at <= 5 s)
    DIR/baseline/series008/...             sagittal T2w (only with sagittal=True / --sagittal;
                                           ground-truth key "t2w_sag", role "t2w")
    DIR/baseline/series051/...             scanner TRACEW series (only with scanner_maps=True /
                                           --scanner-maps; key "dwi_trace", role "trace"): Image
                                           Type DERIVED\PRIMARY\DIFFUSION\TRACEW, the b 0 image
                                           and the geometric mean over directions of the stored
                                           high-b images (b 1000, or 1500 for two-point), b-value
                                           in the variant's own diffusion tags (isotropic)
    DIR/baseline/series052/...             scanner ADC series (same option; key "adc_scanner",
                                           role "adc_map"): DERIVED\PRIMARY\DIFFUSION\ADC,
                                           uint16 in 1e-6 mm2/s, OLS log-linear fit of the
                                           noiseless signal over b 0-1000 (two-point: b 0, 1500);
                                           expected values in the tumour truth ``scanner_adc``
    DIR/baseline/series005/PS_0001.dcm,    with non_image_objects=True / --non-image-objects: a
                    .../XX_0001.dcm        presentation state (own series) and a Philips private
                                           non-image object (the DWI series' UID), as CD exports
    DIR/rt/rtplan.dcm, rtstruct.dcm, rtdose.dcm
    DIR/followup1/series00N/...            same series, later study (followup2 ...)
    DIR/ground_truth.json

Sizes: ``full`` (T2w/T1w/STIR 256x256x25 at 0.78x0.78x4 mm, DWI 112x112x20 at 1.8x1.8x5 mm,
VFA/DCE 128x128x20 at 1.56x1.56x4 mm, 5 flip angles, 60 phases at 4.5 s) and ``small``
(128x128x16 at 1.56x1.56x5, 64x64x12 at 3.125x3.125x5, 64x64x10 at 3.125x3.125x5, 3 flip angles,
40 phases at 5 s). Both have the full b-value/direction scheme (b 0; 50, 100, 400, 800, 1500 x 3;
1000 and 2000 x 15 directions); ``diffusion_scheme='two-point'`` / ``--diffusion-scheme
two-point`` acquires b 0 + b 1500 x 3 directions instead (ground truth ``adc_by_bvalues`` then
has "b0,1500"). Any non-default encoding option makes another patient (distinct UIDs).
A full patient takes ~10-20 s, a small one ~3-6 s.

Folder names do not reveal the role (``ground_truth.json`` maps them). In classic files the file
``NNNNN.dcm`` is InstanceNumber NNNNN: volume-major (all slices of volume 0, then volume 1 ...),
slices from inferior to superior. With ``vendor='enhanced'`` every series is one file
``00001.dcm`` (Enhanced MR Image Storage) whose frames follow the same order.

ground_truth.json (units in the keys or in ``mean_units``)
----------------------------------------------------------
- ``patient``: PatientName ``PHANTOM^<seed>``, PatientID ``PHID-<seed>-...``, PatientBirthDate —
  recognisable strings for log-leak tests.
- ``course``: machine, fractions, dose per fraction, total dose, treatment/plan/review dates,
  treated level, BED10, and per RT object its SOP Instance UID and facts (beams, ROIs, dose grid).
- ``studies.<key>``: StudyInstanceUID, FrameOfReferenceUID, StudyDate; ``series.<role>``
  (roles ``t2w t1w stir dwi vfa_t1 dce``): SeriesInstanceUID, folder, geometry (origin, spacing,
  direction, size of one 3D volume in LPS exactly as SimpleITK reports them), acquisition
  parameters, noise sigma; DCE frame times and the AIF samples.
- ``studies.<key>.tumour``: ``volume_ml_continuous`` (analytic surface, 0.2 mm integration) and
  ``volume_ml_voxels_t2w`` (voxel-centre mask on the T2w grid), ``epidural_volume_ml``,
  ``max_3d_diameter_mm``, ``max_axial_diameter_mm``, ``max_craniocaudal_extent_mm`` (of the
  continuous shape in that study's coordinates, accurate to ~0.4 mm; a voxel-corner measurement
  on a grid reads up to about one voxel more), voxel
  counts per grid, ``means`` of every parameter (D, K, f, Dstar, T1_ms, T2_ms, PD, Ktrans, ve,
  vp, kep), ``means_by_series``, ``adc_by_bvalues`` (exact mono-exponential ADC for each b subset
  a fit may use: mean over tumour voxels of the per-voxel OLS log-linear ADC of the noiseless
  direction-averaged signal), ``kurtosis_by_bvalues`` (same for the DKI signal equation),
  ``dki_tensor_fit_noiseless`` (tumour-mean MK/MD that dipy's DKI model returns on the noiseless
  signal for b subsets "all", "b0+b400-2000", "b400-2000": with IVIM perfusion in the signal a
  fit that includes b = 0-100 is biased away from K; b >= 400 recovers K and D), and the
  ``shape`` parameters from which the true mask on any grid is recomputed
  (:func:`true_tumour_mask`, i.e. :meth:`anatomy.TumourShape.contains` after mapping follow-up
  points with ``rigid_transform.followup_to_baseline``).
- follow-ups: ``rigid_transform`` (4x4 matrices follow-up→baseline and baseline→follow-up in LPS
  mm, rotation axis/angle in degrees, translation in mm, the SimpleITK Euler3D parameters),
  ``expected_response`` (a :class:`processing.results.ResponseCategory` value),
  ``days_since_treatment``, ``change_from_baseline``.
- ``dwi_files.<key>``: per DWI file (or per frame for ``enhanced``) its b-value and LPS gradient.

Signal models (docs/science.md §3.4, exactly)
----------------------------------------------
Every series samples the same analytic body at its voxel centres (no partial volume), adds
Rician noise (tumour SNR: T2w/T1w 40, STIR 30, DWI b0 80, VFA/DCE 60) and stores uint16 with one
scale per series. T2w/T1w: PD·(1 − e^(−TR/T1))·e^(−TE/T2); STIR adds the inversion with TI =
ln2·T1(fat). DWI: S0·[f·e^(−b·D*) + (1 − f)·e^(−b·D + b²D²K/6)], isotropic, so every direction
has the same noiseless signal. VFA and DCE: SPGR, R1 = 1/T10 + r1·C with the true r1 of the
declared agent at the declared field strength (``contrast_agent`` / ``--contrast-agent``, default
gadoterate; ``field_strength`` / ``--field-strength`` 1.5 or 3 T, default 3 T; r1 from the Rohrer
2005 plasma table of :mod:`processing.relaxivity`, e.g. 3.5 /mM/s for gadoterate at 3 T, 5.2 for
gadobutrol at 1.5 T; written in Contrast/Bolus Agent and Ingredient and in ground_truth.json
``contrast``); C from the extended Tofts model with the Parker whole-blood AIF (bolus arrival 30 s),
plasma Cp = Cb/(1 − 0.42); aorta voxels carry Cb. Tumour parameters carry a mild smooth texture
(3-5 % SD).

Vendor variants and their deviations from the standard
------------------------------------------------------
- ``standard``: classic MR Image Storage; DWI with DiffusionBValue (0018,9087),
  DiffusionGradientOrientation (0018,9089, LPS) and DiffusionDirectionality at the top level
  (as Philips and Canon classic exports do: dciodvfy warns "not present in standard IOD",
  no error); DCE with TemporalPositionIdentifier, NumberOfTemporalPositions, TemporalResolution
  and per-phase AcquisitionTime; no TriggerTime.
- ``siemens`` (VE11 classic single-frame, as the real Prisma files in ``dwi_dcmqa``): b-value
  (0019,xx0C) IS, directionality (0019,xx0D), gradient (0019,xx0E) FD in LPS (absent for b = 0),
  B_matrix (0019,xx27), private creator "SIEMENS MR HEADER"; the same b-value, gradient,
  B_matrix and SliceNormalVector in the CSA Image Header Info (0029,xx10, "SV10" format,
  creator "SIEMENS CSA HEADER"); no standard diffusion tags; no mosaic (one slice per file);
  DCE without TemporalPositionIdentifier, timing only in AcquisitionTime and private
  TimeAfterStart (0019,xx16, s).
- ``ge``: b-value only as the first value of (0043,xx39) "Slop_int_6" with the +1,000,000,000
  offset (creator "GEMS_PARM_01"); gradient only in (0019,xxBB/BC/BD) (creator "GEMS_ACQU_01")
  in the logical frame: (−row, −column, slice-normal) components of the LPS vector, which
  dcm2niix reads with its GE convention; DCE with TriggerTime (ms from the first phase) on a
  non-gated series — **deviation**: TriggerTime is defined for cardiac-gated acquisitions — and
  NumberOfTemporalPositions but no TemporalPositionIdentifier.
- ``philips`` (older classic export): b-value (2001,xx03) FL and direction flag (2001,xx04)
  ("O" directional, "N" none) with creator "Philips Imaging DD 001"; gradient (2005,xxB0/B1/B2)
  FL RL/AP/FH (= LPS components) with creator "Philips MR Imaging DD 001"; b-value index and
  gradient number (2005,xx12/13) with creator "Philips MR Imaging DD 005"; no standard diffusion
  tags. DCE with TemporalPositionIdentifier, TriggerTime (**deviation**, as for GE), Phase
  Number (2001,xx08), MR Image Dynamic Scan Begin Time (2005,xxA0, s).
- ``enhanced``: one Enhanced MR Image Storage object per series as Siemens XA writes it (see
  :mod:`processing.phantom.enhanced`).

``VENDOR_DEVIATIONS`` lists, per variant, the dciodvfy errors those deviations produce.

RT objects (all vendors): see :mod:`processing.phantom.rt`; RT Dose is stored 16-bit (dciodvfy
cannot parse 32-bit OW dose grids).
"""

from __future__ import annotations

from processing.phantom.mr import VENDOR_DEVIATIONS
from processing.phantom.patient import (
    SCENARIOS,
    VENDORS,
    Phantom,
    generate_patient,
    true_tumour_mask,
)
from processing.phantom.protocol import SIZES

__all__ = [
    "SCENARIOS",
    "SIZES",
    "VENDORS",
    "VENDOR_DEVIATIONS",
    "Phantom",
    "generate_patient",
    "true_tumour_mask",
]
