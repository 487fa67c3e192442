"""The Mixpanel resource: its settings as typed fields, checked when an asset needs them."""

from __future__ import annotations

from mixsync.http import RetryStats
from mixsync.mixpanel.client import MixpanelClient
from mixsync.mixpanel.cohort_settings import CohortSettings
from mixsync.resources import HttpResource, env_setting
from mixsync.settings import MixpanelSettings


class MixpanelResource(HttpResource):
    """Mixpanel's project, credentials and export, and the cohorts to extract; only Mixpanel assets need them."""

    project_id: str | None = env_setting("MIXPANEL_PROJECT_ID", "the numeric id of the Mixpanel project")
    service_account_username: str | None = env_setting("MIXPANEL_SERVICE_ACCOUNT_USERNAME", "service account user")
    service_account_secret: str | None = env_setting("MIXPANEL_SERVICE_ACCOUNT_SECRET",
                                                     "service account secret (bind with EnvVar only)")
    api_secret: str | None = env_setting("MIXPANEL_API_SECRET", "legacy project API secret (bind with EnvVar only)")
    region: str | None = env_setting("MIXPANEL_REGION", "us, eu or in (default us)")
    base_url: str | None = env_setting("MIXPANEL_BASE_URL", "one base URL for every Mixpanel API (tests, proxies)")
    project_timezone: str | None = env_setting("MIXPANEL_PROJECT_TIMEZONE", "the project's time zone (default UTC)")
    legacy_local_time: str | None = env_setting("MIXPANEL_LEGACY_LOCAL_TIME",
                                                "true for projects that store local time (default false)")
    export_window_days: int | None = env_setting("MIXPANEL_EXPORT_WINDOW_DAYS", "days per export request (default 31)")
    lookback_days: int | None = env_setting("MIXPANEL_LOOKBACK_DAYS", "days the schedule reloads (default 3)")
    cohorts: str | None = env_setting("MIXPANEL_COHORTS", "cohort ids or names to extract (default all)")
    cohort_member_properties: str | None = env_setting("MIXPANEL_COHORT_MEMBER_PROPERTIES",
                                                       "profile properties kept with each member")
    engage_page_size: int | None = env_setting("MIXPANEL_ENGAGE_PAGE_SIZE", "members per engage page (default 5000)")

    def settings(self) -> MixpanelSettings:
        return MixpanelSettings.from_env(self.environ())

    def cohort_settings(self, identifier_property: str | None = None) -> CohortSettings:
        return CohortSettings.from_env(self.environ(), identifier_property)

    def client(self, stats: RetryStats | None = None) -> MixpanelClient:
        return MixpanelClient(self.settings(), self.retry_policy(), stats)
