"""Build the vcrpy cassettes in tests/cassettes/ from the real GitLab.com samples.

Why build rather than record: the samples in ``../shared/gitlab-samples`` are the reviewed, scrubbed
record of what GitLab.com really answered; recording again would need a token and a live project and
would drift. This script wraps those exact bodies in vcrpy's v1 cassette format, at the URLs that
produced them, with response headers modelled on the one real header set we have
(``trace_response_headers_running_job.http``). python-gitlab then replays them unmodified, which pins
the response *shapes* our GitLab client code relies on.

What is taken verbatim and what is derived:

* Bodies are the sample files byte for byte, except that the single trailing newline the JSON files got
  when they were saved is dropped (GitLab's JSON has none). The job log keeps every byte (ESC, CR,
  non-ASCII) and is stored as YAML ``!!binary`` so nothing can be re-encoded on the way.
* The trace response headers are the recorded ones, unchanged. JSON responses reuse that header set with
  ``Content-Type: application/json``, a weak ``Etag`` of the body, GitLab's pagination headers
  (``X-Page``, ``X-Next-Page``, ``X-Total``…, ``Link``), and ``RateLimit-*`` values that follow the
  recorded pattern (``Reset`` is the next minute boundary). Their ``Date`` is one second after the
  newest timestamp in the body, so each response is dated plausibly and deterministically.
* The pipelines list is served as two pages of one row (``per_page=1``) so replay exercises
  python-gitlab following ``Link: rel="next"``; the rows are the recorded ones, in the recorded order.
* Requests carry no credentials (the ``PRIVATE-TOKEN`` header is left out, as vcrpy's
  ``filter_headers`` would do); request headers are informational, replay matches method and URL.

Output is deterministic (pure-Python YAML emitter, sorted keys, no clocks), so re-running gives
byte-identical files; tests/gitlab/test_cassettes.py checks that against the committed cassettes.

Usage: python tests/make_cassettes.py [--samples DIR] [--out DIR] [--check]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import yaml

TESTS_DIR = Path(__file__).resolve().parent
DEFAULT_SAMPLES = TESTS_DIR.parent.parent / "shared" / "gitlab-samples"
DEFAULT_OUT = TESTS_DIR / "cassettes"

API = "https://gitlab.com/api/v4"
PROJECT_ID = 87089091
UPDATED_AFTER = "2026-10-01T10:30:00Z"
TRACE_JOB_ID = 16862533387

TRACE_HEADERS_SAMPLE = "trace_response_headers_running_job.http"
TRACE_LOG_SAMPLE = "trace_runner11.9_success.log"

# What python-gitlab (through requests) sends; vcrpy stores request headers as lists. Not matched on.
REQUEST_HEADERS = {
    "Accept": ["*/*"],
    "Accept-Encoding": ["gzip, deflate"],
    "Connection": ["keep-alive"],
    "User-Agent": ["python-gitlab/8.6.0"],
}

RATE_LIMIT = 2000  # GitLab.com: authenticated API requests per minute per user

_TIMESTAMP = re.compile(rb'"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d))"')


@dataclass(frozen=True)
class Page:
    """Where a list response sits in its paginated set (GitLab's offset pagination headers)."""

    page: int
    per_page: int
    total: int
    link_query: dict[str, str] = field(default_factory=dict)  # params GitLab echoes in Link URLs

    @property
    def total_pages(self) -> int:
        return max(1, math.ceil(self.total / self.per_page))


@dataclass(frozen=True)
class Interaction:
    """One GET and the sample that answers it."""

    path: str
    query: dict[str, str]
    body: bytes
    page: Page | None = None

    @property
    def uri(self) -> str:
        return _url(self.path, self.query)


def _url(path: str, query: dict[str, str]) -> str:
    return f"{API}{path}" + (f"?{urlencode(query)}" if query else "")


def read_json_sample(samples: Path, name: str) -> bytes:
    """A JSON sample as GitLab sent it: the file minus the newline added when it was saved."""
    raw = (samples / name).read_bytes()
    json.loads(raw)  # fail here, loudly, on a damaged sample
    return raw[:-1] if raw.endswith(b"\n") else raw


def read_trace_headers(samples: Path) -> tuple[int, str, list[tuple[str, str]]]:
    """Status code, reason and ordered headers of the recorded trace response."""
    lines = (samples / TRACE_HEADERS_SAMPLE).read_text(encoding="utf-8").splitlines()
    _version, code, reason = lines[0].split(" ", 2)
    headers = []
    for line in lines[1:]:
        if line.strip():
            name, value = line.split(":", 1)
            headers.append((name.strip(), value.strip()))
    return int(code), reason, headers


def _http_date(moment: datetime) -> str:
    return format_datetime(moment.astimezone(timezone.utc), usegmt=True)


def _response_date(body: bytes) -> datetime:
    """One second after the newest timestamp in the body, whole seconds (HTTP dates have no fraction)."""
    newest = max(
        datetime.fromisoformat(match.decode().replace("Z", "+00:00")) for match in _TIMESTAMP.findall(body)
    )
    whole_second = newest.astimezone(timezone.utc).replace(microsecond=0)
    return whole_second + timedelta(seconds=2 if newest.microsecond else 1)


def _rate_limit_headers(date: datetime, observed: int) -> dict[str, str]:
    """GitLab.com's throttle headers on an ordinary 200: the window resets at the next full minute."""
    reset = (date.replace(second=0) + timedelta(minutes=1)).timestamp()
    return {
        "Ratelimit-Limit": str(RATE_LIMIT),
        "Ratelimit-Name": "throttle_authenticated_api",
        "Ratelimit-Observed": str(observed),
        "Ratelimit-Remaining": str(RATE_LIMIT - observed),
        "Ratelimit-Reset": str(int(reset)),
    }


def _correlation_id(uri: str) -> str:
    """A Cloudflare-ray-shaped id (16 hex + colo, as recorded), stable for a given URL."""
    return hashlib.sha256(uri.encode()).hexdigest()[:16] + "-MAD"


def _pagination_headers(interaction: Interaction) -> dict[str, str]:
    page = interaction.page
    assert page is not None

    def link(number: int) -> str:
        query = {**page.link_query, "page": str(number), "per_page": str(page.per_page)}
        return _url(interaction.path, dict(sorted(query.items())))

    rels = []
    if page.page > 1:
        rels.append(f'<{link(page.page - 1)}>; rel="prev"')
    if page.page < page.total_pages:
        rels.append(f'<{link(page.page + 1)}>; rel="next"')
    rels += [f'<{link(1)}>; rel="first"', f'<{link(page.total_pages)}>; rel="last"']
    return {
        "Link": ", ".join(rels),
        # GitLab sends the empty string, not nothing, when there is no next/previous page.
        "X-Next-Page": str(page.page + 1) if page.page < page.total_pages else "",
        "X-Page": str(page.page),
        "X-Per-Page": str(page.per_page),
        "X-Prev-Page": str(page.page - 1) if page.page > 1 else "",
        "X-Total": str(page.total),
        "X-Total-Pages": str(page.total_pages),
    }


def json_response(interaction: Interaction, template: list[tuple[str, str]], observed: int) -> dict[str, Any]:
    """The response part of a JSON interaction, headers modelled on the recorded trace response."""
    date = _response_date(interaction.body)
    ray = _correlation_id(interaction.uri)
    headers = {name: value for name, value in template if name != "Content-Disposition"}
    headers.update(
        {
            "Content-Type": "application/json",
            "Date": _http_date(date),
            "Etag": f'W/"{hashlib.md5(interaction.body).hexdigest()}"',
            "Cf-Ray": ray,
            "X-Request-Id": ray,
            "X-Gitlab-Meta": json.dumps({"correlation_id": ray, "version": "1"}, separators=(",", ":")),
            **_rate_limit_headers(date, observed),
        }
    )
    if interaction.page is not None:
        headers.update(_pagination_headers(interaction))
    return {
        "status": {"code": 200, "message": "OK"},
        "headers": {name: [headers[name]] for name in sorted(headers)},
        "body": {"string": interaction.body.decode("utf-8")},
    }


def _request(uri: str) -> dict[str, Any]:
    # A fresh copy per request: a shared dict would come out as YAML anchors and aliases.
    return {"method": "GET", "uri": uri, "body": None, "headers": {k: list(v) for k, v in REQUEST_HEADERS.items()}}


def cassette(interactions: Sequence[Interaction], template: list[tuple[str, str]]) -> dict[str, Any]:
    """A vcrpy v1 cassette of JSON GETs, RateLimit-Observed counting up as in one client session."""
    return {
        "version": 1,
        "interactions": [
            {"request": _request(i.uri), "response": json_response(i, template, observed)}
            for observed, i in enumerate(interactions, start=1)
        ],
    }


def _route(pipeline_id: int) -> dict[str, str]:
    """The route parameters GitLab echoes into the Link URLs of a per-pipeline list."""
    return {"id": str(PROJECT_ID), "pipeline_id": str(pipeline_id)}


def _split_rows(body: bytes) -> list[bytes]:
    """The rows of a JSON array body, each re-serialised exactly as GitLab wrote it (compact, in order)."""
    return [json.dumps(row, separators=(",", ":"), ensure_ascii=False).encode() for row in json.loads(body)]


def build(samples: Path) -> dict[str, bytes]:
    """Every output file (cassettes and SOURCES.json) by name, built from the samples in ``samples``."""
    code, reason, trace_headers = read_trace_headers(samples)
    project = f"/projects/{PROJECT_ID}"
    sample = {name: read_json_sample(samples, name) for name in _JSON_SAMPLES}

    # The recorded list (two rows, newest id first) served as two pages of one row.
    rows = _split_rows(sample["pipelines_list.json"])
    if b"[" + b",".join(rows) + b"]" != sample["pipelines_list.json"]:
        raise ValueError("pipelines_list.json: rows do not re-serialise to the recorded bytes; cannot split it")
    echoed = {"id": str(PROJECT_ID), "order_by": "id", "sort": "desc", "updated_after": UPDATED_AFTER}
    first_query = {"per_page": "1", "updated_after": UPDATED_AFTER}
    second_query = dict(sorted({**echoed, "page": "2", "per_page": "1"}.items()))
    list_page = Page(page=1, per_page=1, total=len(rows), link_query=echoed)
    children = sample["pipelines_list_source_parent_pipeline.json"]

    plans: dict[str, list[Interaction]] = {
        "pipelines_list.yaml": [
            Interaction(f"{project}/pipelines", first_query, b"[" + rows[0] + b"]", list_page),
            Interaction(
                f"{project}/pipelines", second_query, b"[" + rows[1] + b"]", Page(2, 1, len(rows), echoed)
            ),
            Interaction(
                f"{project}/pipelines",
                {"source": "parent_pipeline", "updated_after": UPDATED_AFTER},
                children,
                Page(1, 20, len(json.loads(children)), {**echoed, "source": "parent_pipeline"}),
            ),
        ],
        "pipeline_get.yaml": [
            Interaction(f"{project}/pipelines/2900799542", {}, sample["pipeline_single_failed.json"]),
            Interaction(f"{project}/pipelines/2900783081", {}, sample["pipeline_single_running_after_retry.json"]),
        ],
        "pipeline_jobs.yaml": [
            Interaction(
                f"{project}/pipelines/2900771578/jobs",
                {},
                sample["pipeline_jobs_list.json"],
                Page(1, 20, len(json.loads(sample["pipeline_jobs_list.json"])), _route(2900771578)),
            ),
        ],
        "pipeline_bridges.yaml": [
            Interaction(
                f"{project}/pipelines/2900783081/bridges",
                {},
                sample["bridges_list_with_downstream.json"],
                Page(1, 20, 1, _route(2900783081)),
            ),
            Interaction(
                f"{project}/pipelines/2900771578/bridges",
                {},
                sample["bridges_list_downstream_null.json"],
                Page(1, 20, 1, _route(2900771578)),
            ),
        ],
    }
    for name, interactions in plans.items():
        for interaction in interactions:
            _check_pipeline_path(interaction)
    files = {name: _dump(cassette(interactions, trace_headers)) for name, interactions in plans.items()}

    trace = (samples / TRACE_LOG_SAMPLE).read_bytes()
    files["job_trace.yaml"] = _dump(
        {
            "version": 1,
            "interactions": [
                {
                    "request": _request(_url(f"{project}/jobs/{TRACE_JOB_ID}/trace", {})),
                    "response": {
                        "status": {"code": code, "message": reason},
                        "headers": {name: [value] for name, value in sorted(trace_headers)},
                        # bytes -> YAML !!binary: ESC, CR and any invalid UTF-8 survive untouched.
                        "body": {"string": trace},
                    },
                }
            ],
        }
    )
    files["SOURCES.json"] = _sources(samples, plans)
    return files


_JSON_SAMPLES = (
    "pipelines_list.json",
    "pipelines_list_source_parent_pipeline.json",
    "pipeline_single_failed.json",
    "pipeline_single_running_after_retry.json",
    "pipeline_jobs_list.json",
    "bridges_list_with_downstream.json",
    "bridges_list_downstream_null.json",
)

_USED_BY = {
    "pipelines_list.json": ["pipelines_list.yaml"],
    "pipelines_list_source_parent_pipeline.json": ["pipelines_list.yaml"],
    "pipeline_single_failed.json": ["pipeline_get.yaml"],
    "pipeline_single_running_after_retry.json": ["pipeline_get.yaml"],
    "pipeline_jobs_list.json": ["pipeline_jobs.yaml"],
    "bridges_list_with_downstream.json": ["pipeline_bridges.yaml"],
    "bridges_list_downstream_null.json": ["pipeline_bridges.yaml"],
    TRACE_LOG_SAMPLE: ["job_trace.yaml"],
    TRACE_HEADERS_SAMPLE: [
        "job_trace.yaml",
        "pipeline_bridges.yaml",
        "pipeline_get.yaml",
        "pipeline_jobs.yaml",
        "pipelines_list.yaml",
    ],
}


def _check_pipeline_path(interaction: Interaction) -> None:
    """Guard against wiring a sample to the wrong URL: a body's pipeline must match the path's."""
    match = re.search(r"/pipelines/(\d+)", interaction.path)
    if not match:
        return
    wanted = int(match.group(1))
    document = json.loads(interaction.body)
    rows = document if isinstance(document, list) else [document]
    for row in rows:
        found = row["pipeline"]["id"] if "pipeline" in row else row["id"]
        if found != wanted:
            raise ValueError(f"{interaction.path}: sample holds pipeline {found}, not {wanted}")


def _sources(samples: Path, plans: dict[str, list[Interaction]]) -> bytes:
    """SOURCES.json: what each cassette was built from, with checksums, so replay tests can verify
    the trace bytes without the samples and so a changed sample is noticed."""
    record = {
        "generator": "tests/make_cassettes.py",
        "samples_dir": "../shared/gitlab-samples (relative to the repository root)",
        "samples": {
            name: {
                "sha256": hashlib.sha256((samples / name).read_bytes()).hexdigest(),
                "size": (samples / name).stat().st_size,
                "used_by": _USED_BY[name],
            }
            for name in sorted(_USED_BY)
        },
        "cassettes": {
            **{name: [i.uri for i in interactions] for name, interactions in plans.items()},
            "job_trace.yaml": [_url(f"/projects/{PROJECT_ID}/jobs/{TRACE_JOB_ID}/trace", {})],
        },
        "notes": [
            "Bodies are the samples verbatim, minus the trailing newline of the JSON files.",
            "The job log body is stored as YAML !!binary and equals trace_runner11.9_success.log byte for byte.",
            "Trace headers are the recorded ones; JSON response headers are modelled on them (see the generator).",
            "pipelines_list.json is served as two pages of one row to exercise Link-header pagination.",
            "Requests carry no PRIVATE-TOKEN; replay matches method, scheme, host, path and query only.",
        ],
    }
    return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _dump(data: dict[str, Any]) -> bytes:
    # The pure-Python SafeDumper (not libyaml's CDumper, whose presence varies between machines) with
    # fixed options keeps the output byte-identical everywhere; no line folding keeps a body on one line.
    text = yaml.dump(
        data,
        Dumper=yaml.SafeDumper,
        default_flow_style=False,
        allow_unicode=True,
        sort_keys=True,
        width=2**31 - 1,
    )
    return text.encode("utf-8")


def write(files: dict[str, bytes], out: Path) -> None:
    """Write the built files into ``out`` (created if needed)."""
    out.mkdir(parents=True, exist_ok=True)
    for name, content in sorted(files.items()):
        (out / name).write_bytes(content)


def main(argv: Sequence[str] | None = None) -> int:
    """Build the cassettes; with --check, only report whether ``--out`` already holds exactly them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=Path, default=DEFAULT_SAMPLES, help="folder of GitLab.com samples")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="cassette folder to write")
    parser.add_argument("--check", action="store_true", help="compare with --out instead of writing")
    args = parser.parse_args(argv)
    if not args.samples.is_dir():
        print(f"samples folder not found: {args.samples}", file=sys.stderr)
        return 2
    files = build(args.samples)
    if args.check:
        stale = [
            name
            for name, content in sorted(files.items())
            if not (args.out / name).is_file() or (args.out / name).read_bytes() != content
        ]
        for name in stale:
            print(f"out of date: {args.out / name}", file=sys.stderr)
        return 1 if stale else 0
    write(files, args.out)
    for name in sorted(files):
        print(args.out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
