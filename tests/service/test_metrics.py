"""The Prometheus textfile (METRICS_TEXTFILE) written by real cycles through the CLI."""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from gitlab_log_shipper import __version__
from gitlab_log_shipper.sim.gitlab import GitLabSimulator
from gitlab_log_shipper.sim.receiver import Receiver, Reply
from gitlab_log_shipper.sim.world import JobSpec, World

from repo_paths import PACKAGE_DIR, REPO_ROOT
from shipper_helpers import Env, make_env

SAMPLE = re.compile(r'^(gitlab_log_shipper_[a-z_]+)(\{[a-z_]+="[^"]*"(?:,[a-z_]+="[^"]*")*\})? (-?[0-9.e+]+)$')


HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def parse(text: str) -> dict[str, float]:
    """Check the exposition format strictly enough for node_exporter and return {name{labels}: value}."""
    assert text.endswith("\n")
    samples: dict[str, float] = {}
    declared: dict[str, str] = {}
    helped: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split(" ")[2]
            assert name not in helped and len(line.split(" ", 3)) == 4, f"{line}: a second or empty HELP"
            helped.add(name)
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram") and name not in declared
            # Prometheus' naming conventions (promtool check metrics, when it is not installed): a HELP before every
            # TYPE, snake case with our prefix, _total only on counters, base units (seconds, bytes) in the name.
            assert name in helped, f"{name}: TYPE without HELP"
            assert re.fullmatch(r"gitlab_log_shipper_[a-z0-9_]+", name), name
            assert (kind == "counter") == name.endswith("_total"), f"{name}: _total is for counters only"
            assert not re.search(r"_(milliseconds|ms|minutes|hours|kb|mb|kib|mib)(_|$)", name), f"{name}: not base units"
            if kind != "counter" and re.search(r"(duration|latency|age|seconds)", name):  # a counter counts events
                assert re.search(r"_seconds(_total)?$", name) or name.endswith("_at"), f"{name}: times in seconds"
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
    (tmp_path / "a-file").write_text("")  # where the folder should be: it cannot be created (a missing one is)
    env = make_env(tmp_path, gitlab_sim, receiver, METRICS_TEXTFILE=str(tmp_path / "a-file" / "x.prom"))
    result = env.invoke("run", "--once")
    assert result.exit_code == 0 and len(receiver.accepted()) == 1
    assert "writing METRICS_TEXTFILE=" in result.output and "failed" in result.output


def _run(env: Env, *overrides: str, **values: str) -> int:
    return env.invoke("run", "--once", *overrides, **values).exit_code


def test_requests_by_status_bytes_and_cycle_durations(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator) -> None:
    """Every request GitLab and the receiver saw is counted under its status, every attempt of a retry too;
    bytes shipped are what the receiver took; the cycle histogram counts each cycle."""
    project = world.add_project("team/app")
    world.add_pipeline(project.id, status="success", jobs=[JobSpec("a", "test", "success", log="x" * 5000 + "\n")])
    seen: Counter[str] = Counter()
    gitlab_sim.on_request(lambda endpoint, args, params: seen.update(["request"]))
    answers = iter([Reply(503), Reply(500)])
    textfile = tmp_path / "collector" / "gitlab_log_shipper.prom"
    textfile.parent.mkdir()
    with Receiver() as rec:
        env = make_env(tmp_path, gitlab_sim, rec, METRICS_TEXTFILE=str(textfile), RETRY_ATTEMPTS="3")
        assert env.invoke("check").exit_code == 0  # its requests are not counted: it records nothing
        seen.clear()
        rec.clear()  # check reached the receiver too
        gitlab_sim.inject("pipeline_jobs", 503)  # python-gitlab retries it: one 503, then 200
        rec.set_script(lambda req: next(answers, Reply(200)))  # urllib3 retries: 503, 500, then 200
        assert _run(env) == 0
        first = parse(textfile.read_text("utf-8"))
        assert _run(env) == 0  # an idle cycle: GitLab requests only
        second = parse(textfile.read_text("utf-8"))
        accepted = rec.accepted()
        statuses = Counter(str(r.status) for r in rec.requests)
    gitlab = {key: value for key, value in second.items() if key.startswith("gitlab_log_shipper_gitlab_requests_total")}
    assert sum(gitlab.values()) == seen["request"] and gitlab['gitlab_log_shipper_gitlab_requests_total{code="503"}'] == 1
    receiver = {key.split('"')[1]: value for key, value in second.items()
                if key.startswith("gitlab_log_shipper_receiver_requests_total")}
    assert receiver == {code: float(n) for code, n in statuses.items()} == {"200": 1.0, "500": 1.0, "503": 1.0}
    assert second["gitlab_log_shipper_shipped_bytes_total"] == sum(r.wire_size for r in accepted) > 5000
    assert second["gitlab_log_shipper_shipped_log_bytes_total"] == 5001
    assert first["gitlab_log_shipper_cycle_duration_seconds_count"] == 1
    assert second["gitlab_log_shipper_cycle_duration_seconds_count"] == 2 == second["gitlab_log_shipper_cycles_total"]
    assert second["gitlab_log_shipper_cycle_duration_seconds_sum"] > first["gitlab_log_shipper_cycle_duration_seconds_sum"]
    assert second["gitlab_log_shipper_pipelines_failing_repeatedly"] == 0


def test_no_answer_counts_as_code_0(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator) -> None:
    project = world.add_project("team/app")
    world.add_pipeline(project.id, status="success", jobs=[JobSpec("a", "test", "success", log="a\n")])
    textfile = tmp_path / "gitlab_log_shipper.prom"
    with Receiver() as rec:
        env = make_env(tmp_path, gitlab_sim, rec, METRICS_TEXTFILE=str(textfile), RETRY_ATTEMPTS="0")
    assert _run(env) == 1  # the receiver is gone: the document waits in the outbox
    samples = parse(textfile.read_text("utf-8"))
    assert samples['gitlab_log_shipper_receiver_requests_total{code="0"}'] == 1
    assert "gitlab_log_shipper_shipped_bytes_total" not in samples or samples["gitlab_log_shipper_shipped_bytes_total"] == 0


def test_pipelines_failing_repeatedly(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator,
                                     receiver: Receiver) -> None:
    """A pipeline whose jobs GitLab refuses is retried by id; from its third failed attempt it counts."""
    project = world.add_project("team/app")
    world.add_pipeline(project.id, status="success", jobs=[JobSpec("a", "test", "success", log="a\n")])
    gitlab_sim.inject("pipeline_jobs", 403, count=1000)
    textfile = tmp_path / "gitlab_log_shipper.prom"
    env = make_env(tmp_path, gitlab_sim, receiver, METRICS_TEXTFILE=str(textfile))
    failing = []
    for _ in range(4):
        _run(env)
        failing.append(parse(textfile.read_text("utf-8"))["gitlab_log_shipper_pipelines_failing_repeatedly"])
        time.sleep(1.1)  # the retry list's backoff after the two quick retries: POLL_INTERVAL (1 s) doubling
    assert failing[:2] == [0, 0] and failing[-1] == 1, failing


def test_promtool_accepts_the_textfile(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator,
                                       receiver: Receiver) -> None:
    """Prometheus' own linter (Debian's prometheus package) on a textfile with every family present."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus); parse() checks the conventions")
    project = world.add_project("team/app")
    world.add_pipeline(project.id, status="success", jobs=[JobSpec("a", "test", "success", log="a\n")])
    textfile = tmp_path / "gitlab_log_shipper.prom"
    env = make_env(tmp_path, gitlab_sim, receiver, METRICS_TEXTFILE=str(textfile))
    assert _run(env) == 0
    text = textfile.read_text("utf-8")
    parse(text)
    for family in ("gitlab_requests_total", "receiver_requests_total", "shipped_bytes_total", "shipped_log_bytes_total",
                   "cycle_duration_seconds", "pipelines_failing_repeatedly", "delivery_latency_seconds"):
        assert f"# TYPE gitlab_log_shipper_{family} " in text, family
    lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert lint.returncode == 0 and not lint.stdout.strip() and not lint.stderr.strip(), lint.stdout + lint.stderr


def test_operations_alert_rules_pass_promtool(tmp_path: Path) -> None:
    """OPERATIONS.md's alert rules are a rule file Prometheus loads, and every metric they use is one we write."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    text = (REPO_ROOT / "OPERATIONS.md").read_text("utf-8")
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.DOTALL) if b.startswith("groups:"))
    rules = tmp_path / "rules.yml"
    rules.write_text(block, "utf-8")
    lint = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=30)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    source = (PACKAGE_DIR / "service" / "metrics.py").read_text("utf-8")
    for name in set(re.findall(r"gitlab_log_shipper_([a-z_]+)", block)):
        base = re.sub(r"_(bucket|sum|count)$", "", name) if name.startswith(("delivery_latency", "cycle_duration")) else name
        assert f'"{base}"' in source or f"_{base}" in source, f"the rules use gitlab_log_shipper_{name}, never written"
    for alert in ("NoRecentCycle", "RetryingLong", "DeadLettersGrowing", "OutboxGrowing", "GitLab5xx", "LatencyHigh"):
        assert f"alert: GitlabLogShipper{alert}" in block


def test_unknown_variables_are_counted(tmp_path: Path, world: World, gitlab_sim: GitLabSimulator,
                                       receiver: Receiver) -> None:
    world.add_project("team/app")
    textfile = tmp_path / "metrics" / "gls.prom"
    env = make_env(tmp_path, gitlab_sim, receiver, METRICS_TEXTFILE=str(textfile))
    assert env.invoke("run", "--once").exit_code == 0
    assert parse(textfile.read_text())["gitlab_log_shipper_unknown_variables"] == 0
    result = env.invoke("run", "--once", POLL_INTERVALL="5", API_POST_ENABLE="true")
    assert result.exit_code == 0
    assert parse(textfile.read_text())["gitlab_log_shipper_unknown_variables"] == 2


@pytest.mark.parametrize("text", [
    "# TYPE gitlab_log_shipper_x gauge\ngitlab_log_shipper_x 1\n",  # no HELP
    "# HELP gitlab_log_shipper_x_total x\n# TYPE gitlab_log_shipper_x_total gauge\ngitlab_log_shipper_x_total 1\n",
    "# HELP gitlab_log_shipper_x x\n# TYPE gitlab_log_shipper_x counter\ngitlab_log_shipper_x 1\n",
    "# HELP gitlab_log_shipper_cycle_duration_ms x\n# TYPE gitlab_log_shipper_cycle_duration_ms gauge\n"
    "gitlab_log_shipper_cycle_duration_ms 1\n",
    "# HELP other_x x\n# TYPE other_x gauge\nother_x 1\n",
])
def test_the_naming_conventions_check_can_fail(text: str) -> None:
    """What stands in for `promtool check metrics` where it is not installed (CI): each rule is enforced."""
    with pytest.raises(AssertionError):
        parse(text)
