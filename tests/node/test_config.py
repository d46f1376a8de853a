"""Settings: the example file loads; bad values are refused with the key named; overrides win."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.config import load_settings, settings_from_mapping
from node.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_example_configuration_loads_with_dcmtk_default_peers():
    settings = load_settings(REPO / "deploy" / "node.example.toml")
    assert settings.node.ae_title == "SPINENODE"
    assert {"STORESCU", "ECHOSCU"} <= set(settings.calling_ae_titles)
    assert settings.peer("ECHOSCU").host == "127.0.0.1"
    assert settings.node.database_path.name == "index.sqlite3"
    assert settings.peer("PACS").may_receive


@pytest.mark.parametrize(
    ("table", "key_named"),
    [
        ({"node": {"port": 70000}}, "node.port"),
        ({"node": {"ae_title": "THIS_AE_TITLE_IS_TOO_LONG"}}, "node.ae_title"),
        ({"node": {"quiet_period_s": 0}}, "node.quiet_period_s"),
        ({"node": {"database_url": "postgresql://x"}}, "node.database_url"),
        ({"node": {"prot": 104}}, "node.prot"),
        ({"dispatch": {"backoff_initial_s": 100, "backoff_max_s": 10}}, "backoff_max_s"),
        (
            {
                "tls": {
                    "enabled": True,
                    "certificate": "/nonexistent.crt",
                    "key": "/x.key",
                    "ca": "/ca",
                }
            },
            "certificate",
        ),
        ({"peers": [{"ae_title": "A", "port": 0}]}, "peers.0.port"),
        ({"node": {"result_destinations": ["NOPE"]}}, "node.result_destinations"),
        ({"unknown_section": {}}, "unknown_section"),
    ],
)
def test_bad_values_are_refused_naming_the_key(table, key_named):
    with pytest.raises(ConfigError) as info:
        settings_from_mapping(table)
    assert key_named in str(info.value)


def test_overrides_win_and_settings_are_frozen(tmp_path):
    cfg = tmp_path / "n.toml"
    cfg.write_text('[node]\nport = 1234\nstorage = "data"\n')
    settings = load_settings(cfg, {"node": {"port": 4321}})
    assert settings.node.port == 4321
    assert settings.node.storage == tmp_path / "data"  # relative to the file
    with pytest.raises(Exception):
        settings.node.port = 1  # type: ignore[misc]


def test_missing_and_malformed_files_are_reported(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[node\nport=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(bad)


@pytest.mark.parametrize(
    "table, message",
    [
        ({"analysis": {"radiomics_bin_count": 1}}, "analysis.radiomics_bin_count"),
        ({"analysis": {"rule_set": "3.0"}}, "analysis.rule_set"),
        ({"analysis": {"relaxivity_per_mM_s": {"gadobutrol": 0}}}, "analysis.relaxivity_per_mM_s"),
        ({"courses": {"method": "fetch"}}, "courses.method"),
        ({"followup": {"confirmation_days": 0}}, "followup.confirmation_days"),
        ({"followup": {"notify": {"smtp_host": "mail.example"}}}, "followup.notify"),
        ({"dashboard": {"bind_address": "0.0.0.0"}}, "dashboard"),
        ({"dashboard": {"colour": "blue"}}, "dashboard.colour"),
    ],
)
def test_every_section_is_validated_by_the_configuration_alone(table, message):
    """Each part's table is declared in node.config: a bad value is refused at load time, by any
    command, whatever modules it imported (a fresh interpreter imports node.config only)."""
    import json
    import subprocess
    import sys

    code = (
        "import json, sys\n"
        "from node.config import settings_from_mapping\n"
        "from node.errors import ConfigError\n"
        f"table = json.loads({json.dumps(json.dumps(table))})\n"
        "try:\n    settings_from_mapping(table)\n"
        "except ConfigError as err:\n    print(err)\n    sys.exit(3)\n"
        "assert 'node.worker' not in sys.modules and 'node.dashboard' not in sys.modules\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 3, (run.stdout, run.stderr)
    assert message in run.stdout


def test_sections_have_their_defaults_without_a_table():
    settings = settings_from_mapping({})
    assert settings.analysis.baseline_window_days == 90
    assert settings.analysis.chain_settings().rule_set == "2.0"
    assert settings_from_mapping({"analysis": {"rule_set": "1.0"}}).analysis.rule_set == "1.0"
    assert settings.courses.method == "move"
    assert settings.followup.confirmation_days == 56
    assert settings.dashboard.bind_address == "127.0.0.1"
    assert settings.section("followup") is settings.followup
