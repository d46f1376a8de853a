"""The node's settings: one TOML file validated at start-up into a frozen :class:`Settings`.

Bad values are refused with a :class:`~node.errors.ConfigError` whose message names the key
(``node.port: ...``); nothing is clamped. Every table is declared here as a model - the network
(``node``, ``tls``, ``peers``, ``dispatch``) and the parts' sections (``analysis``, ``courses``,
``followup`` with ``followup.notify``, ``dashboard``) - so any command that reads the file
validates all of it at start-up. Unknown tables and keys are refused.

Example: ``deploy/node.example.toml``.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from node.errors import ConfigError
from processing.relaxivity import (
    DEFAULT_RELAXIVITY_PER_MM_S,
    RelaxivityError,
    normalise_overrides,
)

if TYPE_CHECKING:
    from node.chain import ChainSettings

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
    #: associations at once (counted from their A-ASSOCIATE-RQ: a connection that has not sent
    #: one holds no slot; it is closed after ``acse_timeout_s``)
    max_associations: int = Field(10, ge=1, le=1000)
    #: associations at once from one calling AE title (0: up to ``max_associations``), so that
    #: one peer's silent or stuck associations cannot lock the others out
    max_associations_per_peer: int = Field(6, ge=0, le=1000)
    acse_timeout_s: float = Field(30.0, gt=0)
    dimse_timeout_s: float = Field(60.0, gt=0)
    network_timeout_s: float = Field(60.0, gt=0)
    #: largest P-DATA PDU we accept (bytes); 0 is refused (pynetdicom's "unlimited")
    maximum_pdu_size: int = Field(262144, ge=4096, le=16 * 1024 * 1024)
    #: largest dataset (MB) a C-STORE may bring; beyond it the rest is discarded as it arrives
    #: and the request refused with 0xA700 (node.incoming); 0: no limit
    max_dataset_mb: float = Field(4096.0, ge=0)
    #: largest size (MB) a Deflated Explicit VR Little Endian dataset may inflate to (0: no
    #: limit); a larger one is refused with 0xA700 before it is inflated further
    max_inflated_mb: float = Field(128.0, ge=0)
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


# -- the sections of the node's parts (one place: every command that reads the file validates
# all of them at start-up) ------------------------------------------------------------------------


class NotifySettings(BaseModel):
    """Where notifications go (the ``[followup.notify]`` table).

    Attributes
    ----------
    webhook_url : str
        ``http(s)://`` URL receiving a JSON POST per notification; empty: no webhook.
    webhook_timeout_s : float
        Connect/read timeout of the POST (s).
    smtp_host, smtp_port :
        SMTP server; empty host: no e-mail.
    smtp_security : {"none", "starttls", "tls"}
        Plain SMTP, STARTTLS upgrade (RFC 3207) or implicit TLS (SMTPS).
    smtp_username, smtp_password_env :
        Login (optional); the password is read from the named environment variable.
    mail_from, mail_to :
        Sender and recipients.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    webhook_url: str = ""
    webhook_timeout_s: float = Field(10.0, gt=0, le=300)
    smtp_host: str = ""
    smtp_port: int = Field(25, ge=1, le=65535)
    smtp_security: str = Field("none", pattern="^(none|starttls|tls)$")
    smtp_timeout_s: float = Field(30.0, gt=0, le=600)
    smtp_username: str = ""
    smtp_password_env: str = ""
    mail_from: str = "spine-node@localhost"
    mail_to: tuple[str, ...] = ()

    @field_validator("webhook_url")
    @classmethod
    def _http_only(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL (or empty)")
        return value

    @model_validator(mode="after")
    def _recipients(self) -> NotifySettings:
        if self.smtp_host and not self.mail_to:
            raise ValueError("mail_to: at least one recipient is needed when smtp_host is set")
        return self


class FollowupWindowSetting(BaseModel):
    """One expected follow-up window, in days after the first treatment day."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    label: str = Field(min_length=1, max_length=64)
    start_days: int = Field(ge=0, le=3650)
    end_days: int = Field(ge=1, le=3650)

    @model_validator(mode="after")
    def _ordered(self) -> FollowupWindowSetting:
        if self.end_days < self.start_days:
            raise ValueError(f"window {self.label!r}: end_days must be >= start_days")
        return self


#: 6-12 weeks, then about every 3 months in year 1 (±1 month), docs/science.md §1.10
DEFAULT_WINDOWS = (
    FollowupWindowSetting(label="6-12 weeks", start_days=42, end_days=84),
    FollowupWindowSetting(label="6 months", start_days=152, end_days=213),
    FollowupWindowSetting(label="9 months", start_days=244, end_days=305),
    FollowupWindowSetting(label="12 months", start_days=335, end_days=396),
)


class FollowupSection(BaseModel):
    """The ``[followup]`` table of the configuration.

    Attributes
    ----------
    windows : list of FollowupWindowSetting
        Expected windows (days after the first treatment day).
    confirmation_days : int
        A confirmation MRI is due within this many days of a study called possible
        pseudoprogression (default 56 d = 8 weeks).
    grace_days : int
        Days after a window's end before it counts as missed (late reads, transfers).
    check_interval_s : float
        Period of the catch-up check (s); it also runs at start-up.
    notify : NotifySettings
        Webhook and e-mail.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    windows: tuple[FollowupWindowSetting, ...] = DEFAULT_WINDOWS
    confirmation_days: int = Field(56, ge=1, le=365)
    grace_days: int = Field(0, ge=0, le=365)
    check_interval_s: float = Field(3600.0, gt=0)
    notify: NotifySettings = NotifySettings()

    @model_validator(mode="after")
    def _unique_labels(self) -> FollowupSection:
        labels = [w.label for w in self.windows]
        if len(set(labels)) != len(labels):
            raise ValueError("windows: labels must be unique")
        return self


class AnalysisSection(BaseModel):
    """The ``[analysis]`` table: the analysis chain's policy (its defaults are the chain's too)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    baseline_window_days: int = Field(90, ge=0, le=3650)
    segment_type: str = Field("metastasis", pattern="^(metastasis|neoplasm|primary|gtv)$")
    radiomics: bool = True
    radiomics_bin_count: int = Field(32, ge=2, le=1024)
    radiomics_spacing_mm: float = Field(1.0, gt=0, le=10)
    alpha_beta_gy: float = Field(10.0, gt=0, le=100)
    model_path: Path | None = None
    #: version of the response rule set (processing.response): 2.0 weighs all functional
    #: evidence against the combined repeatability; 1.0 reproduces calls made before it
    rule_set: str = Field("2.0", pattern=r"^(1\.0|2\.0)$")
    #: site r1 (/mM/s) by contrast agent (generic or brand name), e.g. ``{ gadobutrol = 5.0 }``;
    #: wins over the published table (processing.relaxivity)
    relaxivity_per_mM_s: dict[str, float] = Field(default_factory=dict)
    #: r1 (/mM/s) for an undeclared or unrecognised agent (a warning is recorded)
    default_relaxivity_per_mM_s: float = Field(DEFAULT_RELAXIVITY_PER_MM_S, gt=0, le=100)
    #: size limit of the per-study map cache under ``<storage>/cache/maps`` (MB): the oldest
    #: entries go first when an analysis leaves it larger; 0 disables the cache
    map_cache_mb: int = Field(2048, ge=0, le=10_000_000)
    #: folder of the map cache; default ``<storage>/cache/maps``. Entries are keyed by the
    #: instances' content (not the file meta information a receiver writes) and written
    #: atomically, so nodes, ``spine-node analyze --map-cache`` runs and test rigs may share one
    map_cache_dir: Path | None = None

    @field_validator("relaxivity_per_mM_s")
    @classmethod
    def _known_agents(cls, value: dict[str, float]) -> dict[str, float]:
        try:
            normalise_overrides(value)
        except RelaxivityError as err:
            # pydantic reports a validator's ValueError as a validation error naming the key
            raise ValueError(str(err)) from err
        return value

    def chain_settings(self) -> ChainSettings:
        """The analysis chain's settings (:class:`node.chain.ChainSettings`) of this table."""
        from dataclasses import fields

        from node.chain import ChainSettings

        names = {f.name for f in fields(ChainSettings)}
        return ChainSettings(**{k: v for k, v in self.model_dump().items() if k in names})


class CoursesSection(BaseModel):
    """The ``[courses]`` table: where priors come from and how they are fetched.

    Attributes
    ----------
    enabled : bool
        Fetch priors at all (the patient-mismatch check runs regardless).
    pacs : str
        Name (or AE title) of the peer to query; it needs ``may_receive`` (we associate with it),
        and for ``method = "move"`` also ``may_send`` (it C-STOREs into our listener) and it must
        know our AE title, host and port. Empty: no priors are fetched.
    method : {"move", "get"}
        C-MOVE to our own AE title, or C-GET on the query association.
    max_concurrent : int
        Patients retrieving at the same time.
    min_interval_s : float
        Minimum time between two queries of the same patient (s).
    retries : int
        Further attempts of a failed query or retrieval.
    retry_delay_s : float
        Delay before the first retry (s), doubled for each further one.
    baseline_window_days : int
        A baseline is the latest MR study at most this many days before the treatment date.
    timeout_s : float
        ACSE/DIMSE/network timeouts of the query/retrieve associations (s).
    calling_ae_title : str
        Our AE title on these associations; empty means ``node.ae_title``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    pacs: str = ""
    method: Literal["move", "get"] = "move"
    max_concurrent: int = Field(2, ge=1, le=16)
    min_interval_s: float = Field(300.0, ge=0)
    retries: int = Field(3, ge=0, le=20)
    retry_delay_s: float = Field(10.0, ge=0)
    baseline_window_days: int = Field(90, ge=0, le=3650)
    timeout_s: float = Field(60.0, gt=0)
    calling_ae_title: str = ""

    @field_validator("calling_ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        if value and (len(value) > 16 or "\\" in value or value != value.strip()):
            raise ValueError(f"{value!r} is not a valid AE title")
        return value


def _is_loopback(address: str | None) -> bool:
    if not address:
        return False
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class DashboardSection(BaseModel):
    """The ``[dashboard]`` table of the configuration.

    Attributes
    ----------
    enabled : bool
    bind_address : str
        Default 127.0.0.1 (local only).
    port : int
        TCP port; 0 picks a free one.
    username, password_hash :
        Login; ``password_hash`` as made by ``werkzeug.security.generate_password_hash``.
        Required when ``bind_address`` is not a loopback address.
    allow_local_without_login : bool
        Default false: every client logs in. True lets clients on a loopback address in without
        login; set it on purpose only on a single-user machine (any local user or process, and
        every client of a reverse proxy on the same host, then sees the patient pages).
    allowed_hosts : tuple of str
        Extra names accepted in the HTTP ``Host`` header, ``name`` (any port) or ``name:port``
        (e.g. the name a reverse proxy serves). Always accepted: the bind address,
        ``localhost``, ``127.0.0.1`` and ``[::1]`` with the dashboard's port. Any other ``Host``
        is answered 400 (DNS-rebinding defence).
    login_max_failures : int
        Failed logins (per client address, and per user name) before a lock-out (default 5).
    login_lockout_s : float
        First lock-out (default 30 s); it doubles with every further failure up to
        ``login_lockout_max_s`` (default 3600 s). A locked-out login is answered 429 with
        ``Retry-After``, whatever the password.
    session_lifetime_s : float
        A login session ends after this time (default 12 h); logging out ends it at once (the
        session is held server-side, an old cookie is refused).
    certificate, key : Path, optional
        Serve the dashboard over HTTPS with this certificate chain and key (PEM); cookies are
        then ``Secure``.
    secure_cookies : bool
        Mark cookies ``Secure`` although the dashboard itself speaks HTTP: set it when a TLS
        reverse proxy serves it (default false; always on with ``certificate``).
    secret_key_env : str
        Environment variable holding the session-signing key (default: a random key per start,
        which logs everybody out at a restart).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    bind_address: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    username: str = ""
    password_hash: str = ""
    allow_local_without_login: bool = False
    allowed_hosts: tuple[str, ...] = ()
    login_max_failures: int = Field(5, ge=1, le=1000)
    login_lockout_s: float = Field(30.0, gt=0)
    login_lockout_max_s: float = Field(3600.0, gt=0)
    session_lifetime_s: float = Field(43200.0, gt=0)
    certificate: Path | None = None
    key: Path | None = None
    secure_cookies: bool = False
    secret_key_env: str = ""

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for item in value:
            name = item.strip().lower()
            if not re.fullmatch(r"(\[[0-9a-f:.]+\]|[a-z0-9._-]+)(:[0-9]{1,5})?", name):
                raise ValueError(f"allowed_hosts: {item!r} is not a host name or name:port")
            out.append(name)
        return tuple(out)

    @model_validator(mode="after")
    def _login_when_remote(self) -> DashboardSection:
        if bool(self.username) != bool(self.password_hash):
            raise ValueError("username and password_hash: give both or neither")
        if not _is_loopback(self.bind_address) and not self.password_hash:
            raise ValueError(
                f"bind_address {self.bind_address!r} is not a loopback address: "
                "a username and password_hash are required"
            )
        if self.login_lockout_max_s < self.login_lockout_s:
            raise ValueError("login_lockout_max_s: must be at least login_lockout_s")
        if (self.certificate is None) != (self.key is None):
            raise ValueError("dashboard certificate and key go together")
        for name in ("certificate", "key"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"dashboard {name}: file {str(path)!r} does not exist")
        return self

    @property
    def tls(self) -> bool:
        """Whether the dashboard is served over HTTPS."""
        return self.certificate is not None


class AuditSection(_Frozen):
    """The ``[audit]`` table: the audit trail (DICOM audit messages, IHE ATNA; node.audit).

    Attributes
    ----------
    enabled : bool
        Default true.
    path : Path, optional
        The local append-only file of audit messages (default ``<storage>/audit/audit.log``).
    enterprise_site_id : str
        AuditEnterpriseSiteID of every message (e.g. the hospital's name); empty: left out.
    syslog_host, syslog_port :
        A syslog collector (an audit record repository) to send every message to; empty host:
        the local file only. Port default 6514 (syslog over TLS).
    syslog_transport : {"tls", "udp"}
        RFC 5425 over TLS (the default, as PS3.15 A.6 requires) or RFC 5426 over UDP (A.7;
        messages over 65,000 bytes then stay in the local file).
    syslog_ca : Path, optional
        CA bundle that signed the collector's certificate (default: ``tls.ca``, else the
        system's).
    """

    enabled: bool = True
    path: Path | None = None
    enterprise_site_id: str = ""
    syslog_host: str = ""
    syslog_port: int = Field(6514, ge=1, le=65535)
    syslog_transport: str = Field("tls", pattern="^(tls|udp)$")
    syslog_ca: Path | None = None

    @model_validator(mode="after")
    def _files_exist(self) -> AuditSection:
        if self.syslog_ca is not None and not Path(self.syslog_ca).is_file():
            raise ValueError(f"audit syslog_ca: file {str(self.syslog_ca)!r} does not exist")
        return self


#: the tables of the node's parts, beside ``node``, ``tls``, ``peers`` and ``dispatch``
SECTIONS = ("analysis", "courses", "followup", "dashboard")


class Settings(_Frozen):
    """The whole validated configuration."""

    node: NodeSettings = NodeSettings()
    tls: TlsSettings = TlsSettings()
    peers: tuple[Peer, ...] = (
        Peer(ae_title="STORESCU", host="127.0.0.1", may_send=True),
        Peer(ae_title="ECHOSCU", host="127.0.0.1", may_send=True),
    )
    dispatch: DispatchSettings = DispatchSettings()
    analysis: AnalysisSection = AnalysisSection()
    courses: CoursesSection = CoursesSection()
    followup: FollowupSection = FollowupSection()
    dashboard: DashboardSection = DashboardSection()
    audit: AuditSection = AuditSection()

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
        return self

    def section(self, name: str) -> BaseModel:
        """One of the parts' sections (``analysis``, ``courses``, ``followup``, ``dashboard``)."""
        if name not in SECTIONS:
            raise KeyError(name)
        return getattr(self, name)

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
    data: Mapping[str, Any],
    overrides: Mapping[str, Any] | None = None,
    *,
    base_dir: Path | None = None,
) -> Settings:
    """Validate a parsed TOML mapping (plus overrides, which win) into :class:`Settings`.

    Parameters
    ----------
    data : Mapping
        The parsed file.
    overrides : Mapping, optional
        Nested values that replace the file's (e.g. ``{"node": {"port": 4242}}``).
    base_dir : Path, optional
        Relative paths in the file (storage, TLS files, database, audit log, map cache) are taken
        relative to this folder (the configuration file's folder).

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


#: file paths of the other tables, taken relative to the configuration file's folder
_RELATIVE_PATHS: dict[str, tuple[str, ...]] = {
    "tls": ("certificate", "key", "ca"),
    "audit": ("path", "syslog_ca"),
    "analysis": ("map_cache_dir",),
}


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
    for section, keys in _RELATIVE_PATHS.items():
        table = dict(merged.get(section, {}))
        for key in keys:
            value = table.get(key)
            if isinstance(value, str) and value and not Path(value).is_absolute():
                table[key] = str(base_dir / value)
        if table:
            merged[section] = table
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
