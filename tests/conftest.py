"""Shared fixtures: a GitLab simulator and a recording receiver, both real HTTP servers on loopback."""

from __future__ import annotations

import os
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
def loose_umask() -> Iterator[None]:
    """A permissive umask, so that only the code's own modes can make files private."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


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
