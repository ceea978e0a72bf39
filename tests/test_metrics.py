"""The Prometheus textfile (METRICS_TEXTFILE) written by real cycles through the CLI."""

from __future__ import annotations

import re
import stat
from pathlib import Path

from gitlab_log_shipper import __version__
from gitlab_log_shipper.sim.gitlab import GitLabSimulator
from gitlab_log_shipper.sim.receiver import Receiver, Reply
from gitlab_log_shipper.sim.world import JobSpec, World

from shipper_helpers import make_env

SAMPLE = re.compile(r'^(gitlab_log_shipper_[a-z_]+)(\{[a-z_]+="[^"]*"(?:,[a-z_]+="[^"]*")*\})? (-?[0-9.e+]+)$')


HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def parse(text: str) -> dict[str, float]:
    """Check the exposition format strictly enough for node_exporter and return {name{labels}: value}."""
    assert text.endswith("\n")
    samples: dict[str, float] = {}
    declared: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram") and name not in declared
            declared[name] = kind
            continue
        match = SAMPLE.match(line)
        assert match, line
        name, labels, value = match.groups()
        family = _family(name, declared)
        assert family is not None, f"{name} has no TYPE line"
        if declared[family] == "counter":
            assert name.endswith("_total")
        assert (name + (labels or "")) not in samples, f"{line}: sample repeated"
        samples[name + (labels or "")] = float(value)
    for family in (name for name, kind in declared.items() if kind == "histogram"):
        _check_histogram(family, samples)
    return samples


def _family(name: str, declared: dict[str, str]) -> str | None:
    """The declared metric a sample belongs to: itself, or the histogram whose _bucket/_sum/_count it is."""
    if name in declared:
        return None if declared[name] == "histogram" else name  # a histogram has no sample of its bare name
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and declared.get(name[: -len(suffix)]) == "histogram":
            return name[: -len(suffix)]
    return None


def _check_histogram(family: str, samples: dict[str, float]) -> None:
    """Prometheus' rules for a histogram without labels: ``le`` buckets in increasing order ending with +Inf,
    cumulative (never decreasing), the +Inf bucket equal to ``_count``, and a ``_sum``."""
    prefix = f'{family}_bucket{{le="'
    bounds = [(key[len(prefix):-2], value) for key, value in samples.items() if key.startswith(prefix)]
    assert bounds and bounds[-1][0] == "+Inf", f"{family}: no +Inf bucket last"
    les = [float(le) for le, _ in bounds]
    assert les == sorted(les) and len(set(les)) == len(les), f"{family}: buckets out of order"
    counts = [value for _, value in bounds]
    assert counts == sorted(counts), f"{family}: buckets not cumulative"
    assert samples[f"{family}_count"] == counts[-1] and f"{family}_sum" in samples


def test_textfile_after_cycles(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator) -> None:
    project = world.add_project("team/app")
    world.add_pipeline(project.id, status="success", jobs=[JobSpec("a", "test", "success", log="a\n")])
    world.add_pipeline(project.id, status="canceled", jobs=[JobSpec("b", "test", "canceled", log="b\n")])
    textfile = tmp_path / "collector" / "gitlab_log_shipper.prom"
    textfile.parent.mkdir()
    with Receiver() as rec:
        env = make_env(tmp_path, gitlab_sim, rec, METRICS_TEXTFILE=str(textfile), LOG_SAVE_PIPELINE_STATUS="success",
                       API_POST_SAVE_TO_FILE="true")
        assert env.invoke("run", "--once").exit_code == 0
        first = parse(textfile.read_text("utf-8"))
        assert first['gitlab_log_shipper_pipelines_total{outcome="shipped"}'] == 1
        assert first['gitlab_log_shipper_pipelines_total{outcome="filtered"}'] == 1
        assert first['gitlab_log_shipper_pipelines_total{outcome="failed"}'] == 0
        assert first[f'gitlab_log_shipper_info{{version="{__version__}",mode="dual"}}'] == 1
        assert first["gitlab_log_shipper_outbox_documents"] == 0
        assert first["gitlab_log_shipper_last_cycle_duration_seconds"] > 0
        assert first["gitlab_log_shipper_last_success_timestamp_seconds"] == first["gitlab_log_shipper_last_cycle_timestamp_seconds"]
        assert 0 < first["gitlab_log_shipper_gitlab_rate_limit_remaining"] <= 2000  # from GitLab's RateLimit-Remaining
        assert stat.S_IMODE(textfile.stat().st_mode) == 0o644  # node_exporter runs as another user
        assert [p.name for p in textfile.parent.iterdir()] == [textfile.name]  # no temporary file left behind

        rec.set_script(lambda req: Reply(503))
        world.add_pipeline(project.id, status="success", jobs=[JobSpec("c", "test", "success", log="c\n")])
        assert env.invoke("run", "--once", RETRY_ATTEMPTS="0").exit_code == 1
    second = parse(textfile.read_text("utf-8"))
    assert second["gitlab_log_shipper_outbox_documents"] == 1 and second["gitlab_log_shipper_outbox_bytes"] > 0
    assert second['gitlab_log_shipper_pipelines_total{outcome="fell_back_to_file"}'] == 1
    assert second['gitlab_log_shipper_pipelines_total{outcome="queued"}'] == 1
    assert second["gitlab_log_shipper_cycles_total"] == 2 and second["gitlab_log_shipper_cycles_incomplete_total"] == 1
    assert second["gitlab_log_shipper_last_success_timestamp_seconds"] == first["gitlab_log_shipper_last_success_timestamp_seconds"]
    assert second["gitlab_log_shipper_last_cycle_timestamp_seconds"] > first["gitlab_log_shipper_last_cycle_timestamp_seconds"]


def test_unwritable_textfile_is_logged_and_shipping_goes_on(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator,
                                                            receiver: Receiver) -> None:
    project = world.add_project("team/app")
    world.add_pipeline(project.id, status="success", jobs=[JobSpec("a", "test", "success", log="a\n")])
    env = make_env(tmp_path, gitlab_sim, receiver, METRICS_TEXTFILE=str(tmp_path / "missing" / "x.prom"))
    result = env.invoke("run", "--once")
    assert result.exit_code == 0 and len(receiver.accepted()) == 1
    assert "writing METRICS_TEXTFILE=" in result.output and "failed" in result.output
