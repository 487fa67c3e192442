"""No settings object can print a secret: every settings class, formatted every way, with every secret set."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil

import pytest

import mixsync

SECRETS = {
    "MIXPANEL_API_SECRET": "legacy-api-secret-4711",
    "MIXPANEL_SERVICE_ACCOUNT_SECRET": "sa-secret-4712",
    "SPLIT_SDK_KEY": "split-sdk-key-4713",
    "FLAGSMITH_ENVIRONMENT_KEY": "ser.flagsmith-key-4714",
    "MIXSYNC_WEBHOOK_TOKEN": "webhook-token-4715-abcdefgh",
    "MIXSYNC_COHORT_WEBHOOK_PASSWORD": "cohort-password-4716",
}
REQUIRED = {"MIXPANEL_PROJECT_ID": "12345", "MIXPANEL_SERVICE_ACCOUNT_USERNAME": "sa.user",
            "MIXPANEL_PROJECT_TOKEN": "0123456789abcdef0123456789abcdef", "MIXSYNC_COHORT_WEBHOOK_USER": "mixpanel"}


def settings_classes() -> list[type]:
    found = []
    for module_info in pkgutil.walk_packages(mixsync.__path__, "mixsync."):
        if ".sandbox" in module_info.name:
            continue
        module = importlib.import_module(module_info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if (cls.__module__ == module.__name__ and dataclasses.is_dataclass(cls)
                    and hasattr(cls, "from_env") and cls.__name__.endswith(("Settings", "Limits"))):
                found.append(cls)
    return found


def test_the_settings_classes_are_found():
    names = {cls.__name__ for cls in settings_classes()}
    assert {"MixpanelSettings", "SplitSettings", "FlagsmithSettings", "ImpressionsSettings"} <= names


@pytest.mark.parametrize("legacy", [False, True])
def test_no_settings_object_prints_a_secret(legacy):
    environ = {**REQUIRED, **SECRETS}
    if legacy:  # the legacy project secret alone: it becomes the Basic auth username
        del environ["MIXPANEL_SERVICE_ACCOUNT_USERNAME"], environ["MIXPANEL_SERVICE_ACCOUNT_SECRET"]
    for cls in settings_classes():
        settings = cls.from_env(environ)
        shown = " ".join([repr(settings), str(settings), f"{settings}", f"{settings!r}", "{}".format(settings)])  # noqa: UP032
        for name, secret in SECRETS.items():
            assert secret not in shown, f"{cls.__name__} shows {name}"
