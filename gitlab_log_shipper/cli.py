"""The command line: a thin click layer over :class:`~gitlab_log_shipper.shipper.Shipper`.

Each command parses, calls one library function and formats the result. This is the one place where
:class:`ShipperError` becomes a message and an exit code: 0 ok, 1 runtime failure, 2 usage or config,
3 a state store that cannot be used; 128 + the signal's number when a signal stopped a command (130 for
SIGINT). Commands that do real work run it in a worker thread (:func:`~gitlab_log_shipper.service.daemon.run_in_worker`)
so that a signal stops them within SHUTDOWN_GRACE.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import sys
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn

import click

from . import __version__
from .config.envfile import read_env_file
from .config.settings import LOG_LEVELS, Config, load_config, parse_duration, prepare_directories, startup_warnings
from .counters import COUNTERS
from .errors import ConfigError, ShipperError
from .security import tightened_umask
from .service.check import Check, run_checks
from .service.daemon import StopSignals, run_forever, run_in_worker
from .service.health import check as check_health
from .service.logsetup import setup_logging, stderr_is_journal
from .service.notify import Notifier
from .service.preview import Preview
from .service.progress import BackfillProgress
from .service.stats import record_run
from .service.status import render, snapshot as status_snapshot
from .service.supervision import Supervision
from .shipper import SHIPPED, WOULD_SHIP, CycleReport, ShipResult, Shipper
from .state.lock import InstanceLock
from .timeutil import parse_ts, utcnow

log = logging.getLogger("gitlab_log_shipper")

# The systemd unit and .env.example as installed with the package (setup.cfg's package_data), so that the
# help can name a path that exists on this machine whether it runs from a wheel or a checkout.
SHARE_DIR = Path(__file__).resolve().parent / "share"

# What each command's --help says it reads. Every command validates the whole configuration (a typo fails
# everywhere alike); these are the variables that change what the command does (see .env.example).
_COMMON = "STATE_DIR, LOG_DIR, LOG_LEVEL, LOG_FORMAT"
_GITLAB = ("GITLAB_URL, GITLAB_TOKEN (or GITLAB_TOKEN_FILE), GITLAB_PROJECTS, GITLAB_GROUPS, GITLAB_API, GITLAB_TIMEOUT, GITLAB_TLS_VERIFY, "
           "GITLAB_CA_BUNDLE, GITLAB_MAX_REQUESTS_PER_SECOND, GITLAB_REQUEST_BUDGET, SHARD, POLL_CHILD_PIPELINES, "
           "DISCOVERY_INTERVAL")
_DOCUMENT = ("LOG_SAVE_PIPELINE_STATUS, LOG_SAVE_PROJECTS, LOG_EXCLUDE_PROJECTS, LOG_SAVE_JOB_STATUS, DOCUMENT_FIELDS, "
             "MAX_JOB_LOG_BYTES, JOB_LOG_TIMEOUT, LOG_REDACT_PATTERNS, CONCURRENCY")
_RECEIVER = ("API_POST_ENABLED, API_POST_URL, API_POST_AUTH_TOKEN (or API_POST_AUTH_TOKEN_FILE), "
             "API_POST_HEADERS (or API_POST_HEADERS_FILE), API_POST_TIMEOUT, "
             "API_POST_TLS_VERIFY, API_POST_CA_BUNDLE, API_POST_ALLOW_INSECURE, API_POST_COMPRESSION, API_POST_MAX_BYTES, "
             "API_POST_RETRY_ENABLED, RETRY_ATTEMPTS, RETRY_DELAY, API_REQUESTS_LOG_MAX_BYTES, API_REQUESTS_LOG_BACKUPS")
_OUTBOX = "OUTBOX_MAX_AGE, OUTBOX_MAX_BYTES, OUTBOX_RETRY_MAX"
_FILES = "API_POST_SAVE_TO_FILE, LOG_OUTPUT_DIR, LOG_SAVE_METADATA_ALWAYS"
_SHIPPING = f"{_GITLAB}, {_DOCUMENT}, {_RECEIVER}, {_OUTBOX}, {_FILES}"
READS = {
    "run": f"{_COMMON}, {_SHIPPING}, POLL_INTERVAL, POLL_OVERLAP, INITIAL_LOOKBACK, METRICS_TEXTFILE; "
           "under systemd NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID, JOURNAL_STREAM",
    "backfill": f"{_COMMON}, {_SHIPPING}",
    "post": f"{_COMMON}, {_SHIPPING}",
    "redeliver": f"{_COMMON}, {_RECEIVER}, {_OUTBOX}",
    "check": f"{_COMMON}, {_SHIPPING}, METRICS_TEXTFILE",
    "status": f"{_COMMON}, API_POST_ENABLED, API_POST_SAVE_TO_FILE, POLL_INTERVAL (reads STATE_DIR only: no network)",
    "health": "STATE_DIR, HEALTH_MAX_AGE, POLL_INTERVAL, GITLAB_API (reads STATE_DIR only, writes nothing)",
}


def _reads(command: str) -> str:
    """The help's closing paragraph: the variables ``command`` reads (kept whole by click's \\b marker)."""
    return f"\n\nVariables read: {READS[command]}."


def _fail(exc: ShipperError) -> NoReturn:
    prefix = "configuration error" if isinstance(exc, ConfigError) else "error"
    click.echo(f"gitlab-log-shipper: {prefix}: {exc}", err=True)
    sys.exit(exc.exit_code)


def _load(ctx: click.Context, *, log_file: bool = True) -> Config:
    """Configuration, private file modes (umask 077 on top of the current one, for this command), the
    folders (created 0700 and proven writable) and logging; then the security warnings of every start."""
    ctx.with_resource(tightened_umask())
    try:
        config = _config(ctx)
        if log_file:  # status and dry runs create nothing
            prepare_directories(config)
        setup_logging(config, to_file=log_file, journald=stderr_is_journal(os.environ))
    except ConfigError as exc:
        _fail(exc)
    for warning in (*startup_warnings(config), *config.warnings):
        log.warning("%s", warning)
    if config.ignored_variables:
        click.echo(f"note: {', '.join(config.ignored_variables)} only applied to the webhook collector; ignored", err=True)
    return config


def _config(ctx: click.Context) -> Config:
    """The configuration, with the group's ``--log-level``/``-v`` over LOG_LEVEL."""
    config = load_config(ctx.obj.get("env_file"))
    level = ctx.obj.get("log_level")
    return replace(config, log_level=level) if level else config


@contextmanager
def _shipper(config: Config, **options: Any) -> Iterator[Shipper]:
    """A Shipper for one command; ShipperErrors become a message and an exit code, resources are released."""
    try:
        shipper = Shipper(config, **options)
    except ShipperError as exc:
        _fail(exc)
    try:
        yield shipper
    except ShipperError as exc:
        _fail(exc)
    finally:
        shipper.close()


def _untimed(shipper: Shipper) -> None:
    """``backfill`` and ``post`` ship history or an operator's resend: their documents are not measured as finish ->
    delivered latency (it would be the age of the window, or the operator's reaction; see state/latency.py)."""
    if shipper.delivery is not None:
        shipper.delivery.measure_new = False


@contextmanager
def _locked(config: Config) -> Iterator[None]:
    """Hold STATE_DIR's instance lock (a second daemon exits 2)."""
    try:
        lock = InstanceLock(config.state_dir).acquire()
    except ShipperError as exc:
        _fail(exc)
    try:
        yield
    finally:
        lock.release()


def _run_work(shipper: Shipper, signals: StopSignals, work: Callable[[], int]) -> NoReturn:
    """Run a command's ``work`` (returning its exit code) so that SIGINT, SIGTERM or SIGHUP stop it within
    SHUTDOWN_GRACE (not click's "Aborted!" while pool threads keep the process alive); exit with its code,
    or with 128 + the signal when one stopped it. The Shipper must have been given ``signals.stop``."""
    code = run_in_worker(shipper, work, signals=signals)
    farewell = signals.farewell()
    if farewell:
        click.echo(farewell, err=True)
        sys.exit(signals.exit_code())
    sys.exit(code if code is not None else 1)


def _parse_when(value: str, option: str, now: datetime) -> datetime:
    """``--since``/``--until``: ISO 8601 (date or date-time, UTC when no offset) or a duration ago (``2d``)."""
    ago = parse_duration(value)
    if ago is not None:
        return now - ago
    try:
        return parse_ts(value)
    except ValueError:
        raise click.BadParameter(f"expected an ISO 8601 time (2026-11-01T00:00:00Z) or a duration ago (6h, 2d); got {value!r}",
                                 param_hint=option) from None


def _hoist_env_file(args: list[str]) -> list[str]:
    """``run --env-file x`` → ``--env-file x run``: the option is accepted before and after the subcommand (and
    every command, present or future, gets it) without each command declaring it. ``--`` ends the search."""
    hoisted: list[str] = []
    rest: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "--":
            rest.extend(args[index:])
            break
        if arg == "--env-file":
            if index + 1 == len(args):
                raise click.UsageError("Option '--env-file' requires an argument.")
            hoisted.extend(args[index:index + 2])
            index += 2
            continue
        if arg.startswith("--env-file="):
            hoisted.append(arg)
        else:
            rest.append(arg)
        index += 1
    return hoisted + rest


class _Main(click.Group):
    """The command group; ``--env-file`` may also follow the subcommand (see :func:`_hoist_env_file`)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, _hoist_env_file(list(args)))


MAIN_HELP = f"""Ship every finished GitLab CI pipeline, with every job's log, to a log API and/or files.

Configuration comes from the environment and .env. Installed with the package: every variable explained,
and the systemd unit (each command's --help names the variables it reads):

\b
  {SHARE_DIR / "env.example"}
  {SHARE_DIR / "gitlab-log-shipper.service"}

Exit codes: 0 ok, 1 runtime failure, 2 usage or configuration error, 3 unusable state store,
128 + N stopped by signal N (130: SIGINT). See OPERATIONS.md, "Exit codes".

Shell completion (bash; zsh_source and fish_source likewise, see OPERATIONS.md):

\b
  eval "$(_GITLAB_LOG_SHIPPER_COMPLETE=bash_source gitlab-log-shipper)"
"""


@click.group(cls=_Main, help=MAIN_HELP, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="gitlab-log-shipper")
@click.option("--env-file", type=click.Path(dir_okay=False, allow_dash=False), default=None,
              help="Read settings from this file instead of ./.env (the environment still wins). May also follow "
                   "the command; a pipe or /dev/fd/N works (read once). Syntax: OPERATIONS.md, \"Configure\".")
@click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False), default=None,
              help="Log at this level, whatever LOG_LEVEL says.")
@click.option("-v", "--verbose", is_flag=True, help="The same as --log-level DEBUG.")
@click.pass_context
def main(ctx: click.Context, env_file: str | None, log_level: str | None, verbose: bool) -> None:
    if verbose and log_level and log_level.upper() != "DEBUG":
        raise click.UsageError(f"-v/--verbose means --log-level DEBUG; it contradicts --log-level {log_level}")
    ctx.ensure_object(dict)
    # Read here, once: a pipe or /dev/fd/N has nothing left for a second reader. load_config takes the EnvFile.
    try:
        ctx.obj["env_file"] = read_env_file(env_file) if env_file is not None and not ctx.resilient_parsing else None
    except ConfigError as exc:
        _fail(exc)
    COUNTERS.take()  # a command counts its own requests (in-process callers run several; see counters.py)
    ctx.obj["log_level"] = "DEBUG" if verbose else log_level.upper() if log_level else None


def dry_run_options(command: Callable[..., Any]) -> Callable[..., Any]:
    command = click.option("--show-document", is_flag=True,
                           help="With --dry-run: print each document (JSON, logs included) on stdout, one per line; "
                                "everything else goes to stderr.")(command)
    return click.option("--dry-run", is_flag=True,
                        help="Show what would be sent and change nothing: no state, outbox, files, "
                             "api-requests.log or POST.")(command)


def _dry_run(ctx: click.Context, dry_run: bool, show_document: bool) -> tuple[Config, dict[str, Any]]:
    """The configuration and the Shipper options for a command that may be a dry run."""
    if show_document and not dry_run:
        raise click.UsageError("--show-document needs --dry-run")
    config = _load(ctx, log_file=not dry_run)
    if not dry_run:
        return config, {}
    return config, {"dry_run": True, "preview": Preview(config, show_document=show_document, out=sys.stdout)}


@main.command()
@click.option("--once", is_flag=True, help="Run one poll cycle and exit (0 when every pipeline was delivered).")
@dry_run_options
@click.pass_context
def run(ctx: click.Context, once: bool, dry_run: bool, show_document: bool) -> None:
    """Poll GitLab every POLL_INTERVAL seconds and ship finished pipelines (the daemon).

    With --dry-run: one cycle (--once is implied) that shows what it would ship from the current cursors.
    """
    config, options = _dry_run(ctx, dry_run, show_document)
    if dry_run:  # no lock: it writes nothing, so it may run next to the daemon
        with StopSignals() as signals, _shipper(config, stop=signals.stop, **options) as shipper:
            def dry_cycle() -> int:
                report = shipper.run_cycle()
                _print_report(report, err=show_document)
                return 0 if report.complete else 1
            _run_work(shipper, signals, dry_cycle)
    with StopSignals(daemon=not once) as signals, _locked(config), _shipper(config, stop=signals.stop) as shipper:
        supervision = Supervision(config, shipper, None if once else Notifier.from_environ(os.environ))
        if once:
            def one_cycle() -> int:
                if shipper.delivery is not None:
                    shipper.delivery.reconcile()
                supervision.cycle_started()
                report = shipper.run_cycle()
                supervision.cycle_finished(report)
                _print_report(report)
                return 0 if report.complete else 1
            _run_work(shipper, signals, one_cycle)
        if shipper.delivery is not None:
            shipper.delivery.reconcile()
        try:
            faulthandler.enable(all_threads=True)  # a watchdog kill (SIGABRT) prints every thread's stack first
        except (AttributeError, ValueError, OSError):
            pass  # stderr is not a real file (embedded, tests): no stack dumps, nothing else changes
        supervision.ready()
        run_forever(shipper, hooks=supervision, signals=signals)
        supervision.stopping()
    sys.exit(signals.exit_code())  # 0 after SIGTERM/SIGINT; 129 after SIGHUP, so that systemd starts it again


@main.command()
@click.option("--since", "since_text", required=True, help="Start of the window: ISO 8601 time or a duration ago (6h, 2d).")
@click.option("--until", "until_text", default=None, help="End of the window (default: now).")
@click.option("--project", "project_refs", multiple=True, help="Project ID or path (repeatable). Default: the configured projects.")
@click.option("--force", is_flag=True, help="Ship again pipelines whose finish was shipped before.")
@dry_run_options
@click.pass_context
def backfill(ctx: click.Context, since_text: str, until_text: str | None, project_refs: tuple[str, ...], force: bool,
             dry_run: bool, show_document: bool) -> None:
    """Ship pipelines that finished in a past window, independent of the daemon's cursor.

    Lists and ships at once, CONCURRENCY pipelines at a time, as `run` does. What was shipped is recorded:
    a rerun over the same window ships only what is left (Ctrl-C stops within seconds, exit 130). On a
    terminal a progress line shows pipelines done/found and the time left; elsewhere each pipeline gets a
    plain line. A closing line counts shipped, skipped and failed; exit 1 when something was not delivered.
    """
    now = utcnow()
    since = _parse_when(since_text, "--since", now)
    until = _parse_when(until_text, "--until", now) if until_text else now
    if since > until:
        raise click.BadParameter("--since is after --until", param_hint="--since")
    config, options = _dry_run(ctx, dry_run, show_document)
    with StopSignals() as signals, _shipper(config, stop=signals.stop, **options) as shipper:
        _untimed(shipper)

        def work() -> int:
            projects = shipper.resolve_projects(project_refs) if project_refs else shipper.projects()
            click.echo(f"backfill {since.isoformat()} .. {until.isoformat()} over {len(projects)} project(s)"
                       + (" (dry run)" if dry_run else ""), err=True)
            progress = BackfillProgress(sys.stderr if show_document else sys.stdout, sys.stderr, describe=_describe)
            try:
                report = shipper.backfill(since, until, projects, force=force, listener=progress)
            finally:
                progress.finish(stopped=signals.stop.is_set())
            record_run(shipper.state, shipper.config, report)
            _print_report(report, each=False, err=show_document)
            return 0 if report.complete else 1
        _run_work(shipper, signals, work)


@main.command()
@click.option("--pipeline-id", required=True, type=click.IntRange(min=1), help="The pipeline to ship.")
@click.option("--project", "project_ref", default=None, help="Its project (ID or path). Default: search the configured projects.")
@dry_run_options
@click.pass_context
def post(ctx: click.Context, pipeline_id: int, project_ref: str | None, dry_run: bool, show_document: bool) -> None:
    """Ship one pipeline now, even if it was shipped before (same Idempotency-Key as before)."""
    config, options = _dry_run(ctx, dry_run, show_document)
    with StopSignals() as signals, _shipper(config, stop=signals.stop, **options) as shipper:
        _untimed(shipper)

        def work() -> int:
            result = shipper.post_pipeline(pipeline_id, project_ref)
            single = CycleReport()
            single.add(result)
            record_run(shipper.state, shipper.config, single)
            _print_progress(result, err=show_document)
            return 0 if result.outcome in (SHIPPED, WOULD_SHIP) else 1
        _run_work(shipper, signals, work)


@main.command()
@click.option("--pipeline-id", type=click.IntRange(min=1), default=None, help="Only this pipeline's dead letters.")
@click.pass_context
def redeliver(ctx: click.Context, pipeline_id: int | None) -> None:
    """POST the dead-lettered documents again (after fixing what the receiver rejected them for)."""
    config = _load(ctx)
    if not config.posts:
        raise click.UsageError("redeliver needs API_POST_ENABLED=true")
    with StopSignals() as signals, _locked(config), _shipper(config, stop=signals.stop) as shipper:
        delivery = shipper.delivery
        assert delivery is not None

        def work() -> int:
            results = delivery.redeliver(pipeline_id)
            if pipeline_id is not None and not results:  # a typo'd id must not look like success
                click.echo(f"no dead letter of pipeline {pipeline_id} could be redelivered (none in "
                           f"{delivery.dead_letter_dir}, or its document is missing: see the log); "
                           f"`status` lists the dead letters", err=True)
                return 1
            for meta, post in results:
                verdict = "delivered" if post.ok else f"still failing: {post.status or 'no answer'} {post.error or ''}".strip()
                click.echo(f"pipeline {meta['pipeline_id']} (project {meta['project_id']}): {verdict}")
            left = len(delivery.dead_letters())
            click.echo(f"summary: redelivered={sum(1 for _, p in results if p.ok)} dead_letters_left={left}")
            return 0 if all(p.ok for _, p in results) else 1
        _run_work(shipper, signals, work)


@main.command()
@click.option("--send-test", is_flag=True,
              help="Also POST one clearly marked test document (pipeline_id 0, header X-Gitlab-Log-Shipper-Test).")
@click.pass_context
def check(ctx: click.Context, send_test: bool) -> None:
    """Validate the configuration, then reach GitLab, the projects, the receiver and the folders: one
    line per check, exit 0 only if all pass. Changes nothing (unless --send-test)."""
    try:
        config = _config(ctx)
    except ConfigError as exc:
        click.echo(f"{_mark(Check('configuration', False, ''))} configuration: {exc}")
        sys.exit(exc.exit_code)
    setup_logging(config, to_file=False, journald=stderr_is_journal(os.environ))
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # the --send-test retries: the ✗ line says it
    if send_test and not config.posts:
        raise click.UsageError("--send-test needs API_POST_ENABLED=true")
    results = []
    try:
        for result in run_checks(config, send_test=send_test, today=lambda: utcnow().date(), now=utcnow):
            results.append(result)
            click.echo(f"{_mark(result)} {result.name}: {result.detail}")
    except ShipperError as exc:
        _fail(exc)
    failed = sum(1 for r in results if not r.ok)
    warned = sum(1 for r in results if r.ok and r.warning)
    verdict = f"{failed} of {len(results)} checks failed" if failed else f"all {len(results)} checks passed"
    click.echo(verdict + (f" ({warned} with a warning)" if warned else ""))
    sys.exit(1 if failed else 0)


def _mark(result: Check) -> str:
    """✓ pass, ! pass with a warning, ✗ fail (OK/WARN/FAIL where the terminal cannot show them)."""
    symbol, ascii_word = ("✗", "FAIL") if not result.ok else ("!", "WARN") if result.warning else ("✓", "OK")
    encoding = getattr(sys.stdout, "encoding", None) or "ascii"
    try:
        symbol.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return ascii_word
    return symbol


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of lines, for scripts.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Cursors, last shipments, outbox, dead letters, last cycle and totals, read from STATE_DIR (no network)."""
    config = _load(ctx, log_file=False)
    now = utcnow()
    try:
        snapshot = status_snapshot(config, now)
    except ShipperError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(snapshot, indent=2))
    else:
        for line in render(snapshot, now):
            click.echo(line)


@main.command()
@click.pass_context
def health(ctx: click.Context) -> None:
    """Exit 0 when the last poll cycle finished less than HEALTH_MAX_AGE ago (default 5 x POLL_INTERVAL) or the
    cycle running now shows progress; else exit 1 saying why. Reads STATE_DIR only and writes nothing: for a
    container HEALTHCHECK or a Kubernetes exec probe (it needs the settings `run` needs)."""
    try:
        config = _config(ctx)  # no logging set up, no folder created: nothing is written
    except ConfigError as exc:
        _fail(exc)
    verdict = check_health(config, utcnow())
    click.echo(verdict.line, err=not verdict.ok)
    sys.exit(0 if verdict.ok else 1)


def _describe(result: ShipResult) -> str:
    line = f"pipeline {result.pipeline_id} (project {result.project_id}): {result.outcome}"
    if result.outcome in (SHIPPED, WOULD_SHIP):
        line += f", {result.jobs} job(s), {result.log_bytes} log bytes"
        if result.http_status:
            line += f", HTTP {result.http_status}"
        if result.folder:
            line += f", files in {result.folder}"
        if result.outcome == WOULD_SHIP and result.reason:
            line += f": would {result.reason}"
    elif result.reason:
        line += f": {result.reason}"
    return line


def _print_progress(result: ShipResult, *, err: bool = False) -> None:
    click.echo(_describe(result), err=err)


def _print_report(report: CycleReport, *, each: bool = True, err: bool = False) -> None:
    if each:
        for result in report.results:
            _print_progress(result, err=err)
    click.echo(f"summary: {report.summary()}", err=err)
    for error in report.project_errors:
        click.echo(f"project error: {error}", err=True)


def _name_variables(group: click.Group) -> None:
    """Close every command's help with the variables it reads (READS; a command without an entry is left as it
    is here, and tests/test_release.py fails for it)."""
    for name, command in group.commands.items():
        if name in READS:
            command.help = (command.help or "").rstrip() + _reads(name)


_name_variables(main)


if __name__ == "__main__":  # pragma: no cover
    main()
