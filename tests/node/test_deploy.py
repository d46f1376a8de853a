"""deploy/: what can run here is run (issue 8, acceptance 3).

- ``deploy/node.example.toml`` and ``deploy/orthanc/node-with-orthanc.toml`` validate, and
  ``spine-node serve --config deploy/node.example.toml`` starts (with ``--port 0 --storage TMP``:
  the example's port and storage are the production ones) and stops cleanly on SIGTERM;
- the systemd unit passes ``systemd-analyze verify`` and has the dedicated user, restart policy
  and storage paths;
- the Orthanc configuration is valid JSON that loads the routing script and names the node; the
  routing script itself runs in ``tests/e2e/test_orthanc_roundtrip.py`` (and Orthanc starts with
  the deployed configuration there);
- the Dockerfile and compose file (no Docker engine here) refer to files that exist.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from node.config import load_settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def test_example_config_validates():
    settings = load_settings(DEPLOY / "node.example.toml")
    assert settings.node.ae_title == "SPINENODE"
    assert settings.node.port == 11112
    destinations = settings.node.result_destinations
    assert destinations and all(settings.peer(name).may_receive for name in destinations)


def test_orthanc_node_config_validates_and_matches_orthanc():
    settings = load_settings(DEPLOY / "orthanc" / "node-with-orthanc.toml")
    orthanc = json.loads((DEPLOY / "orthanc" / "orthanc.json").read_text(encoding="utf-8"))
    assert settings.node.result_destinations == ("ORTHANC",)
    pacs = settings.peer("ORTHANC")
    assert pacs.may_send and pacs.may_receive
    assert (pacs.ae_title, pacs.port) == (orthanc["DicomAet"], orthanc["DicomPort"])
    node = orthanc["DicomModalities"]["spinenode"]
    assert (node["AET"], node["Port"]) == (settings.node.ae_title, settings.node.port)
    # the Lua script routes to the modality of that name and marks series with this metadata
    lua = (DEPLOY / "orthanc" / "route-to-node.lua").read_text(encoding="utf-8")
    assert "local NODE = 'spinenode'" in lua
    assert "SpineNodeRouted" in orthanc["UserMetadata"]
    assert [Path(p).name for p in orthanc["LuaScripts"]] == ["route-to-node.lua"]
    assert "OnStableStudy" in lua and "python" not in json.dumps(orthanc).lower()


def _example_with_free_dashboard_port(tmp_path: Path) -> Path:
    """The example configuration, its dashboard moved to a free port (like ``--port 0``).

    The dashboard's port has no command-line override; parallel tests must not compete for the
    example's. Everything else is the file as shipped (its storage is overridden by --storage).
    """
    text = (DEPLOY / "node.example.toml").read_text(encoding="utf-8")
    header = re.search(r"^\[dashboard\][^\n]*\n", text, re.M)
    if header is None:
        text += "\n[dashboard]\nport = 0\n"
    else:
        following = re.search(r"^\[", text[header.end() :], re.M)
        end = header.end() + following.start() if following else len(text)
        section = re.sub(r"^port\s*=.*\n?", "", text[header.end() : end], flags=re.M)
        text = f"{text[: header.end()]}port = 0\n{section}{text[end:]}"
    path = tmp_path / "node.example.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_serve_starts_with_the_example_config(tmp_path):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "node.cli",
            "serve",
            "--config",
            str(_example_with_free_dashboard_port(tmp_path)),
            "--port",
            "0",
            "--storage",
            str(tmp_path / "storage"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        line = ""
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if "listening on" in line or (not line and proc.poll() is not None):
                break
        assert "SPINENODE listening on 127.0.0.1:" in line, proc.stderr.read()[-2000:]
        port = int(line.strip().rsplit(":", 1)[1])
        assert port > 0
        assert (tmp_path / "storage" / "index.sqlite3").is_file()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(DEPLOY / "spine-node.service", encoding="utf-8")
    return parser


def test_systemd_unit_has_user_restart_and_storage():
    unit = _unit()
    service = unit["Service"]
    assert service["User"] == "spine-node" and service["Group"] == "spine-node"
    assert service["Restart"] == "on-failure"
    assert service["StateDirectory"] == "spine-node"
    assert "/var/lib/spine-node" in service["ReadWritePaths"]
    assert re.search(
        r"spine-node .*serve --config /etc/spine-node/node.toml "
        r"--storage /var/lib/spine-node$",
        service["ExecStart"],
    )
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_unit_verifies(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed")
    venv_bin = Path(sys.executable).parent / "spine-node"
    if not venv_bin.exists():
        pytest.skip("spine-node entry point not installed in this environment")
    # ExecStart must exist for verify: point it at this checkout's entry point
    text = (DEPLOY / "spine-node.service").read_text(encoding="utf-8")
    unit = tmp_path / "spine-node.service"
    unit.write_text(
        text.replace("/opt/spine-node/.venv/bin/spine-node", str(venv_bin)), encoding="utf-8"
    )
    run = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "spine-node.service" not in run.stderr, run.stderr


def test_container_files_refer_to_existing_paths():
    dockerfile = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    for source in re.findall(r"^COPY\s+(\S+(?:\s+\S+)*?)\s+\S+$", dockerfile, re.M):
        for path in source.split():
            assert (REPO / path).exists(), path
    assert re.search(r"^USER spine-node$", dockerfile, re.M)
    assert 'CMD ["serve", "--config", "/etc/spine-node/node.toml"]' in dockerfile
    compose = (DEPLOY / "compose.yaml").read_text(encoding="utf-8")
    for mounted in re.findall(r"-\s+\./(\S+?):/", compose):
        assert (DEPLOY / mounted).is_file(), mounted
    assert "dockerfile: deploy/Dockerfile" in compose
    assert "hostname: spine-node" in compose  # orthanc.json's modality host


def test_viewer_proxy_ohif_and_orthanc_agree():
    """The viewer of deploy/compose.yaml (issue 15): OHIF's data source, the proxy's DICOMweb
    location and Orthanc's DICOMweb root are the same path; the proxy reaches Orthanc's HTTP port
    with a user Orthanc knows. (The OHIF configuration itself runs in tests/e2e/test_ohif.py.)"""
    import base64

    orthanc = json.loads((DEPLOY / "orthanc" / "orthanc.json").read_text(encoding="utf-8"))
    assert orthanc["DicomWeb"]["Enable"] and orthanc["DicomWeb"]["Root"] == "/dicom-web/"
    assert [Path(p).name for p in orthanc["Plugins"]] == ["libOrthancDicomWeb.so"]
    nginx = (DEPLOY / "ohif" / "nginx.conf").read_text(encoding="utf-8")
    assert "location /dicom-web/ {" in nginx
    assert f"proxy_pass http://orthanc:{orthanc['HttpPort']};" in nginx
    assert "proxy_set_header Host $http_host;" in nginx  # Orthanc's bulk-data URLs
    [credentials] = re.findall(r'Authorization "Basic ([A-Za-z0-9+/=]+)"', nginx)
    user, password = base64.b64decode(credentials).decode().split(":", 1)
    assert orthanc["RegisteredUsers"][user] == password
    app_config = (DEPLOY / "ohif" / "app-config.js").read_text(encoding="utf-8")
    config = json.loads(app_config.split("window.config = ", 1)[1].rstrip().removesuffix(";"))
    [source] = config["dataSources"]
    roots = {source["configuration"][k] for k in ("qidoRoot", "wadoRoot", "wadoUriRoot")}
    assert roots == {"/dicom-web"}
    compose = (DEPLOY / "compose.yaml").read_text(encoding="utf-8")
    assert "image: jodogne/orthanc-plugins:" in compose and "image: ohif/app:v3.13.2" in compose
