"""The Flagsmith resource: its settings as typed fields, checked when an asset needs them."""

from __future__ import annotations

import dagster as dg

from mixsync.flagsmith.client import FlagsmithClient, FlagsmithKeyError
from mixsync.flagsmith.settings import FlagsmithSettings, ProfileFlagsSettings
from mixsync.http import RetryStats
from mixsync.resources import HttpResource, env_setting
from mixsync.settings import SettingsError


class FlagsmithResource(HttpResource):
    """Where cohort traits go and how they are named; only the Flagsmith asset needs them."""

    environment_key: str | None = env_setting("FLAGSMITH_ENVIRONMENT_KEY",
                                              "the server-side environment key (bind with EnvVar only)")
    api_url: str | None = env_setting("FLAGSMITH_API_URL", "the API (default Flagsmith's Edge API)")
    trait_prefix: str | None = env_setting("FLAGSMITH_TRAIT_PREFIX", "trait key prefix (default mp_cohort_)")
    on_cohort_exit: str | None = env_setting("FLAGSMITH_ON_COHORT_EXIT", "false or delete (default false)")
    identifier_property: str | None = env_setting("FLAGSMITH_IDENTIFIER_PROPERTY",
                                                  "a profile property to identify people by (default distinct_id)")
    bulk_mode: str | None = env_setting("FLAGSMITH_BULK_MODE", "auto, edge, core or identities (default auto)")
    concurrency: int | None = env_setting("FLAGSMITH_CONCURRENCY", "requests in flight (default 4)")
    verify_sample: int | None = env_setting("FLAGSMITH_VERIFY_SAMPLE", "identities read back (default 100)")
    batch_identities: int | None = env_setting("FLAGSMITH_BATCH_IDENTITIES", "identities per request (default 100)")
    # mixpanel_profile_flags: flag states onto Mixpanel profiles.
    mixpanel_project_token: str | None = env_setting("MIXPANEL_PROJECT_TOKEN",
                                                     "the token /engage updates carry (bind with EnvVar only)")
    profile_property_prefix: str | None = env_setting("FLAGSMITH_PROFILE_PROPERTY_PREFIX",
                                                      "profile property prefix (default flagsmith_)")

    def settings(self) -> FlagsmithSettings:
        return FlagsmithSettings.from_env(self.environ())

    def identifier_property_in_effect(self) -> str | None:
        """FLAGSMITH_IDENTIFIER_PROPERTY as this run has it (run config over the environment), without requiring
        the other Flagsmith settings: mixpanel_cohort_members fetches that property with the members."""
        return (self.environ().get("FLAGSMITH_IDENTIFIER_PROPERTY") or "").strip() or None

    def profile_flags_settings(self) -> ProfileFlagsSettings:
        return ProfileFlagsSettings.from_env(self.environ())

    def client(self, stats: RetryStats | None = None) -> FlagsmithClient:
        return FlagsmithClient(self.settings(), self.retry_policy(), stats)

    def check_environment_key(self) -> None:
        """Fail with a message naming FLAGSMITH_ENVIRONMENT_KEY when the key is missing, not a server-side key
        (checked without a request), or refused by Flagsmith (one `GET flags/`). Runs that push to Flagsmith call
        it in their first step, so a bad key is reported before any other service is asked for anything."""
        try:
            with self.client() as client:
                client.check_key()
        except (SettingsError, FlagsmithKeyError) as exc:
            raise dg.Failure(f"Flagsmith key check failed before any other request of this run: {exc}") from None
