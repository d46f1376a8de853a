"""Outside validators for the reporting tests: dciodvfy (dicom3tools) and dcmqi's readers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent


class DciodvfyWarning(UserWarning):
    """A dciodvfy warning about a produced object (listed in pytest's warnings summary)."""


def dciodvfy(path: Path) -> list[str]:
    """Run dciodvfy on ``path``; fail on any error, return and report the warnings.

    Each distinct warning is printed and issued as a :class:`DciodvfyWarning`, so the run's
    warnings summary lists them (acceptance: "warnings listed in the test output").
    """
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.fail("dciodvfy (dicom3tools) is not installed: run `make sysdeps`")
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    lines = (proc.stdout + proc.stderr).splitlines()
    errors = [line for line in lines if line.startswith(("Error", "Abort"))]
    found = [line for line in lines if line.startswith("Warning")]
    for line, count in Counter(found).items():
        text = f"dciodvfy {path.name}: {line}" + (f" (x{count})" if count > 1 else "")
        print(text)
        warnings.warn(text, DciodvfyWarning, stacklevel=2)
    assert not errors, f"dciodvfy errors in {path.name}:\n" + "\n".join(errors)
    return found


def dcmqi(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run one of dcmqi's command-line tools from the venv; fail with its output on error."""
    exe = VENV_BIN / tool
    if not exe.exists():
        pytest.fail(f"dcmqi tool {tool} not found in {VENV_BIN} (pip install dcmqi)")
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{tool} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def tid1500_json(sr_path: Path, out_dir: Path) -> dict:
    """Read an SR with dcmqi's ``tid1500reader`` and return its JSON."""
    out = out_dir / f"{sr_path.stem}-tid1500.json"
    dcmqi("tid1500reader", "--inputDICOM", str(sr_path), "--outputMetadata", str(out))
    return json.loads(out.read_text())
