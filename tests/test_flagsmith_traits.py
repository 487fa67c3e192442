"""Pure trait naming and the Flagsmith settings: snake_case keys, collisions, key checks, URL forms."""

from __future__ import annotations

import pytest

from mixsync.flagsmith.settings import EDGE_API_URL, FlagsmithSettings, sync_cron
from mixsync.flagsmith.traits import TraitKeyError, snake_case, trait_key, trait_keys
from mixsync.settings import SettingsError


@pytest.mark.parametrize("name, expected", [
    ("Power Users", "power_users"),
    ("powerUsers", "power_users"),
    ("HTMLReaders", "html_readers"),
    ("Beta Testers (EU)", "beta_testers_eu"),
    ("  Checkout: Abandoned 🛒 ", "checkout_abandoned"),
    ("Añadir al carrito", "anadir_al_carrito"),
    ("already_snake", "already_snake"),
    ("München 2024", "munchen_2024"),
])
def test_snake_case(name, expected):
    assert snake_case(name) == expected


def test_trait_key_prefix_and_fallback_for_names_without_letters():
    assert trait_key("mp_cohort_", 7, "Power Users") == "mp_cohort_power_users"
    assert trait_key("mp_cohort_", 7, "🛒🛒") == "mp_cohort_cohort_7"


def test_colliding_names_are_an_error_naming_both_cohorts():
    with pytest.raises(TraitKeyError) as caught:
        trait_keys("mp_cohort_", [(1, "Power Users"), (2, "power-users"), (3, "Churn")])
    message = str(caught.value)
    assert "'mp_cohort_power_users'" in message and "cohort 1" in message and "cohort 2" in message
    assert trait_keys("mp_cohort_", [(1, "Power Users"), (3, "Churn")]) == {1: "mp_cohort_power_users",
                                                                             3: "mp_cohort_churn"}


def test_over_long_key_is_refused():
    with pytest.raises(TraitKeyError, match="200"):
        trait_key("mp_cohort_", 1, "x" * 195)


def test_settings_refuse_a_client_key_without_printing_it():
    with pytest.raises(SettingsError) as caught:
        FlagsmithSettings.from_env({"FLAGSMITH_ENVIRONMENT_KEY": "abcClientKey123"})
    assert "FLAGSMITH_ENVIRONMENT_KEY" in str(caught.value) and "ser." in str(caught.value)
    assert "abcClientKey123" not in str(caught.value)
    with pytest.raises(SettingsError, match="FLAGSMITH_ENVIRONMENT_KEY is not set"):
        FlagsmithSettings.from_env({})


def test_settings_defaults_and_url_forms():
    s = FlagsmithSettings.from_env({"FLAGSMITH_ENVIRONMENT_KEY": "ser.secret-value"})
    assert s.api_url == EDGE_API_URL and s.trait_prefix == "mp_cohort_" and s.exit_mode == "false"
    assert s.identifier_property is None and s.bulk_mode == "auto"
    assert "secret-value" not in repr(s)
    for url in ("https://flags.example.com", "https://flags.example.com/", "https://flags.example.com/api/v1/"):
        s = FlagsmithSettings.from_env({"FLAGSMITH_ENVIRONMENT_KEY": "ser.k", "FLAGSMITH_API_URL": url})
        assert s.api_url == "https://flags.example.com/api/v1"
    with pytest.raises(SettingsError, match="FLAGSMITH_ON_COHORT_EXIT"):
        FlagsmithSettings.from_env({"FLAGSMITH_ENVIRONMENT_KEY": "ser.k", "FLAGSMITH_ON_COHORT_EXIT": "remove"})
    with pytest.raises(SettingsError, match="FLAGSMITH_BULK_MODE"):
        FlagsmithSettings.from_env({"FLAGSMITH_ENVIRONMENT_KEY": "ser.k", "FLAGSMITH_BULK_MODE": "fast"})


def test_sync_cron_is_hourly_by_default_and_configurable():
    assert sync_cron({}) == "0 * * * *"
    assert sync_cron({"FLAGSMITH_SYNC_CRON": "*/15 * * * *"}) == "*/15 * * * *"
    with pytest.warns(UserWarning, match="FLAGSMITH_SYNC_CRON"):
        assert sync_cron({"FLAGSMITH_SYNC_CRON": "hourly"}) == "0 * * * *"
