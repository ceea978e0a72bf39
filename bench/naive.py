"""The baseline: shipping pipelines the obvious way, to measure gitlab-log-shipper against.

A python-gitlab loop, one pipeline after the other, every trace read whole into memory, the document
built as one dict and sent with one ``requests.post``. No state, no retries, no files — the work a first
script would do, and nothing more.

Usage: python bench/naive.py GITLAB_URL TOKEN PROJECT_ID[,PROJECT_ID...] UPDATED_AFTER API_URL
"""

from __future__ import annotations

import sys

import gitlab
import requests


def main(gitlab_url: str, token: str, project_ids: str, updated_after: str, api_url: str) -> int:
    gl = gitlab.Gitlab(gitlab_url, private_token=token, timeout=60)
    sent = 0
    for project_id in project_ids.split(","):
        sent += ship_project(gl, gl.projects.get(project_id), updated_after, api_url)
    print(f"naive: sent {sent} pipeline(s)")
    return 0


def ship_project(gl: gitlab.Gitlab, project, updated_after: str, api_url: str) -> int:  # type: ignore[no-untyped-def]
    sent = 0
    for row in project.pipelines.list(get_all=True, updated_after=updated_after, order_by="id", sort="asc"):
        if row.status not in ("success", "failed", "canceled", "skipped", "manual"):
            continue
        pipeline = project.pipelines.get(row.id)
        jobs = []
        for job in pipeline.jobs.list(get_all=True):
            trace = project.jobs.get(job.id, lazy=True).trace() if job.started_at else b""
            jobs.append({
                "job_id": job.id, "job_name": job.name, "log_content": trace.decode("utf-8", errors="replace"),
                "status": job.status, "stage": job.stage, "created_at": job.created_at,
                "started_at": job.started_at, "finished_at": job.finished_at, "duration": job.duration, "ref": job.ref,
            })
        user = pipeline.user or {}
        document = {
            "pipeline_id": pipeline.id, "project_id": pipeline.project_id, "project_name": project.name,
            "status": pipeline.status, "ref": pipeline.ref, "sha": pipeline.sha, "source": pipeline.source,
            "pipeline_type": "main", "created_at": pipeline.created_at, "finished_at": pipeline.finished_at,
            "duration": pipeline.duration, "user": {"name": user.get("name"), "email": user.get("public_email")},
            "stages": sorted({j["stage"] for j in jobs}), "jobs": jobs,
        }
        response = requests.post(api_url, json=document, timeout=60)
        response.raise_for_status()
        sent += 1
    return sent


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:6]))
