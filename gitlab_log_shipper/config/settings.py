"""Configuration: read once from the environment and ``.env`` into a frozen dataclass.

Nothing else in the package reads ``os.environ``. Every problem raises :class:`ConfigError` naming the
variable and the bad value (secrets are never echoed), which the CLI turns into exit code 2.

Variable names, defaults and meanings are the predecessor collector's (``predecessor.md``) and the API
design's (``api-post-design.md``), so an existing ``.env`` keeps working; the poller adds its own.
"""

from __future__ import annotations

import difflib
import os
import re
import ssl
import stat
import tempfile
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable, Mapping, TypeVar
from urllib.parse import urlsplit

from ..document.redact import PatternError, parse_patterns
from ..errors import ConfigError
from ..security import plain_http_to_remote, private_mkdir
from .envfile import EnvFile, read_env_file
from .headers import parse_post_headers

# Statuses GitLab uses for pipelines and jobs (CI::HasStatus). Filters naming anything else are typos.
PIPELINE_STATUSES = frozenset(
    "created waiting_for_resource preparing pending running success failed canceling canceled skipped "
    "manual scheduled".split()
)
JOB_STATUSES = PIPELINE_STATUSES
# A pipeline in one of these states will not change again unless someone retries it; these are shipped.
FINISHED_STATUSES = frozenset({"success", "failed", "canceled", "skipped", "manual"})

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")
# Settings of the webhook collector that mean nothing to a poller; accepted so old .env files still load.
IGNORED_VARIABLES = ("WEBHOOK_PORT", "WEBHOOK_SECRET")
# Secrets that may come from a file (NAME_FILE) or a systemd credential (LoadCredential=, systemd.exec(5)
# "Credentials": the file $CREDENTIALS_DIRECTORY/<credential>), which systemd recommends over Environment=.
SECRET_SOURCES = {"GITLAB_TOKEN": "gitlab_token", "API_POST_AUTH_TOKEN": "api_post_auth_token",
                  "API_POST_HEADERS": "api_post_headers"}
MAX_SECRET_FILE_BYTES = 64 * 1024
CREDENTIALS_DIRECTORY = "CREDENTIALS_DIRECTORY"  # set by systemd when the unit has LoadCredential=

# Every variable the loader reads: the one list. load_config refuses to read a name missing here, and
# unknown_variables() warns about names with the same prefixes that are not in it (misspellings).
KNOWN_VARIABLES = frozenset({
    "GITLAB_URL", "GITLAB_TOKEN", "GITLAB_PROJECTS", "GITLAB_GROUPS", "GITLAB_TIMEOUT", "GITLAB_TLS_VERIFY",
    "GITLAB_CA_BUNDLE", "GITLAB_API", "GITLAB_REQUEST_BUDGET", "GITLAB_MAX_REQUESTS_PER_SECOND",
    "POLL_INTERVAL", "POLL_OVERLAP", "POLL_CHILD_PIPELINES", "INITIAL_LOOKBACK", "DISCOVERY_INTERVAL",
    "STATE_DIR", "LOG_DIR", "LOG_OUTPUT_DIR", "LOG_LEVEL", "LOG_FORMAT", "LOG_REDACT_PATTERNS",
    "LOG_SAVE_PIPELINE_STATUS", "LOG_SAVE_PROJECTS", "LOG_EXCLUDE_PROJECTS", "LOG_SAVE_JOB_STATUS",
    "LOG_SAVE_METADATA_ALWAYS", "RETRY_ATTEMPTS", "RETRY_DELAY",
    "API_POST_ENABLED", "API_POST_URL", "API_POST_AUTH_TOKEN", "API_POST_TIMEOUT", "API_POST_RETRY_ENABLED",
    "API_POST_SAVE_TO_FILE", "API_POST_TLS_VERIFY", "API_POST_CA_BUNDLE", "API_POST_ALLOW_INSECURE",
    "API_POST_COMPRESSION", "API_POST_MAX_BYTES", "API_POST_HEADERS", "API_REQUESTS_LOG_MAX_BYTES",
    "API_REQUESTS_LOG_BACKUPS", "OUTBOX_MAX_BYTES", "OUTBOX_MAX_AGE", "OUTBOX_RETRY_MAX", "CONCURRENCY",
    "MAX_JOB_LOG_BYTES", "JOB_LOG_TIMEOUT", "SHARD", "METRICS_TEXTFILE", "DOCUMENT_FIELDS", "HEALTH_MAX_AGE",
    *IGNORED_VARIABLES, *(f"{name}_FILE" for name in SECRET_SOURCES),
})
# The prefixes of our names (GITLAB_, API_POST_, LOG_, POLL_, OUTBOX_, ...): a variable starting with one of them
# is meant for us. One-word names (SHARD, CONCURRENCY) give no prefix.
# Variables others set that happen to share our prefixes; not misspellings. GitLab CI's predefined GITLAB_*
# (gitlabhq doc/ci/variables/predefined_variables.md), for a shipper started inside a CI job, and systemd's
# STATE_DIRECTORY (systemd.exec(5): set for StateDirectory=, which the unit uses).
FOREIGN_VARIABLES = frozenset({"GITLAB_CI", "GITLAB_FEATURES", "GITLAB_USER_EMAIL", "GITLAB_USER_ID",
                               "GITLAB_USER_LOGIN", "GITLAB_USER_NAME", "STATE_DIRECTORY"})
KNOWN_PREFIXES = tuple(sorted({name.split("_", 1)[0] + "_" for name in KNOWN_VARIABLES if "_" in name}
                              | {"API_POST_"}))

T = TypeVar("T")

# Upper bounds: beyond them a value is a typo, and some would overflow a sleep or a date computation.
MAX_TIMEOUT = 3600.0
WEEK = 7 * 86400.0
MAX_LOOKBACK = 3650 * 86400.0  # ten years: GitLab CI is not much older
MAX_RETRY_ATTEMPTS = 100
MAX_RETRY_DELAY = 600.0


@dataclass(frozen=True)
class Config:
    """Everything the shipper needs to know, validated. Secrets are excluded from ``repr``."""

    gitlab_url: str
    gitlab_token: str = field(repr=False)
    gitlab_projects: tuple[str, ...] = ()
    gitlab_groups: tuple[str, ...] = ()
    gitlab_timeout: float = 30.0
    gitlab_tls_verify: bool = True
    gitlab_ca_bundle: Path | None = None

    poll_interval: float = 60.0
    poll_interval_set: bool = False  # POLL_INTERVAL given: GraphQL detection then keeps it instead of its own default
    poll_overlap: float = 300.0
    initial_lookback: float = 3600.0
    discovery_interval: float = 600.0

    state_dir: Path = Path("./state")
    log_dir: Path = Path("./logs")
    log_output_dir: Path = Path("./logs/pipeline-logs")
    log_level: str = "INFO"

    retry_attempts: int = 3
    retry_delay: float = 2.0

    save_pipeline_status: frozenset[str] | None = None  # None = all
    save_projects: frozenset[int] = frozenset()
    exclude_projects: frozenset[int] = frozenset()
    save_job_status: frozenset[str] | None = None  # None = all
    save_metadata_always: bool = True

    api_post_enabled: bool = False
    api_post_url: str | None = None
    api_post_auth_token: str | None = field(default=None, repr=False)
    api_post_timeout: float = 30.0
    api_post_retry_enabled: bool = True
    api_post_save_to_file: bool = False
    api_post_tls_verify: bool = True
    api_post_ca_bundle: Path | None = None
    api_post_allow_insecure: bool = False

    # LOG_REDACT_PATTERNS, compiled; empty = off. Not in repr: a pattern may spell out a secret.
    log_redact_patterns: tuple[re.Pattern[bytes], ...] = field(default=(), repr=False)

    outbox_max_bytes: int = 5 * 1024**3
    outbox_max_age: float = 7 * 86400.0
    outbox_retry_max: float = 900.0

    concurrency: int = 8
    gitlab_max_requests_per_second: float = 0.0  # 0 = no cap of our own (GitLab's RateLimit-* still obeyed)
    poll_child_pipelines: bool = True
    api_post_compression: str = "none"  # none | gzip
    max_job_log_bytes: int = 100 * 1024**2
    api_post_max_bytes: int = 0  # 0 = unlimited
    shard: tuple[int, int] = (0, 1)  # (index, count): this instance polls projects with id % count == index

    # -- operating it: extra POST headers, api-requests.log rotation, log format, metrics --------
    api_post_headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # values are secrets
    api_requests_log_max_bytes: int = 50 * 1024**2  # 0: the shipper never rotates it (logrotate does)
    api_requests_log_backups: int = 5
    log_format: str = "text"  # text | json
    metrics_textfile: Path | None = None  # Prometheus textfile, rewritten after every cycle

    ignored_variables: tuple[str, ...] = ()
    # Not fatal, said by `check` (a "!" line) and logged once each at start: unknown variables, secret files
    # every user can read.
    warnings: tuple[str, ...] = ()
    unknown_names: tuple[str, ...] = ()  # variables with the shipper's prefixes that are no setting (misspellings?)
    # The env file's lines that systemd's EnvironmentFile= would read differently (for `check`).
    systemd_differences: tuple[str, ...] = ()
    job_log_timeout: float = 600.0  # JOB_LOG_TIMEOUT: a whole job-log download, every attempt included
    document_fields: str = "enriched"  # DOCUMENT_FIELDS: enriched (sections, failure details, links) | design
    gitlab_api: str = "auto"  # GITLAB_API: auto (GraphQL detection when GitLab offers it) | rest | graphql
    gitlab_request_budget: float = 2000.0  # GITLAB_REQUEST_BUDGET: GitLab requests a minute; detection uses <= 10 %
    health_max_age: float | None = None  # HEALTH_MAX_AGE: `health` fails past it; None = 5 x the POLL_INTERVAL in use

    @property
    def poll_interval_text(self) -> str:
        """``every 60 s``, or both defaults while the first cycle's probe has yet to decide how changes are found."""
        if self.gitlab_api == "rest" or self.poll_interval_set:
            return f"every {self.poll_interval:g} s"
        return f"every {self.poll_interval:g} s with REST, {self.effective_poll_interval_graphql:g} s with GraphQL"

    @property
    def effective_poll_interval_graphql(self) -> float:
        """POLL_INTERVAL when GraphQL detection is used: the one given, else GRAPHQL_POLL_INTERVAL (detection costs a
        few requests per cycle whatever the number of projects, so polling often is cheap)."""
        return self.poll_interval if self.poll_interval_set else GRAPHQL_POLL_INTERVAL

    @property
    def mode(self) -> str:
        """``api``, ``dual`` or ``file`` — the three modes of the design."""
        if not self.api_post_enabled:
            return "file"
        return "dual" if self.api_post_save_to_file else "api"

    @property
    def writes_files(self) -> bool:
        return self.mode in ("file", "dual")

    @property
    def posts(self) -> bool:
        return self.mode in ("api", "dual")

    @property
    def gitlab_verify(self) -> bool | str:
        """python-gitlab's ``ssl_verify``: the CA bundle's path, else whether to verify at all."""
        return str(self.gitlab_ca_bundle) if self.gitlab_ca_bundle else self.gitlab_tls_verify

    @property
    def api_post_verify(self) -> bool | str:
        """requests' ``verify`` for POSTs: the CA bundle's path, else whether to verify at all."""
        return str(self.api_post_ca_bundle) if self.api_post_ca_bundle else self.api_post_tls_verify

    @property
    def api_requests_log(self) -> Path:
        return self.log_dir / "api-requests.log"

    @property
    def app_log(self) -> Path:
        return self.log_dir / "gitlab-log-shipper.log"

    def secrets(self) -> tuple[str, ...]:
        """Every secret value, for redaction checks."""
        headers = tuple(value for _, value in self.api_post_headers)
        return tuple(s for s in (self.gitlab_token, self.api_post_auth_token, *headers) if s)


# --------------------------------------------------------------------------------------------------
# Parsers: each takes the variable name and raw text, returns the value or raises ConfigError.


def _bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(name, f"expected true or false, got {raw!r}")


def _number(name: str, raw: str, *, minimum: float, maximum: float, integer: bool = False) -> float:
    try:
        value = int(raw.strip()) if integer else float(raw.strip())
    except ValueError:
        kind = "a whole number" if integer else "a number"
        raise ConfigError(name, f"expected {kind}, got {raw!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(name, f"expected a finite number, got {raw!r}")
    if value < minimum:
        raise ConfigError(name, f"must be at least {minimum:g}, got {raw!r}")
    if value > maximum:
        raise ConfigError(name, f"must be at most {maximum:g}, got {raw!r}")
    return value


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


GRAPHQL_POLL_INTERVAL = 10.0
"""POLL_INTERVAL's default with GraphQL detection (REST: 60 s)."""


def parse_duration(raw: str) -> timedelta | None:
    """``90``, ``90s``, ``15m``, ``1h``, ``2d``, ``1w`` → timedelta; None when unparseable or beyond
    what a timedelta can hold."""
    match = _DURATION.match(raw)
    if not match:
        return None
    try:
        return timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2).lower()])
    except OverflowError:
        return None


def _duration(name: str, raw: str, *, minimum: float, maximum: float) -> float:
    value = parse_duration(raw)
    if value is None:
        if _DURATION.match(raw):
            raise ConfigError(name, f"must be at most {_human(maximum)}, got {raw!r}")
        raise ConfigError(name, f"expected seconds or a duration like 30s, 15m, 1h, 2d; got {raw!r}")
    seconds = value.total_seconds()
    if seconds < minimum:
        raise ConfigError(name, f"must be at least {minimum:g} seconds, got {raw!r}")
    if seconds > maximum:
        raise ConfigError(name, f"must be at most {_human(maximum)}, got {raw!r}")
    return seconds


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_UNIT_BYTES = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def _size(name: str, raw: str, *, minimum: int) -> int:
    """``1048576``, ``500M``, ``5G``, ``5GiB`` → bytes (binary units)."""
    match = _SIZE.match(raw)
    if not match:
        raise ConfigError(name, f"expected a size in bytes or like 500M, 5G; got {raw!r}")
    value = int(float(match.group(1)) * _UNIT_BYTES[match.group(2).lower()])
    if value < minimum:
        raise ConfigError(name, f"must be at least {minimum} bytes, got {raw!r}")
    return value


def _shard(name: str, raw: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", raw)
    if not match:
        raise ConfigError(name, f"expected INDEX/COUNT like 0/3, got {raw!r}")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or index >= count:
        raise ConfigError(name, f"INDEX must be 0 to COUNT-1 and COUNT at least 1, got {raw!r}")
    return index, count


def _choice(name: str, raw: str, choices: tuple[str, ...]) -> str:
    value = raw.strip().lower()
    if value not in choices:
        raise ConfigError(name, f"expected one of {', '.join(choices)}, got {raw!r}")
    return value


def _human(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g} seconds"


def _http_url(name: str, raw: str, *, allow_query: bool = True) -> str:
    """An http(s) URL with a host, no credentials, no whitespace. Error messages show it without its
    user info and query, where secrets would be."""
    url = raw.strip()
    shown = repr(_without_secrets(url))
    if any(ch.isspace() or ord(ch) < 32 or 127 <= ord(ch) < 160 for ch in url):
        raise ConfigError(name, f"contains whitespace or control characters: {shown}")
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
    except ValueError:  # "http://[::1" and the like
        raise ConfigError(name, f"is not a valid URL: {shown}") from None
    if parts.scheme not in ("http", "https") or not hostname:
        raise ConfigError(name, f"expected an http:// or https:// URL, got {shown}")
    if parts.username or parts.password:
        # Credentials in a URL end up in logs; the tokens have their own variables.
        raise ConfigError(name, "must not contain credentials; use the token variables")
    if not allow_query and (parts.query or parts.fragment):
        raise ConfigError(name, f"must be the base URL, without ?query or #fragment: {shown}")
    try:
        parts.port
    except ValueError:
        raise ConfigError(name, f"has an invalid port: {shown}") from None
    return url


def _without_secrets(url: str) -> str:
    """``https://user:pw@host/p?token=x`` → ``https://***@host/p?***`` for error messages."""
    text = re.sub(r"^([^:/?#]*://)[^/?#]*@", r"\1***@", url)
    return re.sub(r"[?#].*$", "?***", text)


def _list(raw: str) -> list[str]:
    return [item.strip() for item in raw.split(",") if item.strip()]


def _status_filter(name: str, raw: str, allowed: frozenset[str]) -> frozenset[str] | None:
    items = [item.lower() for item in _list(raw)]
    if not items:
        raise ConfigError(name, "is empty; use 'all' or a comma list of statuses")
    if "all" in items:
        if len(items) > 1:
            raise ConfigError(name, "'all' cannot be combined with other statuses")
        return None
    unknown = sorted(set(items) - allowed)
    if unknown:
        raise ConfigError(name, f"unknown status {', '.join(unknown)}; known: {', '.join(sorted(allowed))}")
    return frozenset(items)


def _pipeline_status_filter(name: str, raw: str) -> frozenset[str] | None:
    """Like :func:`_status_filter`; a list with no finished status would ship nothing, ever."""
    statuses = _status_filter(name, raw, PIPELINE_STATUSES)
    if statuses is not None and not statuses & FINISHED_STATUSES:
        raise ConfigError(name, f"names no finished status, so nothing would ever be shipped; only "
                                f"{', '.join(sorted(FINISHED_STATUSES))} pipelines are shipped")
    return statuses


def _ca_bundle(name: str, raw: str) -> Path:
    """A PEM file of CA certificates (or an OpenSSL hashed folder of them) that must load now."""
    path = Path(raw).expanduser()
    if os.path.isdir(path):  # os.path: False rather than an exception for a name too long
        try:
            os.listdir(path)
        except OSError as exc:
            raise ConfigError(name, f"cannot read the folder {raw!r}: {exc.strerror or exc}") from None
        return path
    if not os.path.isfile(path):
        raise ConfigError(name, f"no such file: {raw!r}")
    try:
        ssl.create_default_context(cafile=str(path))
    except ssl.SSLError:
        raise ConfigError(name, f"{raw!r} holds no usable PEM CA certificate") from None
    except OSError as exc:
        raise ConfigError(name, f"cannot read {raw!r}: {exc.strerror or exc}") from None
    return path


def _project_ids(name: str, raw: str) -> frozenset[int]:
    ids = set()
    for item in _list(raw):
        if not item.isdigit() or int(item) <= 0:
            raise ConfigError(name, f"expected a comma list of numeric project IDs, got {item!r}")
        ids.add(int(item))
    return frozenset(ids)


def _refs(name: str, raw: str) -> tuple[str, ...]:
    """Project or group references: numeric IDs or full paths (group/subgroup/project)."""
    refs = []
    for item in _list(raw):
        ref = item.strip("/")
        if not ref or not re.fullmatch(r"[\w.\-/]+", ref) or "//" in ref or ".." in ref.split("/"):
            raise ConfigError(name, f"expected numeric IDs or full paths, got {item!r}")
        refs.append(ref)
    return tuple(dict.fromkeys(refs))


# --------------------------------------------------------------------------------------------------


def read_environment(env_file: str | os.PathLike[str] | EnvFile | None, environ: Mapping[str, str]) -> dict[str, str]:
    """The env file's values under the real environment: real environment > env file > built-in default.

    ``env_file=None`` reads ``./.env`` when it exists; a named file must exist (a FIFO or ``/dev/fd/N`` is fine:
    it is read once, by :func:`~gitlab_log_shipper.config.envfile.read_env_file`, whose docstring gives the syntax).
    """
    values: dict[str, str] = {}
    loaded = _env_file(env_file)
    if loaded is not None:
        values.update(loaded.values)
    values.update(environ)
    return values


def _env_file(env_file: str | os.PathLike[str] | EnvFile | None) -> EnvFile | None:
    if isinstance(env_file, EnvFile):
        return env_file
    if env_file is None:
        return read_env_file(".env") if Path(".env").is_file() else None
    return read_env_file(env_file)


def unknown_variables(env: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """Names in ``env`` with one of our prefixes that no setting has, each with the closest known name (or None):
    ``POLL_INTERVALL`` → ``POLL_INTERVAL``, ``API_POST_ENABLE`` → ``API_POST_ENABLED``. Sorted by name."""
    found = []
    for name in sorted(env):
        if name in KNOWN_VARIABLES or name in FOREIGN_VARIABLES or not name.startswith(KNOWN_PREFIXES):
            continue
        close = difflib.get_close_matches(name, KNOWN_VARIABLES, n=1, cutoff=0.75)
        found.append((name, close[0] if close else None))
    return found


def _unknown_warnings(env: Mapping[str, str]) -> list[str]:
    return [f"{name} is not a setting of gitlab-log-shipper and is ignored"
            + (f"; did you mean {suggestion}?" if suggestion else "")
            for name, suggestion in unknown_variables(env)]


def _read_secret_file(variable: str, path: Path) -> tuple[str, list[str]]:
    """A secret's file → (value, warnings). Errors name ``variable`` and the path, never the content."""
    shown = repr(str(path))
    try:
        # O_NONBLOCK: a FIFO without a writer must not hang the start; only a regular file is read.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise ConfigError(variable, f"{shown} is not a regular file")
        with open(fd, "rb") as handle:
            data = handle.read(MAX_SECRET_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(variable, f"no such file: {shown}") from None
    except OSError as exc:
        raise ConfigError(variable, f"cannot read {shown}: {exc.strerror or exc.__class__.__name__}") from None
    if len(data) > MAX_SECRET_FILE_BYTES:
        raise ConfigError(variable, f"{shown} is larger than {MAX_SECRET_FILE_BYTES // 1024} KiB: not a secret")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(variable, f"{shown} is not UTF-8 text") from None
    text = text[:-1] if text.endswith("\n") else text  # echo and editors add one (then stripped like any variable)
    warnings = []
    if info.st_mode & stat.S_IROTH:
        warnings.append(f"{variable}: {shown} can be read by every user of this machine; chmod o-r it (0600 or 0640)")
    return text, warnings


def _secret(env: Mapping[str, str], name: str) -> tuple[str | None, str, list[str]]:
    """A secret from exactly one of NAME, NAME_FILE or the systemd credential → (value, where it came from, warnings).

    The value is returned as read (the plain variable's caller strips it as it strips every variable)."""
    plain = env.get(name)
    file_name = env.get(f"{name}_FILE")
    sources: list[tuple[str, Path | None]] = []
    if plain is not None and plain.strip():
        sources.append((name, None))
    if file_name is not None and file_name.strip():
        sources.append((f"{name}_FILE", Path(file_name.strip())))
    credentials = env.get(CREDENTIALS_DIRECTORY, "").strip()
    if credentials:
        credential = Path(credentials) / SECRET_SOURCES[name]
        if os.path.lexists(credential):
            sources.append((f"the systemd credential {SECRET_SOURCES[name]}", credential))
    if not sources:
        return None, name, []
    if len(sources) > 1:
        raise ConfigError(name, f"is given twice, by {' and by '.join(where for where, _ in sources)}; keep one")
    where, path = sources[0]
    if path is None:
        return plain, name, []
    value, warnings = _read_secret_file(where, path)
    if not value.strip():
        raise ConfigError(where, f"{str(path)!r} is empty")
    return value, where, warnings


def load_config(env_file: str | os.PathLike[str] | EnvFile | None = None,
                environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate the whole configuration. Raises ConfigError on the first bad variable."""
    loaded = _env_file(env_file)
    env = read_environment(loaded, os.environ if environ is None else environ)
    warnings = _unknown_warnings(env)
    unknown_names = tuple(name for name, _ in unknown_variables(env))
    secrets: dict[str, str | None] = {}
    secret_origin: dict[str, str] = {}
    for secret_name in SECRET_SOURCES:
        value, origin, file_warnings = _secret(env, secret_name)
        secrets[secret_name], secret_origin[secret_name] = value, origin
        warnings.extend(file_warnings)

    def get(name: str, default: str | None = None) -> str | None:
        if name not in KNOWN_VARIABLES:
            raise AssertionError(f"{name} is read by load_config but missing from KNOWN_VARIABLES")
        value = secrets[name] if name in secrets else env.get(name)
        if value is None or value.strip() == "":
            return default
        return value.strip()

    def opt(name: str, default: str, parse: Callable[[str, str], T]) -> T:
        return parse(name, get(name, default) or default)

    def required(name: str) -> str:
        value = get(name)
        if value is None:
            hint = f" (nor {name}_FILE)" if name in SECRET_SOURCES else ""
            raise ConfigError(name, f"is required but not set{hint}")
        return value

    gitlab_url = _http_url("GITLAB_URL", required("GITLAB_URL"), allow_query=False).rstrip("/")
    gitlab_token = required("GITLAB_TOKEN")
    token_origin = secret_origin["GITLAB_TOKEN"]  # errors name the file or credential the value came from
    if len(gitlab_token) < 10:
        raise ConfigError(token_origin, "looks truncated (shorter than 10 characters)")
    if any(ch.isspace() for ch in gitlab_token):
        raise ConfigError(token_origin, "contains whitespace")

    log_level = (get("LOG_LEVEL", "INFO") or "INFO").upper()
    if log_level not in LOG_LEVELS:
        raise ConfigError("LOG_LEVEL", f"expected one of {', '.join(LOG_LEVELS)}, got {get('LOG_LEVEL')!r}")

    api_post_enabled = opt("API_POST_ENABLED", "false", _bool)
    api_post_url_raw = get("API_POST_URL")
    api_post_url = _http_url("API_POST_URL", api_post_url_raw) if api_post_url_raw else None
    if api_post_enabled and api_post_url is None:
        raise ConfigError("API_POST_URL", "is required when API_POST_ENABLED=true")
    api_token = get("API_POST_AUTH_TOKEN")
    if api_token is not None and any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in api_token):
        raise ConfigError(secret_origin["API_POST_AUTH_TOKEN"], "contains whitespace or control characters")
    if api_token is not None and api_token == gitlab_token:
        raise ConfigError(secret_origin["API_POST_AUTH_TOKEN"], "is GITLAB_TOKEN itself: the receiver would be handed access to "
                                                 "GitLab; give it a token of its own")

    # Transport: TLS is verified unless switched off explicitly; a private CA is given as a bundle.
    gitlab_tls_verify = opt("GITLAB_TLS_VERIFY", "true", _bool)
    gitlab_ca_bundle = _ca_bundle("GITLAB_CA_BUNDLE", get("GITLAB_CA_BUNDLE")) if get("GITLAB_CA_BUNDLE") else None
    if gitlab_ca_bundle and not gitlab_tls_verify:
        raise ConfigError("GITLAB_CA_BUNDLE", "is set while GITLAB_TLS_VERIFY=false; a CA bundle is only used to "
                                              "verify certificates: remove one of the two")
    api_tls_verify = opt("API_POST_TLS_VERIFY", "true", _bool)
    api_ca_bundle = _ca_bundle("API_POST_CA_BUNDLE", get("API_POST_CA_BUNDLE")) if get("API_POST_CA_BUNDLE") else None
    if api_ca_bundle and not api_tls_verify:
        raise ConfigError("API_POST_CA_BUNDLE", "is set while API_POST_TLS_VERIFY=false; a CA bundle is only used "
                                                "to verify certificates: remove one of the two")
    allow_insecure = opt("API_POST_ALLOW_INSECURE", "false", _bool)
    if api_post_enabled and api_token and plain_http_to_remote(api_post_url) and not allow_insecure:
        raise ConfigError("API_POST_URL", "is plain http to a non-loopback host, so the bearer token would travel "
                                          "unencrypted; use https, or set API_POST_ALLOW_INSECURE=true to accept that")

    try:
        redact_patterns = parse_patterns(env.get("LOG_REDACT_PATTERNS") or "")  # unstripped: a pattern may end in a blank
    except PatternError as exc:
        raise ConfigError("LOG_REDACT_PATTERNS", str(exc)) from None

    save_projects = opt("LOG_SAVE_PROJECTS", "", lambda n, r: _project_ids(n, r))
    exclude_projects = opt("LOG_EXCLUDE_PROJECTS", "", lambda n, r: _project_ids(n, r))

    state_dir = Path(get("STATE_DIR", "./state") or "./state")
    log_dir = Path(get("LOG_DIR", "./logs") or "./logs")
    log_output_dir = Path(get("LOG_OUTPUT_DIR", "./logs/pipeline-logs") or "./logs/pipeline-logs")

    # -- operating it ------------------------------------------------------------------------------
    api_post_headers = parse_post_headers(secret_origin["API_POST_HEADERS"], get("API_POST_HEADERS", "") or "",
                                          auth_token_set=api_token is not None)
    if api_post_enabled and api_post_headers and plain_http_to_remote(api_post_url) and not allow_insecure:
        # The header values are secrets as much as the bearer token (a gateway key): the same rule as above.
        raise ConfigError("API_POST_URL", "is plain http to a non-loopback host, so the API_POST_HEADERS values would "
                                          "travel unencrypted; use https, or set API_POST_ALLOW_INSECURE=true to "
                                          "accept that")
    log_format = (get("LOG_FORMAT", "text") or "text").lower()
    if log_format not in LOG_FORMATS:
        raise ConfigError("LOG_FORMAT", f"expected text or json, got {get('LOG_FORMAT')!r}")
    metrics_raw = get("METRICS_TEXTFILE")
    metrics_textfile = Path(metrics_raw) if metrics_raw else None
    if metrics_textfile is not None and metrics_textfile.suffix != ".prom":
        raise ConfigError("METRICS_TEXTFILE", "must end in .prom (node_exporter's textfile collector reads only *.prom)")

    return Config(
        gitlab_url=gitlab_url,
        gitlab_token=gitlab_token,
        gitlab_projects=opt("GITLAB_PROJECTS", "", _refs),
        gitlab_groups=opt("GITLAB_GROUPS", "", _refs),
        gitlab_timeout=opt("GITLAB_TIMEOUT", "30", lambda n, r: _duration(n, r, minimum=1, maximum=MAX_TIMEOUT)),
        gitlab_tls_verify=gitlab_tls_verify,
        gitlab_ca_bundle=gitlab_ca_bundle,
        poll_interval=opt("POLL_INTERVAL", "60", lambda n, r: _duration(n, r, minimum=1, maximum=WEEK)),
        poll_interval_set=get("POLL_INTERVAL") is not None,
        poll_overlap=opt("POLL_OVERLAP", "300", lambda n, r: _duration(n, r, minimum=0, maximum=WEEK)),
        initial_lookback=opt("INITIAL_LOOKBACK", "1h", lambda n, r: _duration(n, r, minimum=0, maximum=MAX_LOOKBACK)),
        discovery_interval=opt("DISCOVERY_INTERVAL", "600", lambda n, r: _duration(n, r, minimum=1, maximum=WEEK)),
        state_dir=state_dir,
        log_dir=log_dir,
        log_output_dir=log_output_dir,
        log_level=log_level,
        retry_attempts=int(opt("RETRY_ATTEMPTS", "3", lambda n, r: _number(n, r, minimum=0, maximum=MAX_RETRY_ATTEMPTS,
                                                                            integer=True))),
        retry_delay=opt("RETRY_DELAY", "2", lambda n, r: _duration(n, r, minimum=0, maximum=MAX_RETRY_DELAY)),
        save_pipeline_status=opt("LOG_SAVE_PIPELINE_STATUS", "all", _pipeline_status_filter),
        save_projects=save_projects,
        exclude_projects=exclude_projects,
        save_job_status=opt("LOG_SAVE_JOB_STATUS", "all", lambda n, r: _status_filter(n, r, JOB_STATUSES)),
        save_metadata_always=opt("LOG_SAVE_METADATA_ALWAYS", "true", _bool),
        api_post_enabled=api_post_enabled,
        api_post_url=api_post_url,
        api_post_auth_token=api_token,
        api_post_timeout=opt("API_POST_TIMEOUT", "30", lambda n, r: _duration(n, r, minimum=1, maximum=MAX_TIMEOUT)),
        api_post_retry_enabled=opt("API_POST_RETRY_ENABLED", "true", _bool),
        api_post_save_to_file=opt("API_POST_SAVE_TO_FILE", "false", _bool),
        outbox_max_bytes=opt("OUTBOX_MAX_BYTES", "5G", lambda n, r: _size(n, r, minimum=1024 * 1024)),
        outbox_max_age=opt("OUTBOX_MAX_AGE", "7d", lambda n, r: _duration(n, r, minimum=60, maximum=MAX_LOOKBACK)),
        outbox_retry_max=opt("OUTBOX_RETRY_MAX", "15m", lambda n, r: _duration(n, r, minimum=1, maximum=WEEK)),
        concurrency=int(opt("CONCURRENCY", "8", lambda n, r: _number(n, r, minimum=1, maximum=64, integer=True))),
        gitlab_max_requests_per_second=opt("GITLAB_MAX_REQUESTS_PER_SECOND", "0", lambda n, r: _number(n, r, minimum=0, maximum=10000)),
        poll_child_pipelines=opt("POLL_CHILD_PIPELINES", "true", _bool),
        api_post_compression=opt("API_POST_COMPRESSION", "none", lambda n, r: _choice(n, r, ("none", "gzip"))),
        max_job_log_bytes=opt("MAX_JOB_LOG_BYTES", "100M", lambda n, r: _size(n, r, minimum=4096)),
        api_post_max_bytes=opt("API_POST_MAX_BYTES", "0", lambda n, r: 0 if r.strip() == "0" else _size(n, r, minimum=64 * 1024)),
        shard=opt("SHARD", "0/1", _shard),
        api_post_tls_verify=api_tls_verify,
        api_post_ca_bundle=api_ca_bundle,
        api_post_allow_insecure=allow_insecure,
        log_redact_patterns=redact_patterns,
        api_post_headers=api_post_headers,
        api_requests_log_max_bytes=opt("API_REQUESTS_LOG_MAX_BYTES", "50M", lambda n, r: _size(n, r, minimum=0)),
        api_requests_log_backups=int(opt("API_REQUESTS_LOG_BACKUPS", "5", lambda n, r: _number(n, r, minimum=1, maximum=1000, integer=True))),
        log_format=log_format,
        metrics_textfile=metrics_textfile,
        ignored_variables=tuple(name for name in IGNORED_VARIABLES if get(name) is not None),
        warnings=tuple(warnings),
        unknown_names=unknown_names,
        systemd_differences=tuple(str(d) for d in loaded.differences) if loaded is not None else (),
        job_log_timeout=opt("JOB_LOG_TIMEOUT", "10m", lambda n, r: _duration(n, r, minimum=1, maximum=WEEK)),
        document_fields=opt("DOCUMENT_FIELDS", "enriched", lambda n, r: _choice(n, r, ("enriched", "design"))),
        gitlab_api=opt("GITLAB_API", "auto", lambda n, r: _choice(n, r, ("auto", "rest", "graphql"))),
        gitlab_request_budget=opt("GITLAB_REQUEST_BUDGET", "2000", lambda n, r: _number(n, r, minimum=10, maximum=10**7)),
        health_max_age=None if get("HEALTH_MAX_AGE") is None else _duration("HEALTH_MAX_AGE", get("HEALTH_MAX_AGE") or "", minimum=1, maximum=WEEK),
    )


def startup_warnings(config: Config) -> list[str]:
    """Transport settings that weaken security, one message each; logged as warnings at every start."""
    warnings: list[str] = []
    if not config.gitlab_tls_verify:
        warnings.append("GITLAB_TLS_VERIFY=false: GitLab's TLS certificate is NOT verified; whoever can intercept "
                        "the connection can read GITLAB_TOKEN and the job logs. Prefer GITLAB_CA_BUNDLE.")
    if plain_http_to_remote(config.gitlab_url):
        warnings.append("GITLAB_URL uses plain http to a non-loopback host: GITLAB_TOKEN and the job logs travel "
                        "unencrypted. Use https.")
    if config.posts:
        if not config.api_post_tls_verify:
            warnings.append("API_POST_TLS_VERIFY=false: the receiver's TLS certificate is NOT verified; whoever can "
                            "intercept the connection can read API_POST_AUTH_TOKEN and the documents. "
                            "Prefer API_POST_CA_BUNDLE.")
        if plain_http_to_remote(config.api_post_url):
            if config.api_post_auth_token:
                warnings.append("API_POST_ALLOW_INSECURE=true: the bearer token and the documents are sent over "
                                "plain http to a non-loopback host. Use https.")
            else:
                warnings.append("API_POST_URL uses plain http to a non-loopback host: the documents travel "
                                "unencrypted. Use https.")
    return warnings


def prepare_directories(config: Config) -> None:
    """Create ``STATE_DIR``, ``LOG_DIR`` and (when files are written) ``LOG_OUTPUT_DIR`` — mode 0700 for
    every folder created — and prove now that each can be read and written, rather than at the first
    pipeline. A folder that cannot be is a ConfigError naming its variable."""
    folders = [("STATE_DIR", config.state_dir), ("LOG_DIR", config.log_dir)]
    if config.writes_files:
        folders.append(("LOG_OUTPUT_DIR", config.log_output_dir))
    for name, folder in folders:
        _usable_folder(name, Path(folder))


def _usable_folder(name: str, folder: Path) -> None:
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise ConfigError(name, f"{str(folder)!r} exists and is not a folder")
    try:
        private_mkdir(folder)
    except OSError as exc:
        raise ConfigError(name, f"cannot create {str(folder)!r}: {exc.strerror or exc}") from None
    try:
        os.listdir(folder)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(name, f"{str(folder)!r} is not readable and writable: {exc.strerror or exc}") from None
