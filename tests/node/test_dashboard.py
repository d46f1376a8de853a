"""Dashboard (issue 9, acceptances 3 and 5).

A node index is populated the way the node fills it: studies indexed, stability and analysis
events, a lesion timeline (``record_analysis``), follow-up windows, and results that really failed
to reach a dead PACS through the real outbox and dispatcher. Then:

* the Flask test client checks the pages and the access rules (a non-local client without login
  gets 403 and no patient data; with a configured login it must log in first);
* Debian's chromium, driven headless by Selenium through chromedriver, shows the worklist with the
  failed study and its reason, presses Re-queue (the outbox item is queued again) and renders the
  trend plot (screenshot saved in the test's tmp dir).
"""

from __future__ import annotations

import datetime as dt
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
from werkzeug.security import generate_password_hash

from node.config import Settings, settings_from_mapping
from node.dashboard import (
    DashboardActions,
    DashboardSection,
    DashboardServer,
    create_app,
    requeue_failed_outputs,
    study_states,
    worklist_text,
)
from node.dashboard.state import outbox_reason
from node.dispatch import Dispatcher, Outbox
from node.followup import FollowupSection, FollowupTracker
from node.index import Index
from node.store import Store
from node.timeline import record_analysis
from tests.node.conftest import free_port
from tests.node.dicom_factory import PHI_TOKENS, write_mr_series
from tests.node.test_followup import FakeClock, add_mr_study
from tests.node.test_timeline import STUDIES, TRACKING_UID, TREATMENT, build_summary

BASELINE, FOLLOW_UP_1, FOLLOW_UP_2 = (uid for uid, _ in STUDIES)
RECEIVING = "2.25.4000"
WAITING = "2.25.5000"
ANALYSIS_ERROR = "ValueError: Input X contains NaN"
#: identifiers of the test patient (tests.node.test_followup.add_mr_study)
PHI = PHI_TOKENS


@dataclass
class Node:
    index: Index
    outbox: Outbox
    settings: Settings


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    storage = tmp_path / "storage"
    settings = settings_from_mapping(
        {
            "node": {"storage": str(storage), "dimse_timeout_s": 5},
            "peers": [{"ae_title": "DEADPACS", "port": free_port(), "may_receive": True}],
            "dispatch": {"max_tries": 1},
        }
    )
    index = Index(settings.node.database_path)
    outbox = Outbox(index, Store(storage, index), settings)
    for uid, days in STUDIES:
        add_mr_study(index, uid, TREATMENT + dt.timedelta(days=days))
        index.mark_stable(uid)
    add_mr_study(index, WAITING, TREATMENT + dt.timedelta(days=300))
    index.mark_stable(WAITING)
    add_mr_study(index, RECEIVING, TREATMENT + dt.timedelta(days=301))
    for uid in (BASELINE, FOLLOW_UP_1):
        index.add_event("analysis_started", study_uid=uid)
        index.add_event("analysis_done", study_uid=uid, detail="6 objects")
    index.add_event("analysis_started", study_uid=FOLLOW_UP_2)
    index.add_event("analysis_failed", study_uid=FOLLOW_UP_2, detail=ANALYSIS_ERROR)
    index.add_event(
        "analysis_waiting",
        study_uid=WAITING,
        detail="no baseline MR study within 90 days before the course",
    )
    # the follow-up's results fail to reach the dead PACS (max_tries 1)
    outbox.enqueue(
        write_mr_series(tmp_path / "results", 2, rows=8, columns=8),
        "DEADPACS",
        outbox_reason(FOLLOW_UP_1),
    )
    Dispatcher(outbox, settings).run_once()
    assert outbox.counts() == {"failed": 2}
    record_analysis(index, 1, build_summary())
    FollowupTracker(
        index, FollowupSection(), clock=FakeClock(TREATMENT + dt.timedelta(days=200))
    ).update_patient(1, build_summary())
    yield Node(index, outbox, settings)
    index.close()


#: loopback clients without login: set on purpose (the default requires a login, issue 17)
LOCAL = DashboardSection(allow_local_without_login=True)


def _client(node: Node, section: DashboardSection = LOCAL):  # noqa: ANN202
    actions = DashboardActions(
        requeue=lambda uid: requeue_failed_outputs(node.outbox, node.index, uid)
    )
    return create_app(node.index, section, actions=actions).test_client()


def test_worklist_states_and_reasons(node: Node) -> None:
    states = {s.study_uid: s for s in study_states(node.index)}
    assert states[BASELINE].state == "analysed"
    assert states[FOLLOW_UP_1].state == "failed"
    assert "sending failed: 2 object(s) after 1 tries" in states[FOLLOW_UP_1].reason
    assert "not established" in states[FOLLOW_UP_1].reason
    assert states[FOLLOW_UP_1].can_requeue
    assert states[FOLLOW_UP_2].state == "failed"
    assert states[FOLLOW_UP_2].reason == f"analysis failed: {ANALYSIS_ERROR}"
    assert states[WAITING].state == "waiting for baseline"
    assert "no baseline" in states[WAITING].reason
    assert states[RECEIVING].state == "receiving"
    # the same worklist for `spine-node status`, without patient identifiers
    text = worklist_text(node.index)
    assert f"#1  failed                {FOLLOW_UP_2}" in text
    assert f"analysis failed: {ANALYSIS_ERROR}" in text
    assert not [token for token in PHI if token in text]


def test_local_pages(node: Node) -> None:
    client = _client(node)
    page = client.get("/").get_data(as_text=True)
    assert FOLLOW_UP_1 in page and ANALYSIS_ERROR in page and "Re-queue" in page
    patient = client.get("/patients/1").get_data(as_text=True)
    assert "GTV L2" in patient and "indeterminate - possible pseudoprogression" in patient
    assert "(+15 %*)" in patient and "6-12 weeks" in patient
    assert 'state-missed">' not in patient  # nothing missed yet (clock at day 200)
    trend = client.get(f"/patients/1/lesions/{TRACKING_UID}/trend.png")
    assert trend.status_code == 200 and trend.mimetype == "image/png"
    assert trend.data.startswith(b"\x89PNG")
    assert "DEADPACS" in client.get("/outbox").get_data(as_text=True)
    assert "confirmation after" in client.get("/followups").get_data(as_text=True)
    assert client.get("/associations").status_code == 200
    assert client.get("/patients/99").status_code == 404
    # actions are POST forms with the session's token
    assert client.post(f"/studies/{FOLLOW_UP_1}/requeue").status_code == 400
    assert node.outbox.counts() == {"failed": 2}


REMOTE = {"REMOTE_ADDR": "10.20.30.40"}
PATIENT_PATHS = (
    "/",
    "/outbox",
    "/patients",
    "/patients/1",
    "/followups",
    "/associations",
    f"/patients/1/lesions/{TRACKING_UID}/trend.png",
)


def _no_patient_data(body: bytes) -> None:
    text = body.decode("latin-1")
    for token in (*PHI, BASELINE, FOLLOW_UP_1, TRACKING_UID, "GTV L2"):
        assert token not in text


def test_remote_client_without_login_gets_no_patient_data(node: Node) -> None:
    client = _client(node)
    for path in PATIENT_PATHS:
        response = client.get(path, environ_base=REMOTE)
        assert response.status_code == 403, path
        _no_patient_data(response.data)
    response = client.post(f"/studies/{FOLLOW_UP_1}/requeue", environ_base=REMOTE)
    assert response.status_code == 403
    assert node.outbox.counts() == {"failed": 2}
    # and the loopback test client sees them
    assert client.get("/").status_code == 200


def test_remote_client_must_log_in(node: Node) -> None:
    section = DashboardSection(
        bind_address="0.0.0.0",
        username="onc",
        password_hash=generate_password_hash("s3cret", method="pbkdf2:sha256:20000"),
    )
    client = _client(node, section)
    for path in PATIENT_PATHS:
        response = client.get(path, environ_base=REMOTE)
        assert response.status_code == 302 and response.headers["Location"] == "/login"
        _no_patient_data(response.data)
    login = client.get("/login", environ_base=REMOTE)
    _no_patient_data(login.data)
    token = login.get_data(as_text=True).split('name="csrf" value="')[1].split('"')[0]
    wrong = client.post(
        "/login", data={"csrf": token, "username": "onc", "password": "nope"}, environ_base=REMOTE
    )
    assert "Wrong user or password" in wrong.get_data(as_text=True)
    _no_patient_data(wrong.data)
    assert client.get("/", environ_base=REMOTE).status_code == 302
    client.get("/patients/1", environ_base=REMOTE)  # where to go after the login
    ok = client.post(
        "/login", data={"csrf": token, "username": "onc", "password": "s3cret"}, environ_base=REMOTE
    )
    assert ok.status_code == 302 and ok.headers["Location"].endswith("/patients/1")
    assert "GTV L2" in client.get("/patients/1", environ_base=REMOTE).get_data(as_text=True)
    client.get("/logout", environ_base=REMOTE)
    assert client.get("/", environ_base=REMOTE).status_code == 302


def test_non_loopback_bind_requires_login() -> None:
    with pytest.raises(ValueError, match="password_hash are required"):
        DashboardSection(bind_address="0.0.0.0")
    with pytest.raises(ValueError, match="both or neither"):
        DashboardSection(username="onc")


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.fail("chromium and chromium-driver are needed: run `make sysdeps`")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _row(driver: object, study_uid: str) -> object:
    from selenium.webdriver.common.by import By

    selector = f'tr[data-study="{study_uid}"]'
    return driver.find_element(By.CSS_SELECTOR, selector)  # type: ignore[attr-defined]


def test_dashboard_in_headless_chromium(node: Node, browser: object, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser
    actions = DashboardActions(
        requeue=lambda uid: requeue_failed_outputs(node.outbox, node.index, uid)
    )
    server = DashboardServer(create_app(node.index, LOCAL, actions=actions), "127.0.0.1", 0).start()
    try:
        driver.get(server.url + "/")  # type: ignore[attr-defined]
        row = _row(driver, FOLLOW_UP_1)
        assert row.find_element(By.CLASS_NAME, "state").text == "failed"
        assert "sending failed" in row.find_element(By.CLASS_NAME, "reason").text
        analysis = _row(driver, FOLLOW_UP_2)
        assert analysis.find_element(By.CLASS_NAME, "state").text == "failed"
        assert ANALYSIS_ERROR in analysis.find_element(By.CLASS_NAME, "reason").text
        driver.save_screenshot(str(tmp_path / "worklist.png"))  # type: ignore[attr-defined]

        row.find_element(By.CSS_SELECTOR, "button.requeue").click()
        WebDriverWait(driver, 10).until(
            expected_conditions.presence_of_element_located((By.ID, "flash"))
        )
        flash = driver.find_element(By.ID, "flash")  # type: ignore[attr-defined]
        assert "2 object(s)" in flash.text
        assert _row(driver, FOLLOW_UP_1).find_element(By.CLASS_NAME, "state").text == "sending"
        assert node.outbox.counts() == {"queued": 2}
        assert [e["study_uid"] for e in node.index.events("outbox_requeued")] == [FOLLOW_UP_1]

        driver.get(server.url + "/patients/1")  # type: ignore[attr-defined]
        image = driver.find_element(By.CSS_SELECTOR, "img.trend")  # type: ignore[attr-defined]
        WebDriverWait(driver, 20).until(
            lambda d: d.execute_script(
                "return arguments[0].complete && arguments[0].naturalWidth", image
            )
        )
        assert driver.execute_script(  # type: ignore[attr-defined]
            "return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image
        ) == [800, 600]
        shot = tmp_path / "patient-trend.png"
        # the criteria listed above the plot vary in length: bring the plot into the viewport
        driver.execute_script("arguments[0].scrollIntoView(true)", image)  # type: ignore[attr-defined]
        image.screenshot(str(shot))
        pixels = mpimg.imread(shot)
        assert pixels.shape[0] > 300 and float(np.std(pixels[..., :3])) > 0.05
        driver.save_screenshot(str(tmp_path / "patient.png"))  # type: ignore[attr-defined]
    finally:
        server.stop()


def test_reanalyse_button_runs_the_real_worker(tmp_path: Path) -> None:
    """Re-analyse from the dashboard: the node's AnalysisWorker runs the chain (in its child
    process) for the study's patient; with MR images only there is no RT course, so the study
    ends up *waiting* with the chain's reason."""
    import time

    from node.dashboard import reanalyse_action
    from node.ingest import import_files
    from node.service import NodeService
    from node.worker import AnalysisWorker

    settings = settings_from_mapping({"node": {"storage": str(tmp_path / "storage"), "port": 0}})
    service = NodeService(settings)
    worker = AnalysisWorker(service)
    service.scheduler.start()
    try:
        files = write_mr_series(tmp_path / "mr", 2, rows=8, columns=8)
        assert import_files(service.store, files).stored
        (study_uid,) = [r[0] for r in service.index.query("SELECT study_uid FROM studies")]
        service.index.mark_stable(study_uid)
        client = create_app(
            service.index,
            LOCAL,
            actions=DashboardActions(reanalyse=reanalyse_action(service, worker)),
        ).test_client()
        page = client.get("/").get_data(as_text=True)
        token = page.split('name="csrf" value="')[1].split('"')[0]
        response = client.post(f"/studies/{study_uid}/reanalyse", data={"csrf": token})
        assert response.status_code == 302
        assert [e["study_uid"] for e in service.index.events("analysis_requeued")] == [study_uid]
        deadline = time.monotonic() + 90
        while not (
            service.index.events("analysis_waiting") or service.index.events("analysis_failed")
        ):
            assert time.monotonic() < deadline, "the analysis did not finish"
            time.sleep(0.2)
        (state,) = study_states(service.index)
        assert state.state == "waiting" and state.reason, (state.state, state.reason)
    finally:
        service.scheduler.shutdown(wait=True)
        worker.stop()
        service.index.close()


def test_start_dashboard_serves_a_running_node(tmp_path: Path) -> None:
    """``start_dashboard(service)`` as ``spine-node serve`` calls it: configured port (0: free),
    loopback by default, worklist over real HTTP."""
    import urllib.request

    from node.dashboard import start_dashboard
    from node.service import NodeService

    settings = settings_from_mapping(
        {
            "node": {"storage": str(tmp_path / "storage"), "port": 0},
            "dashboard": {"port": 0, "allow_local_without_login": True},
        }
    )
    service = NodeService(settings)
    service.start()
    server = start_dashboard(service)
    try:
        assert server is not None and server.address[0] == "127.0.0.1"
        with urllib.request.urlopen(server.url + "/", timeout=10) as response:
            assert response.status == 200 and b"Worklist" in response.read()
    finally:
        if server is not None:
            server.stop()
        service.stop()
    disabled = settings_from_mapping(
        {"node": {"storage": str(tmp_path / "s2")}, "dashboard": {"enabled": False}}
    )

    class _Service:
        settings = disabled

    assert start_dashboard(_Service()) is None


def test_coalesced_reanalysis_takes_the_patients_next_outcome(node: Node) -> None:
    """A re-analysis request coalesced into a run another study of the patient triggered shows
    that run's outcome, not 'analysing' forever."""
    node.index.add_event("analysis_requeued", study_uid=FOLLOW_UP_2)
    node.index.add_event("analysis_coalesced", study_uid=FOLLOW_UP_2)
    assert {s.study_uid: s.state for s in study_states(node.index)}[FOLLOW_UP_2] == "analysing"
    node.index.add_event("analysis_started", study_uid=BASELINE)
    node.index.add_event("analysis_done", study_uid=BASELINE, detail="54 objects")
    state = {s.study_uid: s for s in study_states(node.index)}[FOLLOW_UP_2]
    assert (state.state, state.reason) == ("analysed", "54 objects")
