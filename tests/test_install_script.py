"""scripts/install.sh, the README's first command, run as a new user would (issue 9 A3).

The script makes a venv, installs homeport into it and links ``homeport`` into a
bin directory. So that the test needs no network and stays fast, the venv is
made beforehand (the script keeps an existing one) and sees this interpreter's
packages through a ``.pth`` file; ``PIP_NO_INDEX`` makes any download attempt
fail loudly instead of quietly reaching the internet.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "install.sh"


def _prepared_venv(venv: Path) -> None:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = Path(
        subprocess.run(
            [
                str(venv / "bin" / "python"),
                "-c",
                "import sysconfig; print(sysconfig.get_path('purelib'))",
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    ours = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (purelib / "zz_test_parent.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))


def test_install_sh_puts_a_working_homeport_on_the_bin_dir(tmp_path: Path) -> None:
    if not SCRIPT.exists():
        pytest.fail(f"{SCRIPT} is missing")
    venv, bindir, home = tmp_path / "venv", tmp_path / "bin", tmp_path / "home"
    home.mkdir()
    _prepared_venv(venv)
    env = {
        **os.environ,
        "HOME": str(home),
        "HOMEPORT_VENV": str(venv),
        "HOMEPORT_BIN": str(bindir),
        "PYTHON": sys.executable,
        "PIP_NO_INDEX": "1",
        "PIP_NO_BUILD_ISOLATION": "0",  # pip's inverted spelling of --no-build-isolation
        "PATH": "/usr/local/bin:/usr/bin:/bin",
    }
    res = subprocess.run(
        ["sh", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert res.returncode == 0, res.stdout + res.stderr
    link = bindir / "homeport"
    assert link.is_symlink() and link.resolve() == (venv / "bin" / "homeport").resolve()
    assert f"installed: {link}" in res.stdout
    # bindir is not on the PATH given: the script says how to add it
    assert f'export PATH="{bindir}:$PATH"' in res.stdout
    # the installed command is a real, non-editable install of this tree
    help_ = subprocess.run(
        [str(link), "--help"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert help_.returncode == 0 and "server" in help_.stdout, help_.stderr
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import homeport; print(homeport.__file__)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert where.startswith(str(venv)), where


def test_install_sh_refuses_unknown_arguments(tmp_path: Path) -> None:
    res = subprocess.run(
        ["sh", str(SCRIPT), "--frobnicate"], capture_output=True, text=True, timeout=30, check=False
    )
    assert res.returncode == 2
    assert res.stderr.strip() == "install.sh: unknown argument --frobnicate (try --help)"
