"""The node's settings: one TOML file validated at start-up into a frozen :class:`Settings`.

Bad values are refused with a :class:`~node.errors.ConfigError` whose message names the key
(``node.port: ...``); nothing is clamped. Later parts of the node add their own sections either as
the declared optional tables (``analysis``, ``courses``, ``followup``, ``dashboard``, kept as plain
tables until their owners give them a model) or by registering a pydantic model with
:func:`register_section`, which :meth:`Settings.section` then uses to validate the table.
Unknown top-level tables are refused.

Example: ``deploy/node.example.toml``.
"""

from __future__ import annotations

import logging
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from node.errors import ConfigError

logger = logging.getLogger(__name__)

_AE_TITLE = re.compile(r"^[\x21-\x5B\x5D-\x7E]([\x20-\x5B\x5D-\x7E]{0,14}[\x21-\x5B\x5D-\x7E])?$")


def _check_ae_title(value: str) -> str:
    """AE title rules of PS3.5 Table 6.2-1 (AE VR): 1-16 characters, no backslash, not blank."""
    if not _AE_TITLE.match(value):
        raise ValueError(
            f"{value!r} is not a valid AE title (1-16 printable ASCII characters, no backslash, "
            "no leading/trailing spaces)"
        )
    return value


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class NodeSettings(_Frozen):
    """The node's own identity, listener and storage."""

    ae_title: str = "SPINENODE"
    bind_address: str = "127.0.0.1"
    #: TCP port of the DICOM listener; 0 picks a free port (tests)
    port: int = Field(11112, ge=0, le=65535)
    storage: Path = Path("spine-node-data")
    #: ``sqlite:///PATH``; empty means ``<storage>/index.sqlite3``
    database_url: str = ""
    #: seconds without a new instance after which a study is stable
    quiet_period_s: float = Field(60.0, gt=0)
    #: free space (MB) below which C-STORE is refused with 0xA700
    disk_low_water_mb: float = Field(1024.0, ge=0)
    #: refuse associations whose calling AE title is not a peer with ``may_send``
    reject_unknown_calling_ae: bool = True
    max_associations: int = Field(10, ge=1, le=1000)
    acse_timeout_s: float = Field(30.0, gt=0)
    dimse_timeout_s: float = Field(60.0, gt=0)
    network_timeout_s: float = Field(60.0, gt=0)
    #: largest P-DATA PDU we accept (bytes); 0 is refused (pynetdicom's "unlimited")
    maximum_pdu_size: int = Field(262144, ge=4096, le=16 * 1024 * 1024)
    #: default destination names (peers with ``may_receive``) for produced results
    result_destinations: tuple[str, ...] = ()

    _ae = field_validator("ae_title")(_check_ae_title)

    @field_validator("database_url")
    @classmethod
    def _sqlite_only(cls, value: str) -> str:
        if value and not value.startswith("sqlite:///"):
            raise ValueError("only 'sqlite:///PATH' (or empty for the default) is supported")
        return value

    @property
    def database_path(self) -> Path:
        """The SQLite file of the index."""
        if self.database_url:
            return Path(self.database_url.removeprefix("sqlite:///"))
        return self.storage / "index.sqlite3"


class TlsSettings(_Frozen):
    """Optional DICOM TLS (PS3.15 B.12: TLS 1.2 minimum, mutual authentication by default)."""

    enabled: bool = False
    certificate: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    require_client_certificate: bool = True

    @model_validator(mode="after")
    def _files_exist(self) -> TlsSettings:
        if not self.enabled:
            return self
        for name in ("certificate", "key", "ca"):
            path = getattr(self, name)
            if name == "ca" and path is None and not self.require_client_certificate:
                continue
            if path is None:
                raise ValueError(f"{name}: required when TLS is enabled")
            self.check_file(name)
        return self

    def check_file(self, name: str, *, prefix: str = "") -> None:
        """Raise ``ValueError`` when the file ``name`` (certificate, key, ca) is given but
        missing."""
        path = getattr(self, name)
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{prefix}{name}: file {str(path)!r} does not exist")


class Peer(_Frozen):
    """A known DICOM peer."""

    ae_title: str
    #: name used for destinations (defaults to the AE title)
    name: str = ""
    host: str = "127.0.0.1"
    port: int = Field(104, ge=1, le=65535)
    #: may associate with us and send (C-ECHO, C-STORE)
    may_send: bool = True
    #: may be sent to (a destination for results)
    may_receive: bool = False
    #: associations the node opens to this peer use TLS (PS3.15 B.12): the peer's certificate is
    #: checked against ``[tls] ca`` and its host name; ``[tls] certificate``/``key`` are sent as
    #: the node's client certificate
    tls: bool = False

    _ae = field_validator("ae_title")(_check_ae_title)

    @model_validator(mode="after")
    def _default_name(self) -> Peer:
        if not self.name:
            object.__setattr__(self, "name", self.ae_title)
        return self


class DispatchSettings(_Frozen):
    """Retries of the outbox (exponential back-off, persisted in the index)."""

    max_tries: int = Field(8, ge=1, le=1000)
    backoff_initial_s: float = Field(10.0, gt=0)
    backoff_max_s: float = Field(3600.0, gt=0)
    poll_interval_s: float = Field(2.0, gt=0)
    #: instances sent per association before it is released
    batch_size: int = Field(500, ge=1)
    calling_ae_title: str = ""

    @model_validator(mode="after")
    def _ordered(self) -> DispatchSettings:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s: must be >= backoff_initial_s")
        return self


#: section name -> model registered by other parts of the node
_SECTION_MODELS: dict[str, type[BaseModel]] = {}


def register_section(name: str, model: type[BaseModel]) -> None:
    """Declare the model of an extension section (e.g. ``analysis``) so it is validated.

    Parameters
    ----------
    name : str
        Top-level TOML table name; must be one of :data:`EXTENSION_SECTIONS`.
    model : type of pydantic.BaseModel
        Model the table is validated into by :meth:`Settings.section`.
    """
    if name not in EXTENSION_SECTIONS:
        raise ValueError(f"unknown extension section {name!r}; declare it in node.config")
    _SECTION_MODELS[name] = model


#: top-level tables other parts of the node own
EXTENSION_SECTIONS = ("analysis", "courses", "followup", "dashboard")


class Settings(_Frozen):
    """The whole validated configuration."""

    node: NodeSettings = NodeSettings()
    tls: TlsSettings = TlsSettings()
    peers: tuple[Peer, ...] = (
        Peer(ae_title="STORESCU", host="127.0.0.1", may_send=True),
        Peer(ae_title="ECHOSCU", host="127.0.0.1", may_send=True),
    )
    dispatch: DispatchSettings = DispatchSettings()
    analysis: dict[str, Any] = Field(default_factory=dict)
    courses: dict[str, Any] = Field(default_factory=dict)
    followup: dict[str, Any] = Field(default_factory=dict)
    dashboard: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        names = [p.name for p in self.peers]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"peers: duplicate peer name(s) {duplicates}")
        tls_peers = [p.name for p in self.peers if p.tls]
        if tls_peers:
            if self.tls.ca is None:
                raise ValueError(f"tls.ca: required to verify the TLS peer(s) {tls_peers}")
            if (self.tls.certificate is None) != (self.tls.key is None):
                raise ValueError("tls: certificate and key go together")
            for name in ("ca", "certificate", "key"):
                self.tls.check_file(name, prefix="tls.")
        receivers = {p.name for p in self.peers if p.may_receive}
        for dest in self.node.result_destinations:
            if dest not in receivers:
                raise ValueError(
                    f"node.result_destinations: {dest!r} is not a peer with may_receive = true"
                )
        for name in EXTENSION_SECTIONS:
            model = _SECTION_MODELS.get(name)
            if model is not None:
                try:
                    model.model_validate(getattr(self, name))
                except ValidationError as err:
                    raise ValueError(_format_errors(err, prefix=name)) from err
        return self

    def section(self, name: str) -> BaseModel | dict[str, Any]:
        """An extension section, validated by its registered model when there is one."""
        if name not in EXTENSION_SECTIONS:
            raise KeyError(name)
        raw = getattr(self, name)
        model = _SECTION_MODELS.get(name)
        return model.model_validate(raw) if model is not None else dict(raw)

    def peer(self, name: str) -> Peer:
        """The peer called ``name`` (its ``name`` or AE title)."""
        for p in self.peers:
            if p.name == name or p.ae_title == name:
                return p
        raise KeyError(f"no peer named {name!r} in the configuration")

    @property
    def calling_ae_titles(self) -> tuple[str, ...]:
        """AE titles allowed to associate with the node."""
        return tuple(p.ae_title for p in self.peers if p.may_send)


def _format_errors(err: ValidationError, prefix: str = "") -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        if prefix:
            loc = f"{prefix}.{loc}" if loc else prefix
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def settings_from_mapping(
    data: Mapping[str, Any], overrides: Mapping[str, Any] | None = None,
    *, base_dir: Path | None = None,
) -> Settings:
    """Validate a parsed TOML mapping (plus overrides, which win) into :class:`Settings`.

    Parameters
    ----------
    data : Mapping
        The parsed file.
    overrides : Mapping, optional
        Nested values that replace the file's (e.g. ``{"node": {"port": 4242}}``).
    base_dir : Path, optional
        Relative paths in the file (storage, TLS files, database) are taken relative to this
        folder (the configuration file's folder).

    Raises
    ------
    ConfigError
        Naming the offending key.
    """
    merged = _merge(dict(data), overrides or {})
    if base_dir is not None:
        merged = _resolve_paths(merged, base_dir, overrides or {})
    try:
        return Settings.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(f"invalid configuration: {_format_errors(err)}") from err


def _resolve_paths(
    merged: dict[str, Any], base_dir: Path, overrides: Mapping[str, Any]
) -> dict[str, Any]:
    node = dict(merged.get("node", {}))
    storage_overridden = "storage" in overrides.get("node", {})
    if "storage" in node and not storage_overridden and not Path(node["storage"]).is_absolute():
        node["storage"] = str(base_dir / node["storage"])
    url = node.get("database_url", "")
    if isinstance(url, str) and url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        if not path.is_absolute():
            node["database_url"] = f"sqlite:///{base_dir / path}"
    if node:
        merged["node"] = node
    tls = dict(merged.get("tls", {}))
    for key in ("certificate", "key", "ca"):
        value = tls.get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute():
            tls[key] = str(base_dir / value)
    if tls:
        merged["tls"] = tls
    return merged


def load_settings(
    path: str | Path | None = None, overrides: Mapping[str, Any] | None = None
) -> Settings:
    """Read and validate the TOML configuration file.

    Parameters
    ----------
    path : str or Path, optional
        The TOML file; ``None`` uses the embedded defaults.
    overrides : Mapping, optional
        Nested values that win over the file (command-line options).

    Raises
    ------
    ConfigError
        The file is missing, is not TOML, or holds an invalid value (the message names the key).
    """
    if path is None:
        return settings_from_mapping({}, overrides)
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError as err:
        raise ConfigError(f"configuration file {str(path)!r} not found") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"configuration file {str(path)!r} is not valid TOML: {err}") from err
    return settings_from_mapping(data, overrides, base_dir=path.resolve().parent)
