"""Where things are, for tests in any folder of tests/ (they mirror the package's folders)."""

from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
PACKAGE_DIR = REPO_ROOT / "gitlab_log_shipper"
SHARED_DIR = REPO_ROOT.parent / "shared"  # ../shared beside the checkout: the spec and GitLab's real samples
