"""Shared fixtures: a GitLab simulator and a recording receiver, both real HTTP servers on loopback."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from gitlab_log_shipper.sim.gitlab import GitLabSimulator
from gitlab_log_shipper.sim.receiver import Receiver
from gitlab_log_shipper.sim.world import World

REPO_ROOT = Path(__file__).resolve().parent.parent
# The real GitLab.com responses live beside the checkout (../shared/gitlab-samples); CI copies them there.
SAMPLES_DIR = REPO_ROOT.parent / "shared" / "gitlab-samples"


@pytest.fixture
def world() -> World:
    return World()


@pytest.fixture
def gitlab_sim(world: World) -> Iterator[GitLabSimulator]:
    with GitLabSimulator(world) as sim:
        yield sim


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as rec:
        yield rec
