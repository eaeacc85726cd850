"""scripts/install-system-deps.sh and the README test command that CI runs verbatim.

Why: the README's test command must pass on a fresh machine as written (#15): it installs
Chromium for the browser test itself instead of relying on .ci/run or a manual step. These tests
run the script against stub commands on a private PATH, so nothing is installed for real.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "scripts" / "install-system-deps.sh"
BASH = shutil.which("bash") or "/bin/bash"
CHMOD = shutil.which("chmod") or "/bin/chmod"


def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!" + BASH + "\n" + body)
    path.chmod(0o755)


def _run(bin_dir: Path) -> subprocess.CompletedProcess:
    env = {"PATH": str(bin_dir), "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run([BASH, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30)


def _path_tools(bin_dir: Path, uid: int) -> None:
    _stub(bin_dir, "id", f"echo {uid}\n")


def test_readme_command_installs_system_deps_first():
    readme = (ROOT / "README.md").read_text().splitlines()
    marker = readme.index("<!-- ci:test-command -->")
    assert readme[marker + 1] == "```bash"
    command = readme[marker + 2]
    assert command.startswith("bash scripts/install-system-deps.sh && ")
    assert command.endswith("python -m pytest -q")


def test_noop_when_chromium_present(tmp_path):
    log = tmp_path / "apt.log"
    _path_tools(tmp_path, uid=1000)
    _stub(tmp_path, "chromium", "exit 0\n")
    _stub(tmp_path, "apt-get", f'echo "$*" >> {log}\n')
    done = _run(tmp_path)
    assert done.returncode == 0, done.stderr
    assert not log.exists()


def test_installs_chromium_with_apt_as_root(tmp_path):
    log = tmp_path / "apt.log"
    _path_tools(tmp_path, uid=0)
    chromium = tmp_path / "chromium"
    _stub(
        tmp_path,
        "apt-get",
        f'echo "$DEBIAN_FRONTEND $*" >> {log}\n'
        f'if [ "$1" = install ]; then printf "#!{BASH}\\n" > {chromium}; {CHMOD} +x {chromium}; fi\n',
    )
    done = _run(tmp_path)
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    assert calls == ["noninteractive update -q", "noninteractive install -y -q chromium"]
    assert "chromium installed" in done.stderr


def test_uses_sudo_when_not_root(tmp_path):
    log = tmp_path / "sudo.log"
    _path_tools(tmp_path, uid=1000)
    _stub(tmp_path, "sudo", f'echo "$*" >> {log}\n"$@"\n')
    _stub(
        tmp_path,
        "apt-get",
        f'if [ "$1" = install ]; then printf "#!{BASH}\\n" > {tmp_path / "chromium"}; '
        f"{CHMOD} +x {tmp_path / 'chromium'}; fi\n",
    )
    done = _run(tmp_path)
    assert done.returncode == 0, done.stderr
    assert log.read_text().splitlines() == ["apt-get update -q", "apt-get install -y -q chromium"]


def test_clear_error_without_apt(tmp_path):
    _path_tools(tmp_path, uid=1000)
    done = _run(tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0
    assert "install Chromium" in done.stderr


def test_fails_when_install_leaves_no_chromium(tmp_path):
    _path_tools(tmp_path, uid=0)
    _stub(tmp_path, "apt-get", "exit 0\n")
    done = _run(tmp_path)
    assert done.returncode == 1
    assert "no chromium is on PATH" in done.stderr
