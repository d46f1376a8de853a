"""The OHIF viewer for tests: its npm build served on loopback, DICOMweb forwarded to Orthanc.

A radiologist reads the node's outputs in a web viewer built on cornerstone3D; the end-to-end
test (``tests/e2e/test_ohif.py``, issue 15) checks them in OHIF 3.13 as a site deploys it:

* :class:`OhifServer` serves OHIF's ``dist/`` folder (from the npm package ``@ohif/app``, which
  ships a built viewer; ``make ohif`` unpacks it into :data:`OHIF_DIST`) with Python's
  ``http.server`` in a thread on ``127.0.0.1``. Routes that are not files fall back to
  ``index.html`` (OHIF is a single-page application); ``/app-config.js`` is the deployment's
  (``deploy/ohif/app-config.js``, :func:`app_config_js`), whose DICOMweb data source is
  ``/dicom-web`` of the same origin, and every ``/dicom-web/...`` request is forwarded to
  Orthanc's DICOMweb plugin with the browser's ``Host`` header (Orthanc builds the bulk-data
  URLs of its metadata from it, so they point back at this server) and with the commas of
  ``includefield`` left unencoded (Orthanc 1.7's plugin ignores the fields of ``a%2Cb``). No
  request leaves the machine: OHIF's assets are local.
* :func:`start_chromium` drives Debian's headless Chromium through chromedriver with software
  WebGL (SwiftShader; cornerstone3D renders with WebGL) and the browser console captured
  (``goog:loggingPrefs``).
* :class:`OhifPage` opens a study (first-run tour skipped through its local-storage flag), lists
  the display sets of the study browser, loads one into the active viewport, waits for texts and
  saves screenshots; :meth:`OhifPage.console` keeps every console message seen so far.

References
----------
OHIF documentation, "Configuration" and "DICOMweb data source",
https://docs.ohif.org/configuration/configurationFiles/ ;
Orthanc Book, "DICOMweb plugin", https://orthanc.uclouvain.be/book/plugins/dicomweb.html
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import shutil
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
#: the OHIF release the test is written against (npm package ``@ohif/app``)
OHIF_VERSION = "3.13.2"
#: where ``make ohif`` unpacks the package's built viewer (git-ignored)
OHIF_DIST = REPO / ".cache" / "ohif" / OHIF_VERSION / "dist"
#: path prefix of the DICOMweb API on the OHIF server (forwarded to Orthanc)
DICOMWEB_PREFIX = "/dicom-web"
#: OHIF's first-run tour of the viewer (``localStorage['shownTours']`` lists the tours shown;
#: ui-next ``components/Onboarding/utilities.ts``)
SHOWN_TOURS = ("basicViewerTour",)

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
#: OhifPage.viewport_state: read OHIF's services for the active viewport (JSON-safe values only)
_VIEWPORT_STATE_JS = """
const s = window.services;
const grid = s.viewportGridService.getState();
const id = grid.activeViewportId;
const vp = grid.viewports.get(id);
const displaySets = ((vp && vp.displaySetInstanceUIDs) || [])
  .map(uid => s.displaySetService.getDisplaySetByUID(uid)).filter(Boolean)
  .map(d => ({uid: d.displaySetInstanceUID, modality: String(d.Modality || ''),
              description: String(d.SeriesDescription || ''), isLoaded: !!d.isLoaded}));
let csvp = null;
try { csvp = s.cornerstoneViewportService.getCornerstoneViewport(id); } catch (e) {}
const actors = (csvp && csvp.getActors ? csvp.getActors() : [])
  .map(a => ({uid: String(a.uid), referencedId: String(a.referencedId || '')}));
const segmentations = s.segmentationService.getSegmentations().map(g => ({
  id: g.segmentationId, label: String(g.label || ''),
  segments: Object.values(g.segments || {}).filter(Boolean).map(x => String(x.label || ''))}));
const representations = s.segmentationService.getSegmentationRepresentations(id)
  .map(r => ({id: r.segmentationId, type: String(r.type), visible: !!r.visible}));
const measurements = s.measurementService.getMeasurements()
  .map(m => ({label: String(m.label || ''), toolName: String(m.toolName || '')}));
const tools = window.cornerstoneTools;
const annotations = (tools ? tools.annotation.state.getAllAnnotations() : [])
  .map(a => String((a.metadata && a.metadata.toolName) || ''));
const loadingText = document.body.innerText.split(String.fromCharCode(10))
  .filter(line => line.startsWith('Loading'));
return {viewportId: id, viewportType: csvp ? String(csvp.type) : null, displaySets, actors,
        segmentations, representations, measurements, annotations, loadingText};
"""
#: the study browser's entries: image thumbnails, and rows for objects without images
_THUMBNAILS = '[data-cy="study-browser-thumbnail"], [data-cy="study-browser-thumbnail-no-image"]'

#: content types ``mimetypes`` may not know (WebAssembly must be served as such to be compiled)
_CONTENT_TYPES = {
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".css": "text/css",
    ".html": "text/html; charset=utf-8",
    ".json": "application/json",
    ".wasm": "application/wasm",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
    ".woff": "font/woff",
    ".ttf": "font/ttf",
    ".xml": "application/xml",
    ".onnx": "application/octet-stream",
}
#: hop-by-hop headers a proxy does not forward (RFC 9110 §7.6.1)
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
}


#: the deployment's OHIF configuration (deploy/compose.yaml mounts it into the OHIF container):
#: served to the viewer as is, so the test runs the configuration a site gets
DEPLOYED_APP_CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "ohif" / "app-config.js"


def app_config_js(**overrides: Any) -> str:
    """OHIF's ``app-config.js``: :data:`DEPLOYED_APP_CONFIG`, with ``overrides`` (top-level
    options) merged into its ``window.config`` when given.

    The deployed file has one DICOMweb data source at ``/dicom-web`` of the page's origin
    (:data:`DICOMWEB_PREFIX`, where :class:`OhifServer` forwards to Orthanc).
    """
    text = DEPLOYED_APP_CONFIG.read_text(encoding="utf-8")
    if not overrides:
        return text
    body = text.split("window.config = ", 1)[1].rstrip().removesuffix(";")
    config = json.loads(body)
    config.update(overrides)
    return "window.config = " + json.dumps(config, indent=2) + ";\n"


def raw_includefield(query: str) -> str:
    """``query`` with the commas of ``includefield`` values unencoded (``%2C`` -> ``,``).

    OHIF (URLSearchParams) encodes the commas of ``includefield=a,b``; Orthanc 1.7's DICOMweb
    plugin splits the value on literal commas only, and silently leaves out the fields of
    ``a%2Cb`` (checked with the Debian package: ``00200032%2C00180050`` returns neither tag).
    """
    parts = []
    for part in query.split("&"):
        name, sep, value = part.partition("=")
        if name.lower() == "includefield":
            value = value.replace("%2C", ",").replace("%2c", ",")
        parts.append(name + sep + value)
    return "&".join(parts)


@dataclass
class ProxyRecord:
    """One forwarded DICOMweb request: method, path (with query), Orthanc's status, seconds."""

    method: str
    path: str
    status: int
    seconds: float


class OhifServer:
    """OHIF's ``dist/`` and a DICOMweb forwarder on ``127.0.0.1`` (a free port), in a thread.

    Parameters
    ----------
    dist : Path
        OHIF's built viewer (``index.html``, bundles, ``assets/``).
    dicomweb_url : str
        Orthanc's DICOMweb root, e.g. ``http://127.0.0.1:8042/dicom-web`` (loopback only).
    timeout_s : float
        Time allowed to Orthanc for one forwarded request.
    config_overrides : dict, optional
        Top-level OHIF options merged into the generated ``app-config.js``.
    """

    def __init__(
        self,
        dist: Path,
        dicomweb_url: str,
        *,
        timeout_s: float = 120.0,
        config_overrides: dict[str, Any] | None = None,
    ) -> None:
        self.dist = Path(dist).resolve()
        if not (self.dist / "index.html").is_file():
            raise FileNotFoundError(
                f"OHIF's build is not at {self.dist} (run `make ohif`: npm package @ohif/app)"
            )
        target = urllib.parse.urlsplit(dicomweb_url)
        if target.hostname not in ("127.0.0.1", "localhost") or target.port is None:
            raise ValueError(f"DICOMweb must be on loopback with a port, not {dicomweb_url!r}")
        self.target_host, self.target_port = "127.0.0.1", target.port
        self.target_root = target.path.rstrip("/")
        self.timeout_s = timeout_s
        self.config_js = app_config_js(**(config_overrides or {})).encode()
        self.records: list[ProxyRecord] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ life cycle
    @property
    def url(self) -> str:
        """Origin of the viewer, ``http://127.0.0.1:<port>``."""
        if self._httpd is None:
            raise RuntimeError("the OHIF server is not started")
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> OhifServer:
        """Bind a free loopback port and serve in a daemon thread."""
        handler = _make_handler(self)
        self._httpd = _QuietServer(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="ohif-http", daemon=True
        )
        self._thread.start()
        logger.info("OHIF %s served at %s from %s", OHIF_VERSION, self.url, self.dist)
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> OhifServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def failed_requests(self) -> list[ProxyRecord]:
        """Forwarded requests Orthanc answered with a status of 400 or more."""
        with self._lock:
            return [r for r in self.records if r.status >= 400]

    # ------------------------------------------------------------------ handlers' helpers
    def _record(self, record: ProxyRecord) -> None:
        with self._lock:
            self.records.append(record)

    def _static_file(self, url_path: str) -> Path:
        """The file for ``url_path`` under ``dist``; ``index.html`` for the SPA's routes."""
        relative = urllib.parse.unquote(url_path).lstrip("/")
        candidate = (self.dist / relative).resolve()
        if candidate.is_relative_to(self.dist) and candidate.is_file():
            return candidate
        return self.dist / "index.html"


class _QuietServer(ThreadingHTTPServer):
    """A threading HTTP server that logs (not prints) the requests the browser dropped."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        err = sys.exc_info()[1]
        if isinstance(err, (BrokenPipeError, ConnectionResetError)):
            # the browser navigated away or cancelled a request: nothing to answer
            logger.debug("ohif-http: client %s went away: %s", client_address, err)
            return
        logger.exception("ohif-http: error while serving %s", client_address)


def _make_handler(server: OhifServer) -> type[BaseHTTPRequestHandler]:
    """The request handler class bound to ``server``."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "ohif-test"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            logger.debug("ohif-http: " + format, *args)

        def do_GET(self) -> None:  # noqa: N802
            self._dispatch(head=False)

        def do_HEAD(self) -> None:  # noqa: N802
            self._dispatch(head=True)

        def do_POST(self) -> None:  # noqa: N802
            if self._is_dicomweb():
                self._forward()
            else:
                self.send_error(405)

        def _is_dicomweb(self) -> bool:
            path = self.path.split("?", 1)[0]
            return path == DICOMWEB_PREFIX or path.startswith(DICOMWEB_PREFIX + "/")

        def _dispatch(self, *, head: bool) -> None:
            if self._is_dicomweb():
                self._forward()
                return
            path = self.path.split("?", 1)[0]
            if path == "/app-config.js":
                body, ctype = server.config_js, _CONTENT_TYPES[".js"]
            else:
                file = server._static_file(path)
                body = file.read_bytes()
                ctype = _CONTENT_TYPES.get(file.suffix, "application/octet-stream")
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            # cross-origin isolation lets cornerstone3D use SharedArrayBuffer for volumes
            self.send_header("Cross-Origin-Opener-Policy", "same-origin")
            self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _forward(self) -> None:
            path, _, query = self.path.partition("?")
            target = server.target_root + path[len(DICOMWEB_PREFIX) :]
            if query:
                target += "?" + raw_includefield(query)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {
                k: v
                for k, v in self.headers.items()
                if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length"
            }
            # the browser's Host (this server): Orthanc writes it into BulkDataURIs
            headers["Host"] = self.headers.get("Host", self.server.server_address[0])
            started = time.monotonic()
            conn = http.client.HTTPConnection(
                server.target_host, server.target_port, timeout=server.timeout_s
            )
            try:
                conn.request(self.command, target, body=body, headers=headers)
                resp = conn.getresponse()
                payload = resp.read()
            except OSError as err:
                server.errors.append(f"{self.command} {self.path}: {err}")
                self.send_error(502, f"Orthanc did not answer: {err}")
                return
            finally:
                conn.close()
            server._record(
                ProxyRecord(self.command, self.path, resp.status, time.monotonic() - started)
            )
            self.send_response(resp.status, resp.reason)
            for name, value in resp.getheaders():
                if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Cross-Origin-Resource-Policy", "same-origin")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

    return Handler


# ---------------------------------------------------------------------- the browser
def chromium_missing() -> str | None:
    """Why Chromium cannot be driven here, or ``None`` when it can."""
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        return "chromium and chromium-driver are needed: run `make sysdeps`"
    return None


def start_chromium(profile_dir: Path, *, width: int = 1600, height: int = 1000) -> Any:
    """Headless Chromium (Selenium ``webdriver.Chrome``) with software WebGL and console capture.

    Same flags as the dashboard test, plus SwiftShader WebGL (``--use-angle=swiftshader
    --enable-unsafe-swiftshader``: cornerstone3D needs WebGL 2, and there is no GPU) and
    ``goog:loggingPrefs`` so that ``driver.get_log("browser")`` returns every console message.
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        "--use-angle=swiftshader",
        "--enable-unsafe-swiftshader",
        "--ignore-gpu-blocklist",
        f"--user-data-dir={profile_dir}",
        f"--window-size={width},{height}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(60)
    return driver


def _OHIF_ERROR(message: str) -> bool:  # noqa: N802 - reads as a constant predicate
    """Whether a non-SEVERE console message reports an error (OHIF's error boundary)."""
    return "Error Boundary" in message or "Something went wrong" in message


@dataclass
class ConsoleMessage:
    """One browser console entry (``level`` is Chromium's: SEVERE, WARNING, INFO, DEBUG)."""

    level: str
    message: str

    def __str__(self) -> str:
        return f"[{self.level}] {self.message}"


class OhifPage:
    """The OHIF viewer in a Selenium-driven Chromium, with helpers to read what it shows.

    Parameters
    ----------
    driver : selenium.webdriver.Chrome
        From :func:`start_chromium`.
    base_url : str
        The :class:`OhifServer` origin.
    artefacts : Path
        Folder for screenshots (created).
    server : OhifServer, optional
        The server behind ``base_url`` (its forwarded requests are then at hand).
    """

    def __init__(
        self, driver: Any, base_url: str, artefacts: Path, *, server: OhifServer | None = None
    ) -> None:
        self.driver = driver
        self.server = server
        self.base_url = base_url.rstrip("/")
        self.artefacts = Path(artefacts)
        self.artefacts.mkdir(parents=True, exist_ok=True)
        self._console: list[ConsoleMessage] = []

    # ------------------------------------------------------------------ console
    def console(self) -> list[ConsoleMessage]:
        """Every console message so far (Chromium hands each one out once; they are kept)."""
        for entry in self.driver.get_log("browser"):
            self._console.append(ConsoleMessage(entry["level"], entry["message"]))
        return list(self._console)

    def console_mark(self) -> int:
        """Position in :meth:`console` to read later messages from (``console()[mark:]``)."""
        return len(self.console())

    def console_errors(self, since: int = 0) -> list[ConsoleMessage]:
        """Errors from position ``since`` on: SEVERE messages, and OHIF's error boundaries (they
        log the exception that blanked a viewport at DEBUG level, with a "Something went wrong"
        notification)."""
        return [m for m in self.console()[since:] if m.level == "SEVERE" or _OHIF_ERROR(m.message)]

    # ------------------------------------------------------------------ navigation
    def open_study(self, study_uid: str, *, timeout_s: float = 120.0) -> None:
        """Open ``/viewer?StudyInstanceUIDs=...`` with the first-run tour marked as shown, and
        wait for the study browser's thumbnails and a rendered viewport."""
        # local storage belongs to the origin: load a page of it first, then set the flag
        self.driver.get(self.base_url + "/app-config.js")
        self.driver.execute_script(
            "window.localStorage.setItem('shownTours', arguments[0]);", json.dumps(SHOWN_TOURS)
        )
        self.driver.get(f"{self.base_url}/viewer?StudyInstanceUIDs={study_uid}")
        self.wait(
            lambda: len(self.display_sets()) > 0, timeout_s, "the study browser's display sets"
        )
        self.wait(self._viewport_has_canvas, timeout_s, "a viewport canvas")

    def wait(self, condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
        """Poll ``condition`` (every 0.25 s) until truthy; its value. :class:`TimeoutError`
        after ``timeout_s``, naming ``what`` and the last console errors."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                value = condition()
            except Exception as err:  # noqa: BLE001 - a stale element is retried until the deadline
                logger.debug("waiting for %s: %s", what, err)
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                errors = "\n".join(str(m) for m in self.console_errors()[-10:])
                raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}\n{errors}")
            time.sleep(0.25)

    def wait_or_error(
        self, condition: Callable[[], Any], since: int, timeout_s: float, what: str
    ) -> Any:
        """Like :meth:`wait`, but give up as soon as a console error (:meth:`console_errors`
        from ``since``) appears: the condition's value then (falsy when not met)."""

        def met_or_failed() -> Any:
            value = condition()
            return value or bool(self.console_errors(since))

        self.wait(met_or_failed, timeout_s, what)
        try:
            return condition()
        except Exception:  # noqa: BLE001 - a stale element after an error counts as not met
            return None

    def click_button(self, text: str, timeout_s: float = 30.0) -> None:
        """Click the visible button labelled ``text`` (e.g. OHIF's "Yes" of a prompt)."""
        from selenium.webdriver.common.by import By

        def find() -> Any:
            for button in self.driver.find_elements(By.TAG_NAME, "button"):
                if button.is_displayed() and button.text.strip() == text:
                    return button
            return None

        self.wait(find, timeout_s, f"a button {text!r}").click()

    def open_panel(self, name: str, timeout_s: float = 30.0) -> None:
        """Open the right-hand side panel ``name`` (``panelSegmentation``,
        ``trackedMeasurements``...) by clicking its tab, ``[data-cy="<name>-btn"]``."""
        from selenium.webdriver.common.by import By

        self.wait(
            lambda: self.driver.find_element(By.CSS_SELECTOR, f'[data-cy="{name}-btn"]'),
            timeout_s,
            f"the {name} panel's tab",
        ).click()

    def viewport_state(self) -> dict[str, Any]:
        """What OHIF holds for the active viewport (through ``window.services``, which OHIF
        exposes): its display sets (``modality``, ``description``, ``isLoaded``), cornerstone
        viewport type and actors (``referencedId``: an image, a volume or a labelmap), the
        segmentations (``label``, ``segments`` labels) and their representations in the
        viewport, the measurements of the measurement service (``label``, ``toolName``), the
        tool names of cornerstone's annotations (what is drawn) and the "Loading..." texts."""
        return dict(self.driver.execute_script(_VIEWPORT_STATE_JS))

    def _viewport_has_canvas(self) -> bool:
        return bool(
            self.driver.execute_script(
                "return document.querySelectorAll('[data-viewport-uid] canvas').length"
            )
        )

    # ------------------------------------------------------------------ reading the page
    def page_text(self) -> str:
        """The visible text of the page."""
        return str(self.driver.execute_script("return document.body.innerText"))

    def display_sets(self) -> list[dict[str, str]]:
        """The study browser's entries (image thumbnails and the image-less rows of SEG, PMAP,
        SR, DOC...): ``uid`` (display set instance UID), ``series`` (series number),
        ``modality`` and ``description`` as OHIF shows them."""
        return list(
            self.driver.execute_script(
                "return Array.from(document.querySelectorAll(arguments[0])).map(el => ({"
                "  uid: (el.id || '').replace(/^thumbnail-/, ''),"
                "  series: el.dataset.series || '',"
                "  modality: (el.querySelector('[data-cy=\"series-modality-label\"]') || {})"
                "    .innerText || '',"
                "  description: (el.querySelector('[data-cy=\"series-description-label\"]')"
                "    || {}).innerText || ''"
                "}));",
                _THUMBNAILS,
            )
        )

    def load_display_set(self, description: str, modality: str) -> None:
        """Double-click the study browser's entry of ``modality`` whose description starts with
        ``description`` (OHIF loads it into the active viewport)."""
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.by import By

        def find() -> Any:
            for element in self.driver.find_elements(By.CSS_SELECTOR, _THUMBNAILS):
                shown = element.find_element(By.CSS_SELECTOR, '[data-cy="series-modality-label"]')
                label = element.find_element(
                    By.CSS_SELECTOR, '[data-cy="series-description-label"]'
                )
                text = label.get_attribute("innerText") or ""
                if shown.get_attribute("innerText") == modality and text.startswith(description):
                    return element
            return None

        element = self.wait(find, 30, f"the study browser's {modality} {description!r}")
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
        ActionChains(self.driver).double_click(element).perform()

    def wait_for_text(self, text: str, timeout_s: float = 60.0) -> None:
        """Wait until ``text`` is part of the page's visible text."""
        self.wait(lambda: text in self.page_text(), timeout_s, f"the text {text!r}")

    def screenshot(self, name: str) -> Path:
        """Save a PNG of the window as ``artefacts/name.png``; its path."""
        path = self.artefacts / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path


def quit_driver(driver: Any) -> None:
    """Quit Chromium and chromedriver, logging (not raising) a failure to do so."""
    try:
        driver.quit()
    except Exception as err:  # noqa: BLE001 - teardown must go on to stop the servers
        logger.warning("chromium did not quit cleanly: %s", err)


@contextlib.contextmanager
def open_viewer(
    dicomweb_url: str, workdir: Path, *, dist: Path = OHIF_DIST, **config_overrides: Any
) -> Iterator[OhifPage]:
    """Serve OHIF (:class:`OhifServer`) in front of ``dicomweb_url`` and drive it in headless
    Chromium; the :class:`OhifPage` (screenshots in ``workdir/artefacts``). Chromium and the
    server stop on exit, whatever happened."""
    server = OhifServer(dist, dicomweb_url, config_overrides=config_overrides).start()
    try:
        driver = start_chromium(workdir / "chromium-profile")
        try:
            yield OhifPage(driver, server.url, workdir / "artefacts", server=server)
        finally:
            quit_driver(driver)
    finally:
        server.stop()
