"""Configuration of rtcontour: one validated pydantic-settings object, prefix ``RTCONTOUR_``.

Built once in ``main()`` / ``create_app()`` and passed down; nothing reads the environment
elsewhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII without backslash
_DESTINATION = re.compile(
    r"^(?P<ae>[^@]{1,16})@(?P<host>[^:@\s]+):(?P<port>\d{1,5})(?P<tls>\+tls)?$"
)

MIN_PRODUCTION_TOKEN_CHARS = 32  # openssl rand -hex 32 gives 64
_PUBLIC_TOKENS = frozenset({"development-admin-token", "replace-with-openssl-rand-hex-32"})
DEVELOPMENT_ADMIN_TOKEN = "development-admin-token"  # noqa: S105 - named as a development default


def validate_ae_title(value: str) -> str:
    """Return an AE title stripped of padding, or raise ValueError naming it."""
    stripped = value.strip()
    if not _AE_TITLE.match(stripped):
        raise ValueError(
            f"AE title {value!r} is invalid: 1 to 16 printable ASCII characters, no backslash"
        )
    return stripped


@dataclass(frozen=True)
class Destination:
    """A DICOM peer that receives every RTSTRUCT: ``AE@host:port``, or ``AE@host:port+tls``
    for DICOM TLS (see ``common.tls.client_ssl_context``), or a DICOMweb service's base URL
    (``https://pacs/dicomweb``: ``url`` set, outputs STOWed to ``<url>/studies``)."""

    ae_title: str
    host: str
    port: int
    tls: bool = False
    url: str | None = None  # a DICOMweb destination

    @property
    def is_dicomweb(self) -> bool:
        return self.url is not None

    @classmethod
    def parse(cls, text: str) -> Destination:
        if text.strip().lower().startswith(("http://", "https://")):
            url = validate_http_url(text).rstrip("/")
            parsed = urlsplit(url)
            https = parsed.scheme.lower() == "https"
            return cls("DICOMWEB", parsed.hostname or "", parsed.port or (443 if https else 80),
                       https, url)
        match = _DESTINATION.match(text.strip())
        if match is None:
            raise ValueError(f"destination {text!r} is not of the form AE@host:port[+tls] "
                             "nor a DICOMweb URL (https://host/dicomweb)")
        port = int(match["port"])
        if not 1 <= port <= 65535:
            raise ValueError(f"destination {text!r} has port {port} outside 1-65535")
        return cls(validate_ae_title(match["ae"]), match["host"], port, bool(match["tls"]))

    def __str__(self) -> str:
        if self.url is not None:
            return self.url
        return f"{self.ae_title}@{self.host}:{self.port}" + ("+tls" if self.tls else "")


_HTTP_URL = re.compile(r"^https?://[^\s/?#@]+(@[^\s/?#@]+)?(:\d{1,5})?(/[^\s]*)?$", re.IGNORECASE)


def validate_http_url(value: str) -> str:
    """Return an http(s) URL stripped of spaces, or raise ValueError naming it."""
    stripped = value.strip()
    if not _HTTP_URL.match(stripped):
        raise ValueError(f"{value!r} is not an http:// or https:// URL")
    return stripped


def _split_list(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """Every setting of rtcontour; each is documented in the README's configuration table."""

    model_config = SettingsConfigDict(env_prefix="RTCONTOUR_", extra="ignore")

    mode: Literal["development", "production"] = "development"
    data_dir: Path = Path("./var")

    # DICOM listener
    ae_title: str = "RTCONTOUR"
    dicom_host: str = "0.0.0.0"
    dicom_port: int = Field(11112, ge=1, le=65535)
    known_peers: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Associations calling another AE title than ours are refused (reason 7) unless this is set.
    accept_any_called_ae: bool = False
    # `rtcontour listener` run on its own serves its DICOM counters here (Prometheus), since
    # they are counted in its process; unset: not served (`rtcontour serve` has the API's).
    listener_metrics_port: int | None = Field(None, ge=1, le=65535)
    listener_metrics_host: str = "127.0.0.1"
    # POST /api/login: failed attempts per client address, and logins per user, allowed in
    # login_window_s; beyond them the answer is 429 with Retry-After (audited).
    login_failures_per_address: int = Field(10, ge=1, le=10_000)
    logins_per_user: int = Field(30, ge=1, le=10_000)
    login_window_s: float = Field(300.0, gt=0, le=86_400)
    quiet_period_s: float = Field(5.0, gt=0, le=3600)
    # Calling AE titles ("*": any) whose series become a job as soon as every association that
    # carried them is released, without the quiet period. Only for senders that send a whole
    # series in one association: one that splits it (an association per instance or per batch)
    # would get a job per part. Empty (the default): always wait for the quiet period.
    release_ends_quiet_period: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_associations: int = Field(10, ge=1, le=200)
    acse_timeout_s: float = Field(30.0, gt=0)
    dimse_timeout_s: float = Field(30.0, gt=0)
    network_timeout_s: float = Field(60.0, gt=0)
    max_pdu_bytes: int = Field(131072, ge=4096)  # DCMTK's maximum; fewer PDUs, faster ingest
    max_instance_bytes: int = Field(64 * 1024 * 1024, gt=0)
    min_free_disk_bytes: int = Field(512 * 1024 * 1024, ge=0)
    incoming_retention_s: float = Field(7 * 24 * 3600.0, gt=0)  # interrupted series' files
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None

    # Destinations (C-STORE SCU)
    destinations: Annotated[list[Destination], NoDecode] = Field(default_factory=list)
    send_attempts: int = Field(5, ge=1, le=50)
    send_backoff_s: float = Field(2.0, ge=0)
    # DICOMweb destinations (https://pacs/dicomweb): a bearer token, else basic auth, if set.
    dicomweb_token: SecretStr | None = None
    dicomweb_username: str | None = None
    dicomweb_password: SecretStr | None = None

    # The PACS rtcontour pulls series from (POST /api/pull, `rtcontour pull`): C-FIND there,
    # then C-MOVE to our own AE title (the PACS must know it), or C-GET where the PACS prefers
    # (pacs_retrieve "get": the instances come back on our association, into the listener of
    # `rtcontour serve`).
    pacs: Annotated[Destination | None, NoDecode] = None
    pacs_retrieve: Literal["move", "get"] = "move"
    pacs_timeout_s: float = Field(600.0, gt=0, le=86_400)  # a whole retrieve, at most

    # Webhook notifications (common.notify): URLs POSTed JSON when a job fails, ends
    # send_failed or awaits review, or the listener refuses something.
    notify_webhooks: Annotated[list[str], NoDecode] = Field(default_factory=list)
    notify_include_patient: bool = False  # patient name, ID, accession in the JSON
    notify_attempts: int = Field(6, ge=1, le=50)
    notify_backoff_s: float = Field(5.0, ge=0)
    # The dashboard's address as its users reach it (links in notifications).
    public_url: str | None = None

    # HTTP API
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=1, le=65535)
    admin_token: SecretStr | None = None
    metrics_token: SecretStr | None = None  # bearer token accepted by /metrics only

    # Queue and job store
    broker_url: str | None = None
    database_url: str | None = None
    job_attempts: int = Field(3, ge=1, le=20)
    job_time_limit_s: int = Field(1800, ge=10)
    # A running job's claim lasts this long without a heartbeat (every third of it); a job
    # whose worker died is re-enqueued by the recovery sweep once its claim expired.
    # Renewed every third of it by the running worker: a lost worker is noticed within it.
    job_lease_s: float = Field(30.0, ge=2, le=3600)
    recovery_interval_s: float = Field(10.0, gt=0, le=3600)
    # Days after a done or failed job finished before its CT instances and archived outputs
    # are deleted (the job record and audit trail stay); 0 keeps them forever.
    retention_days: float = Field(30.0, ge=0)
    worker_concurrency: int = Field(1, ge=1, le=64)

    # Contouring
    model_package: Path | None = None
    # Where routes find packages by name (default: the packages installed with rtcontour).
    model_packages_dir: Path | None = None
    # Routing rules (YAML, see common.routes); unset: contour every CT series with the newest
    # package and send to RTCONTOUR_DESTINATIONS.
    routes_file: Path | None = None
    # A clinic's structure names -> TG-263 (YAML or JSON mapping), used with the built-in
    # synonyms when approved structure sets are matched to rtcontour's structures.
    structure_names_file: Path | None = None
    # QA alerts (service.qa_trends): a structure's median Dice (approved vs rtcontour) over
    # its most recent qa_alert_window approved sets that hold it, once there are at least
    # qa_alert_min_sets, more than qa_alert_margin below what the model card expects of it
    # (or below the site's own earlier sets), or below qa_alert_dice (an absolute floor,
    # unset by default) is flagged on the dashboard.
    qa_alert_window: int = Field(10, ge=1, le=1000)
    qa_alert_min_sets: int = Field(5, ge=1, le=1000)
    qa_alert_margin: float = Field(0.1, ge=0, le=1)
    qa_alert_dice: float | None = Field(None, ge=0, le=1)
    # Scale each predicted dose so that its highest-prescription PTV's D95 equals the
    # prescription, as planners normalise a plan. Off by default: on the OpenKBP validation
    # patients it worsened both challenge scores (docs/TRAINING.md); the RTDOSE and the job
    # say when it was applied and by what factor.
    dose_normalise: bool = False
    min_slices: int = Field(10, ge=1)
    slice_gap_tolerance: float = Field(0.1, gt=0, lt=1)
    min_contour_area_mm2: float = Field(2.0, ge=0)
    smoothing: bool = False
    inference_overlap: float = Field(0.5, ge=0, lt=1)
    mirror_tta: bool = False

    # The site data set (issue 23, models.site_data): approved structure sets kept as training
    # data by routes with keep_for_training: true. Where (default <data dir>/site-dataset),
    # for how long (days after they were kept; 0 keeps them until an admin removes them),
    # and how many kept sets per structure `rtcontour finetune` needs at least.
    site_dataset_dir: Path | None = None
    site_dataset_retention_days: float = Field(730.0, ge=0)
    finetune_min_sets: int = Field(10, ge=1, le=100_000)

    @field_validator("ae_title")
    @classmethod
    def _check_ae_title(cls, value: str) -> str:
        return validate_ae_title(value)

    @field_validator("known_peers", "release_ends_quiet_period", "notify_webhooks",
                     mode="before")
    @classmethod
    def _split_comma_lists(cls, value: object) -> object:
        return _split_list(value)

    @field_validator("known_peers")
    @classmethod
    def _check_known_peers(cls, value: list[str]) -> list[str]:
        checked = []
        for peer in value:
            ae, _, host = peer.partition("@")
            checked.append(validate_ae_title(ae) + (f"@{host}" if host else ""))
        return checked

    @field_validator("release_ends_quiet_period")
    @classmethod
    def _check_release_ends_quiet_period(cls, value: list[str]) -> list[str]:
        return [ae if ae == "*" else validate_ae_title(ae) for ae in value]

    @field_validator("notify_webhooks")
    @classmethod
    def _check_notify_webhooks(cls, value: list[str]) -> list[str]:
        return [validate_http_url(url) for url in value]

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str | None) -> str | None:
        return validate_http_url(value) if value else None

    @field_validator("destinations", mode="before")
    @classmethod
    def _parse_destinations(cls, value: object) -> object:
        value = _split_list(value)
        if isinstance(value, list):
            return [Destination.parse(v) if isinstance(v, str) else v for v in value]
        return value

    @field_validator("pacs", mode="before")
    @classmethod
    def _parse_pacs(cls, value: object) -> object:
        if isinstance(value, str):
            if not value.strip():
                return None
            if value.strip().lower().startswith(("http://", "https://")):
                raise ValueError(f"RTCONTOUR_PACS {value!r} must be AET@host:port (DICOM "
                                 "C-FIND/C-MOVE), not a URL")
            try:
                return Destination.parse(value)
            except ValueError:
                raise ValueError(f"RTCONTOUR_PACS {value!r} is not of the form AET@host:port "
                                 "(or AET@host:port+tls)") from None
        return value

    @model_validator(mode="after")
    def _check_production(self) -> Settings:
        if self.mode == "production" and self.admin_token is None:
            raise ValueError("RTCONTOUR_ADMIN_TOKEN is required when RTCONTOUR_MODE=production")
        if self.mode == "production" and self.admin_token is not None:
            token = self.admin_token.get_secret_value()
            public = token.lower() in _PUBLIC_TOKENS or "replace" in token.lower()
            if public or len(token) < MIN_PRODUCTION_TOKEN_CHARS:
                raise ValueError(
                    "RTCONTOUR_ADMIN_TOKEN must be a secret of at least "
                    f"{MIN_PRODUCTION_TOKEN_CHARS} characters when RTCONTOUR_MODE=production "
                    "(not the development default nor a template's placeholder): "
                    "openssl rand -hex 32")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("RTCONTOUR_TLS_CERT_FILE and RTCONTOUR_TLS_KEY_FILE go together")
        if self.qa_alert_min_sets > self.qa_alert_window:
            raise ValueError(
                f"RTCONTOUR_QA_ALERT_MIN_SETS ({self.qa_alert_min_sets}) must not exceed "
                f"RTCONTOUR_QA_ALERT_WINDOW ({self.qa_alert_window}): no QA alert could fire")
        return self

    # Derived locations; all under data_dir so one folder holds a node's state.
    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def archive_dir(self) -> Path:
        return self.data_dir / "archive"

    @property
    def effective_site_dataset_dir(self) -> Path:
        return self.site_dataset_dir or self.data_dir / "site-dataset"

    @property
    def finetune_dir(self) -> Path:
        """Fine-tuning runs queued from the API (request, status and log per run)."""
        return self.data_dir / "finetune"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'rtcontour.db').resolve()}"

    @property
    def effective_admin_token(self) -> str:
        """The bootstrap admin token; the development default is used only in development."""
        if self.admin_token is not None:
            return self.admin_token.get_secret_value()
        return DEVELOPMENT_ADMIN_TOKEN


def job_folder(settings: Settings, job_id: str) -> Path:
    """Where the instances of a job live: ``spool/jobs/<job_id>/``."""
    return settings.spool_dir / "jobs" / job_id
