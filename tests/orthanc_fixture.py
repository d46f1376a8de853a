"""A real PACS for tests: Debian's Orthanc on loopback with a generated configuration.

:class:`OrthancServer` starts ``/usr/sbin/Orthanc`` (or ``Orthanc`` on ``PATH``) with a JSON
configuration written to a temporary folder: free DICOM and HTTP ports on ``127.0.0.1``,
``RemoteAccessAllowed: false``, no authentication, storage and index in the folder, no plugins
unless asked (``dicomweb=True`` loads Debian's DICOMweb plugin, package ``orthanc-dicomweb``, with
its API at ``/dicom-web/``; ``plugins=`` loads others), the caller's ``DicomModalities`` and
optional Lua scripts. It waits for ``GET /system`` and offers
small REST helpers (upload, list patients/studies/series/instances with their ``MainDicomTags``,
wait for counts) and a clean stop.

Use it as a context manager::

    with OrthancServer(tmp_path, modalities={"spinenode": ["SPINENODE", "127.0.0.1", 11112]},
                       lua_scripts=[REPO / "deploy/orthanc/route-to-node.lua"]) as pacs:
        pacs.upload(paths)
        pacs.wait_for(lambda: len(pacs.instances()) >= 10, timeout_s=60)

or through the :func:`orthanc_factory` pytest fixture (``from tests.orthanc_fixture import
orthanc_factory`` in the test module), which stops every server it started at the end of the
test; it skips the test when Orthanc is not installed (``make test`` installs the Debian package
``orthanc``).

References
----------
Orthanc Book, "Configuration of Orthanc" and "Server-side scripting with Lua",
https://orthanc.uclouvain.be/book/
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

logger = logging.getLogger(__name__)

#: where the Debian package installs the server
DEBIAN_ORTHANC = "/usr/sbin/Orthanc"
#: where the Debian package ``orthanc-dicomweb`` installs the DICOMweb plugin
DEBIAN_DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
#: root of the DICOMweb API (QIDO-RS, WADO-RS, STOW-RS) when the plugin is loaded
DICOMWEB_ROOT = "/dicom-web/"


def find_orthanc() -> str | None:
    """Path of the Orthanc executable, or ``None`` when it is not installed."""
    if os.access(DEBIAN_ORTHANC, os.X_OK):
        return DEBIAN_ORTHANC
    return shutil.which("Orthanc")


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OrthancError(RuntimeError):
    """Orthanc did not start, stopped unexpectedly, or a REST call failed."""


class OrthancServer:
    """One Orthanc process on loopback, configured in ``workdir``.

    Parameters
    ----------
    workdir : Path
        Folder for the configuration, storage, index and log (created if missing).
    modalities : Mapping[str, Any], optional
        ``DicomModalities``: symbolic name -> ``[AET, host, port]`` or Orthanc's object form
        (``{"AET": ..., "Host": ..., "Port": ..., "AllowFind": ...}``).
    lua_scripts : Iterable[Path], optional
        Lua scripts loaded at start-up (``LuaScripts``).
    aet : str
        Orthanc's own AE title (``DicomAet``).
    dicom_port, http_port : int, optional
        Fixed ports; by default free ports are picked. Pass ``dicom_port`` when a peer must be
        configured with it before Orthanc starts.
    stable_age_s : int
        ``StableAge``: seconds without a new instance after which a study is stable
        (``OnStableStudy``), default 2 for quick tests.
    plugins : Iterable[Path], optional
        Plugin shared libraries (or folders of them) loaded at start-up (``Plugins``).
    dicomweb : bool
        Load the DICOMweb plugin (:data:`DEBIAN_DICOMWEB_PLUGIN`) with its API at
        :data:`DICOMWEB_ROOT` and WADO-URI at ``/wado``. No ``Host`` is configured: the plugin
        builds the bulk-data URLs of its answers from each request's ``Host`` header, so a proxy
        that forwards that header gets URLs that point back to itself.
    extra_config : Mapping[str, Any], optional
        Further configuration options, merged last (they win).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        modalities: Mapping[str, Any] | None = None,
        lua_scripts: Iterable[Path] = (),
        aet: str = "ORTHANC",
        dicom_port: int | None = None,
        http_port: int | None = None,
        stable_age_s: int = 2,
        plugins: Iterable[Path] = (),
        dicomweb: bool = False,
        extra_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.aet = aet
        self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        self.modalities = dict(modalities or {})
        self.lua_scripts = [Path(p).resolve() for p in lua_scripts]
        self.stable_age_s = stable_age_s
        self.plugins = [Path(p) for p in plugins]
        if dicomweb:
            if not DEBIAN_DICOMWEB_PLUGIN.exists():
                raise OrthancError(
                    f"Orthanc's DICOMweb plugin is not installed ({DEBIAN_DICOMWEB_PLUGIN}; "
                    "Debian package 'orthanc-dicomweb', `make sysdeps` installs it)"
                )
            self.plugins.append(DEBIAN_DICOMWEB_PLUGIN)
        self.dicomweb = dicomweb
        self.extra_config = dict(extra_config or {})
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"
        self.proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ life cycle
    @property
    def url(self) -> str:
        """Base URL of the REST API."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """Base URL of the DICOMweb API (``dicomweb=True``), without the trailing slash."""
        return self.url + DICOMWEB_ROOT.rstrip("/")

    def config(self) -> dict[str, Any]:
        """The configuration written to ``orthanc.json``."""
        storage = self.workdir / "storage"
        cfg: dict[str, Any] = {
            "Name": f"test-pacs-{self.dicom_port}",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "StorageCompression": False,
            "Plugins": [str(p) for p in self.plugins],
            "LuaScripts": [str(p) for p in self.lua_scripts],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "HttpDescribeErrors": True,
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomCheckModalityHost": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "UnknownSopClassAccepted": True,
            "DicomModalities": self.modalities,
            "DicomModalitiesInDatabase": False,
            "DicomScuTimeout": 30,
            "DicomScpTimeout": 30,
            "DicomAssociationCloseDelay": 1,
            "StableAge": self.stable_age_s,
            "SaveJobs": False,
            "ConcurrentJobs": 2,
            "UserMetadata": {"SpineNodeRouted": 1024},
        }
        if self.dicomweb:
            cfg["DicomWeb"] = {
                "Enable": True,
                "Root": DICOMWEB_ROOT,
                "EnableWado": True,
                "WadoRoot": "/wado",
                "Ssl": False,
            }
        cfg.update(self.extra_config)
        return cfg

    def start(self, timeout_s: float = 30.0) -> OrthancServer:
        """Write the configuration, start Orthanc and wait for ``GET /system``."""
        exe = find_orthanc()
        if exe is None:
            raise OrthancError("Orthanc is not installed (Debian package 'orthanc')")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2), encoding="utf-8")
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [exe, f"--logfile={self.log_path}.internal", str(self.config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            # Orthanc's DICOM layer is DCMTK's, which disables Nagle's algorithm only when told
            # so by this variable: without it every C-STORE Orthanc sends waits ~40 ms for a
            # delayed ACK (routing to the node ran at ~20 images/s)
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._log.close()
                raise OrthancError(
                    f"Orthanc exited with code {self.proc.returncode}; see {self.log_text_path}"
                )
            try:
                system = self.get("/system")
            except (OrthancError, OSError):
                time.sleep(0.2)
                continue
            logger.info(
                "Orthanc %s on DICOM 127.0.0.1:%d (AET %s), HTTP %s",
                system.get("Version"),
                self.dicom_port,
                self.aet,
                self.url,
            )
            return self
        self.stop()
        raise OrthancError(
            f"Orthanc did not answer GET /system in {timeout_s} s; see {self.log_text_path}"
        )

    @property
    def log_text_path(self) -> Path:
        """Orthanc's own log file (Lua ``print`` output goes there too)."""
        return Path(f"{self.log_path}.internal")

    def log_text(self) -> str:
        """Orthanc's log so far (empty if none)."""
        parts = []
        for path in (self.log_path, self.log_text_path):
            if path.is_file():
                parts.append(path.read_text(encoding="utf-8", errors="replace"))
        return "\n".join(parts)

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """Stop Orthanc (SIGTERM, then SIGKILL after ``timeout_s``); its exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("Orthanc did not stop in %s s; killing it", timeout_s)
                self.proc.kill()
                self.proc.wait(timeout=10)
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ REST
    def request(
        self,
        method: str,
        path: str,
        body: bytes | dict[str, Any] | list[Any] | None = None,
        *,
        content_type: str = "application/json",
        timeout_s: float = 60.0,
    ) -> Any:
        """Call the REST API; the decoded JSON answer (or raw bytes if not JSON)."""
        data: bytes | None
        if isinstance(body, (dict, list)):
            data = json.dumps(body).encode()
        else:
            data = body
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:500]
            raise OrthancError(f"{method} {path}: HTTP {err.code} {detail}") from err
        except urllib.error.URLError as err:
            raise OrthancError(f"{method} {path}: {err.reason}") from err
        try:
            return json.loads(raw)
        except ValueError:
            return raw

    def get(self, path: str) -> Any:
        """``GET path`` (JSON)."""
        return self.request("GET", path)

    def post(self, path: str, body: bytes | dict[str, Any] | list[Any] | None = None) -> Any:
        """``POST path`` with a JSON (dict/list) or raw body."""
        return self.request("POST", path, body if body is not None else b"")

    def upload(self, paths: Iterable[Path]) -> list[str]:
        """Upload DICOM files (``POST /instances``); their Orthanc instance ids."""
        ids = []
        for path in paths:
            answer = self.request(
                "POST", "/instances", Path(path).read_bytes(), content_type="application/dicom"
            )
            ids.append(answer["ID"])
        return ids

    def store(self, paths: Iterable[Path], *, calling_ae: str = "MODALITY") -> None:
        """C-STORE files to Orthanc with dcmtk ``storescu``, as a modality sends them (one
        association; far quicker than one REST request per file)."""
        sent = subprocess.run(
            [
                "storescu",
                "-aet",
                calling_ae,
                "-aec",
                self.aet,
                "127.0.0.1",
                str(self.dicom_port),
                *map(str, paths),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            env={"TCP_NODELAY": "1"},
        )
        if sent.returncode != 0:
            raise RuntimeError(f"storescu to Orthanc failed: {sent.stderr[-2000:]}")

    def _expanded(self, level: str) -> list[dict[str, Any]]:
        return list(self.get(f"/{level}?expand"))

    def patients(self) -> list[dict[str, Any]]:
        """``GET /patients?expand``: each with ``ID``, ``MainDicomTags``, ``Studies``."""
        return self._expanded("patients")

    def studies(self) -> list[dict[str, Any]]:
        """``GET /studies?expand``: ``MainDicomTags``, ``PatientMainDicomTags``, ``Series``."""
        return self._expanded("studies")

    def series(self) -> list[dict[str, Any]]:
        """``GET /series?expand``: ``MainDicomTags``, ``ParentStudy``, ``Instances``."""
        return self._expanded("series")

    def instances(self) -> list[dict[str, Any]]:
        """``GET /instances?expand``: ``MainDicomTags``, ``ParentSeries``."""
        return self._expanded("instances")

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        """``GET /instances/{id}/simplified-tags``."""
        return dict(self.get(f"/instances/{instance_id}/simplified-tags"))

    def instance_metadata(self, instance_id: str) -> dict[str, Any]:
        """``GET /instances/{id}/metadata?expand`` (``RemoteAET``, ``SopClassUid``...)."""
        return dict(self.get(f"/instances/{instance_id}/metadata?expand"))

    def series_by_study(self) -> dict[str, list[dict[str, Any]]]:
        """StudyInstanceUID -> its series (expanded) as Orthanc stores them."""
        studies = {s["ID"]: s["MainDicomTags"].get("StudyInstanceUID", "") for s in self.studies()}
        out: dict[str, list[dict[str, Any]]] = {}
        for series in self.series():
            out.setdefault(studies.get(series["ParentStudy"], ""), []).append(series)
        return out

    def wait_for(
        self,
        condition: Callable[[], bool],
        *,
        timeout_s: float,
        interval_s: float = 1.0,
        what: str = "condition",
    ) -> None:
        """Poll ``condition`` until true; :class:`OrthancError` after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if condition():
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise OrthancError(f"Orthanc exited while waiting for {what}")
            time.sleep(interval_s)
        raise OrthancError(f"timed out after {timeout_s} s waiting for {what}")


@pytest.fixture
def orthanc_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., OrthancServer]]:
    """Start :class:`OrthancServer` instances (same keyword arguments); all stop at test end.

    ``orthanc_factory(modalities=..., lua_scripts=...)`` returns a started server. The test is
    skipped when Orthanc is not installed.
    """
    if find_orthanc() is None:
        pytest.skip("Orthanc not installed (make test installs the Debian package 'orthanc')")
    started: list[OrthancServer] = []

    def make(**kwargs: Any) -> OrthancServer:
        server = OrthancServer(tmp_path_factory.mktemp("orthanc"), **kwargs)
        started.append(server)
        return server.start()

    yield make
    for server in started:
        server.stop()
