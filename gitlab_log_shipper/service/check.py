"""``check``: is this configuration going to work? Reaches out to GitLab and the receiver, looks at the
folders, and says so in one line per check.

Nothing is changed: no state is written, no document is posted (unless ``--send-test``, which posts one
clearly marked test document), no folder is created. Each check yields a :class:`Check`: ``ok`` False is
a failure (exit 1); ``warning`` marks a pass worth a look (a token expiring soon, GitLab not revealing
the token's scopes, a receiver answering 401 to a GET).
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import quote

import requests

from ..config.settings import Config
from ..delivery.poster import ApiPoster
from ..delivery.request_log import ManagedRequestLog
from ..errors import GitLabSourceError, ShipperError
from ..gitlab.graphql import GraphQLDetector, decide_api
from ..gitlab.rest import DiscoveryProblem, GitLabSource
from ..state.store import MARKER_NAME, StateStore
from ..timeutil import format_ts, utcnow
from .logsetup import APP_LOG_BACKUPS
from .status import working_folder_problem

TOKEN_EXPIRY_WARNING_DAYS = 14
REPORTER = 20  # GitLab access level needed to read job logs
ACCESS_LEVELS = {10: "Guest", 15: "Planner", 20: "Reporter", 30: "Developer", 40: "Maintainer", 50: "Owner"}
TEST_HEADER = "X-Gitlab-Log-Shipper-Test"
METRICS_FOLDER = "METRICS_TEXTFILE folder"


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    warning: bool = False


def run_checks(config: Config, *, send_test: bool, today: Callable[[], date], now: Callable[[], datetime]) -> Iterator[Check]:
    """Every check, in order, as it completes (the slow ones talk to GitLab and the receiver)."""
    yield _configuration(config)
    yield from _configuration_warnings(config)
    yield from _gitlab(config, today())
    if config.posts:
        yield _receiver(config)
        if send_test:
            yield _send_test(config, now())
    problem = working_folder_problem(_folder_list(config))
    if problem:  # nothing under a relative folder can be looked at: one line, not a traceback per folder
        yield Check("folders", False, problem)
        return
    yield from _folders(config)
    yield _state(config)


def _configuration_warnings(config: Config) -> Iterator[Check]:
    """One "!" line per unknown variable or world-readable secret file, and per env-file line that systemd's
    EnvironmentFile= would read differently (config/settings.py, config/envfile.py): they pass, but deserve a look."""
    for warning in config.warnings:
        yield Check("configuration", True, warning, warning=True)
    for difference in config.systemd_differences:
        yield Check("env file", True, f"{difference} (only matters with EnvironmentFile=; the unit passes "
                                      f"--env-file)", warning=True)


def _configuration(config: Config) -> Check:
    where = {"api": f"POST to {config.api_post_url}", "file": f"files under {config.log_output_dir}",
             "dual": f"POST to {config.api_post_url} and files under {config.log_output_dir}"}[config.mode]
    scope = []
    if config.gitlab_projects:
        scope.append(f"{len(config.gitlab_projects)} project(s)")
    if config.gitlab_groups:
        scope.append(f"{len(config.gitlab_groups)} group(s)")
    polled = " and ".join(scope) or "every project the token is a member of"
    extra = f"; {len(config.api_post_headers)} extra header(s)" if config.api_post_headers else ""
    return Check("configuration", True, f"mode {config.mode} ({where}); polling {polled} {config.poll_interval_text}{extra}")


# -- GitLab ---------------------------------------------------------------------------------------


def _gitlab(config: Config, today: date) -> Iterator[Check]:
    source = GitLabSource(config)
    source.gl.retry_transient_errors = False  # a check reports a 502 at once instead of retrying for minutes
    try:
        try:
            version = source._call("GitLab version", lambda: source.gl.http_get("/version"))
        except GitLabSourceError as exc:
            yield Check("GitLab", False, f"{config.gitlab_url}: {_reason(exc, 'GitLab version')}")
            return  # nothing else can be checked there
        edition = " (Enterprise Edition)" if isinstance(version, dict) and version.get("enterprise") else ""
        yield Check("GitLab", True, f"{config.gitlab_url} answers: version {_get(version, 'version')}{edition}")
        try:
            user = source._call("current user", lambda: source.gl.http_get("/user"))
        except GitLabSourceError as exc:
            yield Check("token user", False, _reason(exc, "current user"))
            return
        bot = " (a bot user: project or group access token)" if _get(user, "bot") is True else ""
        yield Check("token user", True, f"the token acts as {_get(user, 'username')} ({_get(user, 'name')}, "
                    f"id {_get(user, 'id')}){bot}")
        yield _token(source, today)
        yield _detection(config, source)
        yield from _projects(config, source)
    finally:
        source.close()


def _detection(config: Config, source: GitLabSource) -> Check:
    """GITLAB_API: which way changes will be found, and why (the probe the daemon runs at its first cycle)."""
    probe = None
    if config.gitlab_api != "rest":
        try:
            probe = GraphQLDetector(source, children=config.poll_child_pipelines, clock=utcnow).probe()
        except GitLabSourceError as exc:
            return Check("change detection", config.gitlab_api != "graphql",
                         f"GitLab's GraphQL probe failed ({_reason(exc, 'GraphQL probe')}); the daemon probes again at "
                         "its first cycle and lists with REST meanwhile", warning=True)
    choice = decide_api(config.gitlab_api, probe, children=config.poll_child_pipelines)
    if choice.mode == "graphql":
        detail = (f"GraphQL ({choice.reason}); a few requests per cycle for all projects, every "
                  f"{config.effective_poll_interval_graphql:g} s")
    else:
        per_project = 2 if config.poll_child_pipelines else 1
        detail = (f"REST ({choice.reason}); {per_project} request(s) per project and cycle, every "
                  f"{config.poll_interval:g} s")
    if choice.problem:
        detail += f"; {choice.problem}"
    ok = not (config.gitlab_api == "graphql" and choice.mode == "rest")
    return Check("change detection", ok, detail, warning=bool(choice.problem) and ok)


def _reason(exc: Exception, what: str) -> str:
    """The error without the ``what: `` that the line already starts with."""
    text = str(exc)
    return text[len(what) + 2:] if text.startswith(f"{what}: ") else text


def _get(data: Any, key: str) -> Any:
    return data.get(key) if isinstance(data, dict) else None


def _token(source: GitLabSource, today: date) -> Check:
    """Expiry and scopes, where GitLab reveals them (``GET /personal_access_tokens/self``, GitLab 15.5+, for
    personal, project and group access tokens; not for OAuth or CI job tokens)."""
    try:
        info = source._call("token details", lambda: source.gl.http_get("/personal_access_tokens/self"))
    except GitLabSourceError as exc:
        why = _reason(exc, "token details")
        return Check("token scopes and expiry", True, f"not revealed by this GitLab ({why}); make sure it has "
                     "read_api and note when it expires", warning=True)
    scopes = sorted(_get(info, "scopes") or [])
    name = _get(info, "name") or "?"
    if _get(info, "revoked") or _get(info, "active") is False:
        return Check("token scopes and expiry", False, f"token {name!r} is revoked or inactive")
    if not {"api", "read_api"} & set(scopes):
        return Check("token scopes and expiry", False,
                     f"token {name!r} has scopes {', '.join(scopes) or 'none'}; it needs read_api (or api)")
    expires = _get(info, "expires_at")
    detail = f"token {name!r}: scopes {', '.join(scopes)}; "
    if not expires:
        return Check("token scopes and expiry", True, detail + "never expires")
    try:
        days = (date.fromisoformat(str(expires)[:10]) - today).days
    except ValueError:
        return Check("token scopes and expiry", True, detail + f"expires {expires}")
    if days < 0:
        return Check("token scopes and expiry", False, detail + f"expired on {expires}")
    soon = days <= TOKEN_EXPIRY_WARNING_DAYS
    return Check("token scopes and expiry", True, detail + f"expires {expires} (in {days} day(s))"
                 + ("; renew it before then: the shipper stops shipping when it expires" if soon else ""), warning=soon)


def _projects(config: Config, source: GitLabSource) -> Iterator[Check]:
    def allowed(project_id: int) -> bool:
        if config.save_projects:
            return project_id in config.save_projects
        return project_id not in config.exclude_projects

    for ref in config.gitlab_projects:
        what = f"project {ref}"
        try:
            data = source._call(what, lambda: source.gl.http_get(f"/projects/{quote(ref, safe='')}"))
            project_id = int(_get(data, "id"))
            pipelines = source._call(what, lambda: source.gl.http_list(f"/projects/{project_id}/pipelines", iterator=True,
                                                                 per_page=1))
            total = pipelines.total
        except (GitLabSourceError, TypeError, ValueError) as exc:
            yield Check(what, False, _reason(exc, what))
            continue
        count = f"{total:,} pipeline(s)" if total is not None else "more than 10,000 pipelines"
        levels = [_get(_get(_get(data, "permissions"), kind), "access_level") for kind in ("project_access", "group_access")]
        level = max((lvl for lvl in levels if isinstance(lvl, int)), default=None)
        access = f", {ACCESS_LEVELS.get(level, level)} access" if level is not None else ""
        path = _get(data, "path_with_namespace")
        detail = (f"id {project_id}" if path == ref else f"{path}, id {project_id}") + f": {count}{access}"
        if not allowed(project_id):
            yield Check(what, True, detail + "; but LOG_SAVE_PROJECTS/LOG_EXCLUDE_PROJECTS leave it out", warning=True)
        elif level is not None and level < REPORTER:
            yield Check(what, True, detail + "; job logs need Reporter or more (unless inherited from a parent group)",
                        warning=True)
        else:
            yield Check(what, True, detail)

    scopes: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = [(f"group {g}", (), (g,)) for g in config.gitlab_groups]
    if not config.gitlab_projects and not config.gitlab_groups:
        scopes.append(("memberships", (), ()))
    for what, projects, groups in scopes:
        problems: list[DiscoveryProblem] = []
        try:
            found = source.discover_projects(projects, groups, problems)
        except GitLabSourceError as exc:
            yield Check(what, False, _reason(exc, what))
            continue
        if problems:  # the group is gone or invisible: `run` reports it every cycle and polls the rest
            yield Check(what, False, _reason(GitLabSourceError(problems[0].reason), what))
            continue
        kept = [p for p in found if allowed(p.id)]
        suffix = f", {len(kept)} after LOG_SAVE_PROJECTS/LOG_EXCLUDE_PROJECTS" if len(kept) != len(found) else ""
        label = "project(s), subgroups included" if groups else "project(s) the token's user is a member of"
        yield Check(what, True, f"{len(found)} {label}{suffix}", warning=not kept)


# -- the receiver ---------------------------------------------------------------------------------


def _receiver(config: Config) -> Check:
    """Reachable without posting: any HTTP answer to a GET (with our headers) proves DNS, TCP, TLS and the
    path to the server. Only ``--send-test`` proves the token and that documents are accepted."""
    url = config.api_post_url or ""
    poster = ApiPoster(config, ManagedRequestLog(Path(os.devnull)))
    headers = {k: v for k, v in poster.session.headers.items() if k.lower() != "content-type"}
    poster.close()
    session = requests.Session()
    session.trust_env = False
    try:
        response = session.get(url, headers=headers, timeout=min(config.api_post_timeout, 15.0), allow_redirects=False,
                               stream=True)
        response.close()
    except requests.RequestException as exc:
        return Check("receiver", False, f"{url}: no HTTP answer ({exc.__class__.__name__}); check the URL, DNS, "
                     "firewall and TLS")
    finally:
        session.close()
    status = response.status_code
    base = f"{url} answers (HTTP {status} to a GET; no document posted"
    if status in (502, 503, 504):
        return Check("receiver", False, f"{url}: HTTP {status} to a GET: the receiver (or a proxy in front of it) is "
                     "unavailable")
    if 300 <= status < 400:
        return Check("receiver", True, f"{base}); it redirects to {response.headers.get('Location')}: "
                     "the shipper does not follow redirects, set API_POST_URL to the final URL", warning=True)
    if status in (404, 410):  # the path is wrong: every POST there would end in the dead-letter folder
        return Check("receiver", False, f"{url}: HTTP {status} to a GET: nothing is there; every document would be "
                     "dead-lettered: check the path in API_POST_URL")
    if status in (401, 403):
        return Check("receiver", True, f"{base}); it refused our credentials on a GET: check API_POST_AUTH_TOKEN "
                     "(--send-test proves it)", warning=True)
    if status == 405:  # a POST-only endpoint refusing the GET: the path exists
        return Check("receiver", True, f"{base}; 405 is fine: the endpoint takes POSTs only; --send-test posts a test "
                     "document)")
    return Check("receiver", True, f"{base}; --send-test posts a test document)")


def make_test_document(now: datetime) -> bytes:
    """A valid document (the receiver may validate it) that no pipeline can be mistaken for: pipeline and
    project id 0, and its name and source say what it is."""
    stamp = format_ts(now)
    return json.dumps({
        "pipeline_id": 0, "project_id": 0,
        "project_name": "gitlab-log-shipper check --send-test (a test document, not a pipeline)",
        "status": "success", "ref": None, "sha": None, "source": "gitlab-log-shipper-check", "pipeline_type": "unknown",
        "created_at": stamp, "finished_at": stamp, "duration": 0, "user": None, "stages": [], "jobs": [],
    }).encode("utf-8")


def _send_test(config: Config, now: datetime) -> Check:
    try:
        request_log, logged = ManagedRequestLog.for_config(config), f"logged in {config.api_requests_log} with PIPELINE_ID=0"
    except OSError as exc:
        request_log, logged = ManagedRequestLog(Path(os.devnull)), f"not logged: LOG_DIR unusable ({exc.strerror or exc})"
    poster = ApiPoster(config, request_log)
    try:
        with tempfile.TemporaryDirectory(prefix="gls-check-") as folder:
            document = Path(folder) / "test-document.json"
            document.write_bytes(make_test_document(now))
            result = poster.post_file(document, pipeline_id=0, project_id=0, idempotency_key=str(uuid.uuid4()),
                                      extra_headers={TEST_HEADER: "1"})
    finally:
        poster.close()
    if result.ok:
        return Check("test document", True, f"accepted (HTTP {result.status}); {logged}")
    reason = f"HTTP {result.status}" if result.status else "no answer"
    return Check("test document", False, f"not accepted ({reason}{': ' + result.error if result.error else ''}); {logged}")


# -- folders and state ----------------------------------------------------------------------------


def _folder_list(config: Config) -> list[tuple[str, Path]]:
    folders = [("STATE_DIR", config.state_dir), ("LOG_DIR", config.log_dir)]
    if config.writes_files:
        folders.append(("LOG_OUTPUT_DIR", config.log_output_dir))
    if config.metrics_textfile is not None:
        folders.append((METRICS_FOLDER, config.metrics_textfile.parent))
    return [(name, Path(folder)) for name, folder in folders]


def _folders(config: Config) -> Iterator[Check]:
    for name, folder in _folder_list(config):
        try:
            check = _writable(name, folder)
            if name == "LOG_DIR" and check.ok and folder.is_dir():
                check = _log_files(config, check)
        except OSError as exc:  # e.g. a parent this user may not search: is_dir() lets EACCES through
            check = Check(name, False, f"{folder} cannot be looked at ({exc.strerror or exc})")
        yield check


def _log_files(config: Config, folder: Check) -> Check:
    """The files the shipper appends to in LOG_DIR: ``api-requests.log`` and its own log must be files it
    can open for appending (a root-owned file in a writable folder loses every line), their rotated
    backups files that a rotation can replace (not folders). Opened, never written: nothing changes."""
    live = [config.api_requests_log, config.app_log]
    backups = [path.with_name(f"{path.name}.{n}") for path, count in
               ((config.api_requests_log, config.api_requests_log_backups), (config.app_log, APP_LOG_BACKUPS))
               for n in range(1, count + 1)]
    problems, writable = [], []
    for path in (*live, *backups):
        if not os.path.lexists(path):
            continue
        if not path.is_file():
            problems.append(f"{path.name} is not a file")
            continue
        if path in live:
            try:
                with open(path, "ab"):
                    pass
            except OSError as exc:
                problems.append(f"{path.name} is not writable ({exc.strerror or exc})")
                continue
            writable.append(path.name)
    if problems:
        return Check(folder.name, False, f"{config.log_dir}: {'; '.join(problems)}: lines written there would be "
                     "lost; fix the owner or remove the file")
    if writable:
        return Check(folder.name, True, f"{folder.detail}; {' and '.join(writable)} writable")
    return folder


def _writable(name: str, folder: Path) -> Check:
    """Really writable (a read-only mount fools os.access): create and remove a file; a missing folder must
    be creatable (its nearest existing parent writable), but is not created here."""
    shown = str(folder)
    if folder.is_dir():
        try:
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".gls-check-"):
                pass
        except OSError as exc:
            return Check(name, False, f"{shown} is not writable ({exc.strerror or exc})")
        return Check(name, True, f"{shown} is writable")
    if folder.exists():
        return Check(name, False, f"{shown} exists but is not a folder")
    parent = folder.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return Check(name, False, f"{shown} cannot be created: {parent} is not a folder")
    if os.access(parent, os.W_OK | os.X_OK):
        how = " by the first cycle, mode 0755 for node_exporter" if name == METRICS_FOLDER else ", mode 0700"
        return Check(name, True, f"{shown} does not exist yet; it will be created{how} (in {parent}, writable)")
    return Check(name, False, f"{shown} does not exist and cannot be created ({parent} is not writable)")


def _state(config: Config) -> Check:
    path = config.state_dir / "state.sqlite3"
    try:
        fresh = not path.is_file() and not (config.state_dir / MARKER_NAME).exists()
    except OSError as exc:  # EACCES on the way there (the STATE_DIR line says more)
        return Check("state store", False, f"{path} cannot be looked at ({exc.strerror or exc})")
    if fresh:
        return Check("state store", True, f"{path} does not exist yet; the first run creates it")
    # (a store that was in use here and is now missing or empty: StateStore refuses it, with the way out)
    try:
        state = StateStore(config.state_dir)
    except ShipperError as exc:
        return Check("state store", False, str(exc))
    try:
        count, size, _ = state.outbox_stats()
        cursors = len(state.cursors())
    except ShipperError as exc:
        return Check("state store", False, str(exc))
    finally:
        state.close()
    return Check("state store", True, f"{path} is readable: {cursors} project cursor(s), {count} document(s) in the outbox")
