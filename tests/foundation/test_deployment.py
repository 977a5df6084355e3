"""The deployment kit and the documents that must not drift from the code: the README's
configuration reference, the systemd unit, the environment file example, and the scripts."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mailtrio.cli import EXIT_CONFIG
from mailtrio.config import VARIABLES, Settings, markdown_reference, parse_duration
from tests.support.serve import ROOT, TEMPLATES

README = ROOT / "README.md"
UNIT = ROOT / "scripts" / "mailtrio.service"
ENV_EXAMPLE = ROOT / "scripts" / "mailtrio.env.example"


def readme_section(name: str) -> str:
    text = README.read_text(encoding="utf-8")
    m = re.search(rf"<!-- section:{name} -->\n(.*?)<!-- /section:{name} -->", text, re.DOTALL)
    assert m, f"README section {name!r} is missing"
    return m.group(1)


# -- README -------------------------------------------------------------------------------------


def test_readme_configuration_reference_is_generated_from_the_code() -> None:
    section = readme_section("configuration")
    assert markdown_reference() in section, "regenerate the table with mailtrio.config.markdown_reference()"
    documented = set(re.findall(r"^\| `(MAIL_[A-Z_]+)` \|", section, re.MULTILINE))
    assert documented == set(VARIABLES)


def test_markdown_reference_follows_the_variables_table() -> None:
    table = markdown_reference()
    for name, (required, default, _meaning) in VARIABLES.items():
        row = next(line for line in table.splitlines() if line.startswith(f"| `{name}` |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == "yes" if required else cells[1] != "yes"
        assert (f"`{default}`" in cells[2]) if default else cells[2] == ""


def test_readme_deployment_section_covers_the_kit() -> None:
    section = readme_section("deployment")
    for needed in ("scripts/build-binary", "dist/mailtrio", "python3.11", "appendonly yes", "noeviction",
                   "CREATE ROLE mailservice", "CREATE SCHEMA mail AUTHORIZATION mailservice",
                   "scripts/mailtrio.service", "scripts/mailtrio.env.example", "TimeoutStopSec", "SIGTERM",
                   "delivery-commands-asyncapi.yaml", "goose_db_version", "shiv"):
        assert needed in section, needed


# -- systemd unit -------------------------------------------------------------------------------


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#", ";"))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text(encoding="utf-8"))
    return parser


def test_unit_stops_with_sigterm_above_the_shutdown_timeout() -> None:
    service = _unit()["Service"]
    assert service["KillSignal"] == "SIGTERM"
    assert service["ExecStart"].endswith("/mailtrio serve")
    stop = parse_duration(service["TimeoutStopSec"])
    assert stop > parse_duration(VARIABLES["MAIL_SHUTDOWN_TIMEOUT"][1]) + 5
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == str(EXIT_CONFIG)
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert service["EnvironmentFile"].endswith("mailtrio.env")
    assert service["User"] == "mailservice"
    assert "PEX_ROOT=" in service["Environment"] and service["CacheDirectory"] == "mailtrio"


def test_unit_is_hardened() -> None:
    service = _unit()["Service"]
    expected = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
                "PrivateDevices": "yes", "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
                "ProtectControlGroups": "yes", "RestrictNamespaces": "yes", "RestrictSUIDSGID": "yes",
                "LockPersonality": "yes", "CapabilityBoundingSet": ""}
    for key, value in expected.items():
        assert service.get(key) == value, key
    assert set(service["RestrictAddressFamilies"].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = tmp_path / "mailtrio.service"
    unit.write_text(UNIT.read_text(encoding="utf-8").replace("/usr/local/bin/mailtrio", sys.executable))
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Unknown key" not in done.stderr and "Unknown section" not in done.stderr, done.stderr


# -- environment file example ---------------------------------------------------------------------


def _env_lines() -> tuple[dict[str, str], dict[str, str]]:
    active: dict[str, str] = {}
    commented: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^(#?)([A-Z][A-Z0-9_]*)=(.*)$", line)
        if m:
            (commented if m.group(1) else active)[m.group(2)] = m.group(3)
    return active, commented


def test_env_example_lists_every_variable_with_its_default() -> None:
    active, commented = _env_lines()
    names = set(active) | set(commented)
    assert {n for n in names if n.startswith("MAIL_")} == set(VARIABLES)
    assert all(n.startswith(("MAIL_", "OTEL_")) for n in names)
    for name, value in commented.items():
        if name in VARIABLES:
            assert value == VARIABLES[name][1], name
    for name, (required, _, _) in VARIABLES.items():
        if required:
            assert name in active, name


def test_env_example_is_a_valid_configuration() -> None:
    active, _ = _env_lines()
    settings = Settings.from_env({**active, "MAIL_TEMPLATE_DIR": str(TEMPLATES)})
    assert settings.smtp_mode == "smtp" and settings.smtp_tls == "starttls"
    unit_stop = parse_duration(_unit()["Service"]["TimeoutStopSec"])
    assert settings.shutdown_timeout < unit_stop


# -- scripts ----------------------------------------------------------------------------------------


def test_ci_runs_exactly_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    commands = [line.strip() for line in ci.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert commands[-1] == "exec scripts/test"
    readme = README.read_text(encoding="utf-8")
    assert re.search(r"^scripts/test\s+# run the tests", readme, re.MULTILINE)
    assert re.search(r"^scripts/run-local\s+# run the service", readme, re.MULTILINE)


def test_test_script_lints_type_checks_and_runs_the_suite() -> None:
    text = (ROOT / "scripts" / "test").read_text(encoding="utf-8")
    assert "scripts/setup" in text
    assert "ruff check" in text and "mypy" in text and "pytest -n" in text


@pytest.mark.parametrize("script", ["scripts/setup", "scripts/run-local", "scripts/test", "scripts/build-binary",
                                    ".ci/run"])
def test_scripts_are_executable_bash(script: str) -> None:
    path = ROOT / script
    assert path.stat().st_mode & 0o111, f"{script} is not executable"
    assert path.read_text(encoding="utf-8").startswith("#!/usr/bin/env bash\n")
    done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "set -euo pipefail" in path.read_text(encoding="utf-8")


def test_run_local_uses_stub_mode_and_the_sample_catalog() -> None:
    text = (ROOT / "scripts" / "run-local").read_text(encoding="utf-8")
    assert "MAIL_SMTP_MODE=${MAIL_SMTP_MODE:-stub}" in text
    assert "templates" in text and "mailtrio serve" in text
