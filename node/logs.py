"""Logging set-up for the command line: structured lines, and no patient identifiers.

Modules log with ``logging.getLogger(__name__)`` and only UIDs or task ids. pydicom's validation
warnings quote the offending value and pynetdicom can dump identifiers and whole datasets, so
records from those libraries pass through :class:`PhiFilter`, which drops their debug chatter and
redacts every quoted value and every ``(0010,xxxx)`` element line. Python warnings are captured
into logging (logger ``py.warnings``) and filtered the same way.
"""

from __future__ import annotations

import logging
import re
import sys

_QUOTED = re.compile(r"('[^']*'|\"[^\"]*\")")
_PATIENT_ELEMENT = re.compile(r"\(0010,\s*[0-9A-Fa-f]{4}\)[^\n]*")
_THIRD_PARTY = ("pydicom", "pynetdicom", "highdicom", "radiomics", "apscheduler", "py.warnings")


class PhiFilter(logging.Filter):
    """Redact values in third-party records that may carry patient identifiers."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(_THIRD_PARTY):
            return True
        if record.name.startswith("pynetdicom") and record.levelno < logging.INFO:
            return False
        message = record.getMessage()
        message = _PATIENT_ELEMENT.sub("(0010,xxxx) <redacted>", message)
        message = _QUOTED.sub("'<redacted>'", message)
        record.msg, record.args = message, None
        return True


_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str = "INFO", log_file: str | None = None) -> None:
    """Configure the root logger once (entry points only; library code never calls this)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(logging.Formatter(_FORMAT))
        handler.addFilter(PhiFilter())
        root.addHandler(handler)
    root.setLevel(level)
    # Python warnings (pydicom's quote the offending value, e.g. a malformed birth date) would
    # otherwise go straight to stderr; route them through the filtered handlers.
    logging.captureWarnings(True)
    # pynetdicom's INFO level narrates every association and PDU; keep it at WARNING.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("radiomics").setLevel(logging.WARNING)
    # APScheduler narrates every run of every job (the dispatcher polls every few seconds).
    logging.getLogger("apscheduler").setLevel(logging.WARNING)


def logging_target() -> tuple[str, str | None]:
    """This process's log level name and log file, so that a child process (an analysis, a
    cohort worker) logs like its parent through :func:`configure_logging`."""
    root = logging.getLogger()
    files = [h.baseFilename for h in root.handlers if isinstance(h, logging.FileHandler)]
    return logging.getLevelName(root.level), (files[0] if files else None)
