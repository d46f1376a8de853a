"""Sending to a receiver that prefers another transfer syntax than the stored one."""

from __future__ import annotations

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import MRImageStorage

from node.scu import PeerAddress, send_files
from tests.node.dicom_factory import write_mr_series


def test_explicit_vr_files_reach_a_receiver_that_prefers_implicit_vr(tmp_path):
    """regression: pynetdicom SCPs accept the first syntax they know (implicit VR); one context
    holding [explicit, implicit] then left the explicit-VR file without a matching context."""
    paths = write_mr_series(tmp_path / "in", 3)
    received: list[str] = []

    def on_store(event):
        received.append(event.context.transfer_syntax)
        return 0x0000

    scp = AE(ae_title="RECEIVER")
    # implicit first: what a pynetdicom receiver picks when offered both in one context
    scp.add_supported_context(MRImageStorage, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
    server = scp.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        port = server.server_address[1]
        results = send_files(
            paths, PeerAddress("RECEIVER", "127.0.0.1", port), calling_ae="SPINENODE", timeout_s=20
        )
    finally:
        server.shutdown()
    assert [r.status for r in results] == [0, 0, 0]
    assert received == [ExplicitVRLittleEndian] * 3
