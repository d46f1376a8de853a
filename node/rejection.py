"""IHE IOCM rejection notes: how a PACS tells the node that instances it sent were wrong.

When images are corrected at the PACS (a repeated or re-reconstructed series, images filed to the
wrong patient or procedure), IHE Imaging Object Change Management (IOCM, IHE RAD TF-1 §36) has the
PACS send a *Rejection Note*: a Key Object Selection Document (PS3.3 A.59) whose document title
(Concept Name Code Sequence) is one of the rejection codes of CID 7011, listing the rejected
instances in its Current Requested Procedure Evidence Sequence. The corrected instances follow
with new UIDs.

The node stores the note like any other instance (it is acknowledged, so it is kept), records the
rejected SOP Instance UIDs in the index (``rejections``; a rejected instance that arrives *after*
its note is hidden too), and leaves the rejected files and the note itself out of every analysis.
Because the note belongs to the study it corrects, the study is re-opened, becomes stable again
(``amended``) and the patient is re-analysed: a corrected baseline recomputes every later delta.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import KeyObjectSelectionDocumentStorage

logger = logging.getLogger(__name__)

#: CID 7011 "Rejected for Quality Reasons" and its siblings (DCM code values -> meaning)
REJECTION_CODES: dict[str, str] = {
    "113001": "Rejected for Quality Reasons",
    "113037": "Rejected for Patient Safety Reasons",
    "113038": "Incorrect Modality Worklist Entry",
    "113039": "Data Retention Policy Expired",
}


@dataclass(frozen=True)
class RejectionNote:
    """What a rejection note says: why, and which instances."""

    note_uid: str
    reason: str  # the code meaning, e.g. "Rejected for Quality Reasons"
    rejected: tuple[str, ...]  # SOP Instance UIDs


def rejection_note(ds: Dataset) -> RejectionNote | None:
    """The rejection carried by ``ds``, or ``None`` when it is not an IOCM rejection note.

    Parameters
    ----------
    ds : pydicom.Dataset
        Any stored instance (only Key Object Selection Documents can be rejection notes).

    Returns
    -------
    RejectionNote or None
        ``None`` for other SOP classes and for key object selections with another title (e.g.
        "For Teaching"), which are ordinary objects.
    """
    if str(ds.get("SOPClassUID", "")) != KeyObjectSelectionDocumentStorage:
        return None
    title = ds.get("ConceptNameCodeSequence") or []
    if not title:
        return None
    code = title[0]
    if (
        str(code.get("CodingSchemeDesignator", "")) != "DCM"
        or str(code.get("CodeValue", "")) not in REJECTION_CODES
    ):
        return None
    rejected = []
    for study in ds.get("CurrentRequestedProcedureEvidenceSequence") or []:
        for series in study.get("ReferencedSeriesSequence") or []:
            for item in series.get("ReferencedSOPSequence") or []:
                uid = str(item.get("ReferencedSOPInstanceUID", "") or "")
                if uid:
                    rejected.append(uid)
    return RejectionNote(
        note_uid=str(ds.SOPInstanceUID),
        reason=REJECTION_CODES[str(code.CodeValue)],
        rejected=tuple(dict.fromkeys(rejected)),
    )
