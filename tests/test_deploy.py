"""The example systemd unit (deploy/conveyord.service): systemd's own checker accepts it, it
is hardened as the README says, and its environment file sets only conveyord's variables."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from conveyord.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "conveyord.service"
ENV_FILE = ROOT / "deploy" / "conveyord.env"
INSTALLED = "/opt/conveyor/bin/conveyord"  # where the unit expects the console script


def service_section() -> dict[str, list[str]]:
    """The [Service] settings of the unit, each with all its values (keys may repeat)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    """Checked where this environment's conveyord is, since verify wants the program to exist."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is not installed (Debian: apt-get install systemd)"
    conveyord = Path(sys.executable).parent / "conveyord"
    assert INSTALLED in UNIT.read_text()
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace(INSTALLED, str(conveyord)))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_the_unit_runs_a_restarting_unprivileged_service_with_its_state_kept() -> None:
    service = service_section()
    assert service["ExecStart"] == [INSTALLED]
    assert service["DynamicUser"] == ["yes"]
    assert service["StateDirectory"] == ["conveyor"]
    assert service["Restart"] == ["on-failure"]
    assert "CONVEYORD_STORE=sqlite:/var/lib/conveyor/conveyor.db" in service["Environment"]
    assert service["EnvironmentFile"] == ["-/etc/conveyor/conveyord.env"]
    for hardening in ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp"):
        assert service[hardening][0] in ("yes", "strict"), hardening


def test_the_environment_file_sets_conveyord_variables_only() -> None:
    helps = " ".join(action.help or "" for action in build_parser()._actions)
    known = set(re.findall(r"\[env (CONVEYORD_[A-Z_]+)", helps))
    text = ENV_FILE.read_text()
    settings = re.findall(r"^#?([A-Z_]+)=", text, flags=re.MULTILINE)  # commented out, or set
    assert settings and set(settings) <= known
