"""Settings: the example file loads; bad values are refused with the key named; overrides win."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from node.config import load_settings, register_section, settings_from_mapping
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
        ({"tls": {"enabled": True, "certificate": "/nonexistent.crt", "key": "/x.key",
                  "ca": "/ca"}}, "certificate"),
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


def test_registered_extension_section_is_validated():
    class Analysis(BaseModel):
        bin_width: float

    register_section("analysis", Analysis)
    try:
        assert settings_from_mapping({"analysis": {"bin_width": 25}}).section(
            "analysis").bin_width == 25
        with pytest.raises(ConfigError, match="analysis.bin_width"):
            settings_from_mapping({"analysis": {"bin_width": "wide"}})
    finally:
        from node import config

        config._SECTION_MODELS.pop("analysis")
