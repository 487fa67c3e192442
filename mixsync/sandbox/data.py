"""Seeded synthetic Mixpanel data: the same seed always gives the same bytes."""

from __future__ import annotations

import datetime as dt
import gzip
import os
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

VERBS = [
    "Viewed", "Clicked", "Opened", "Closed", "Started", "Completed", "Shared", "Searched", "Added", "Removed",
    "Updated", "Downloaded", "Uploaded", "Played", "Paused", "Liked", "Saved", "Invited", "Exported", "Dismissed",
]
OBJECTS = [
    "Page", "Product", "Cart", "Checkout", "Video", "Article", "Settings", "Profile", "Dashboard", "Report",
    "Notification", "Onboarding Step", "Pricing Plan", "Search Result", "Coupon",
]
SPECIAL_EVENTS = [
    "$mp_web_page_view", "$identify", "$create_alias", "$ae_session", "$mp_click", "$session_start",
    "Purchase", "Sign Up", "Añadir al carrito", "購入完了", "checkout:step 2 (payment)", "🚀 Launched rocket",
    "A very long event name that goes on and on past eighty characters to test the limits of downstream tools",
]
CITIES = [("São Paulo", "BR"), ("Zürich", "CH"), ("東京", "JP"), ("Kraków", "PL"), ("New York", "US"),
          ("Berlin", "DE"), ("Montréal", "CA"), ("Reykjavík", "IS"), ("München", "DE"), ("Lagos", "NG")]
BROWSERS = ["Chrome", "Safari", "Firefox", "Edge", "Mobile Safari", None]
MALFORMED_LINES = [
    '{{"event": "Broken", "properties": {{"time": {ms}, "distinct_id": "u-1"',
    '{{"properties": {{"time": {ms}, "distinct_id": "u-2"}}}}',
    '{{"event": "No Time", "properties": {{"distinct_id": "u-3"}}}}',
    "not json at all",
]


@dataclass(frozen=True)
class Dataset:
    """What the sandbox serves: which days, how many users and events, and which imperfections."""

    days: tuple[dt.date, ...]
    users: int = 3000
    events_per_day: int = 5000
    seed: int = 7
    malformed_per_day: int = 0
    # Legacy projects store local wall-clock time in this zone as if it were UTC epoch time.
    legacy_timezone: str | None = None
    # Shoppers of the two seeded experiments (mixsync.sandbox.experiments); their events come on top of the rest.
    experiment_users: int = 0

    @classmethod
    def recent(cls, n_days: int = 5, **kwargs) -> Dataset:
        today = dt.datetime.now(dt.UTC).date()
        return cls(days=tuple(today - dt.timedelta(days=n) for n in range(n_days, 0, -1)), **kwargs)

    def file_name(self, day: dt.date) -> str:
        experiments = f"-x{self.experiment_users}" if self.experiment_users else ""
        return f"events-{day.isoformat()}-{self.users}-{self.events_per_day}-{self.seed}-{self.malformed_per_day}-{(self.legacy_timezone or 'utc').replace('/', '_')}{experiments}.jsonl.gz"


def user_ids(users: int, seed: int = 7) -> list[str]:
    """Distinct ids as Mixpanel holds them: mostly opaque strings, some numeric-looking, some device ids."""
    rng = random.Random(seed)
    ids = []
    for n in range(users):
        kind = rng.random()
        if kind < 0.8:
            ids.append(f"u-{n:06d}")
        elif kind < 0.9:
            ids.append(str(100000 + n))
        else:
            ids.append(f"$device:{rng.getrandbits(64):016x}")
    return ids


def event_names() -> list[str]:
    return SPECIAL_EVENTS + [f"{verb} {obj}" for verb in VERBS for obj in OBJECTS]


def generate_day(dataset: Dataset, day: dt.date) -> Iterator[bytes]:
    """One day of export lines, time in milliseconds, in Mixpanel's ingestion order (not sorted, not deduped).

    For a legacy project the same numbers are local wall-clock times: the day is the project's local day.
    """
    rng = random.Random(f"{dataset.seed}-{day.isoformat()}")
    names = event_names()
    weights = [1.0 / (rank + 1) for rank in range(len(names))]
    people = user_ids(dataset.users, dataset.seed)
    day_start_ms = int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp() * 1000)
    chosen_names = rng.choices(names, weights=weights, k=dataset.events_per_day)
    malformed_at = {rng.randrange(dataset.events_per_day): n for n in range(dataset.malformed_per_day)}
    for n, name in enumerate(chosen_names):
        stored_ms = day_start_ms + rng.randrange(86_400_000)
        if n in malformed_at:
            kind = (malformed_at[n] + day.toordinal()) % len(MALFORMED_LINES)
            yield MALFORMED_LINES[kind].format(ms=stored_ms).encode()
        city, country = rng.choice(CITIES)
        person = rng.choice(people)
        props: dict = {
            "time": stored_ms,
            "distinct_id": person,
            "$insert_id": f"{rng.getrandbits(128):032x}",
            "mp_processing_time_ms": stored_ms + rng.randrange(50, 5000),
            "$mp_api_endpoint": "api.mixpanel.com",
            "mp_lib": rng.choice(["web", "iphone", "android", "python"]),
            "$lib_version": "2.55.0",
            "$city": city,
            "mp_country_code": country,
            "$browser": rng.choice(BROWSERS),
            "$device_id": f"{rng.getrandbits(64):016x}",
            "$user_id": person,
        }
        roll = rng.random()
        if name == "Purchase" or roll < 0.05:
            props["price"] = f"{rng.randrange(100, 50000) / 100:.2f}"
            props["quantity"] = rng.randrange(1, 5)
            props["cart"] = {"items": [{"sku": f"SKU-{rng.randrange(999)}", "price": rng.randrange(1, 500) + 0.99}],
                             "coupon": None, "gift": rng.random() < 0.1}
        if roll < 0.02:
            props["order_id"] = 9007199254740993 + n  # above 2**53: must survive untouched
        if roll < 0.03:
            props["tags"] = ["beta", "ünïcode", 3, None]
            props["payload"] = '{"nested": "json in a string"}'
        if roll > 0.998:
            del props["distinct_id"]
        elif roll > 0.996:
            props["distinct_id"] = ""
        if 0.5 < roll < 0.5025:
            del props["$insert_id"]
        line = orjson.dumps({"event": name, "properties": props})
        yield line
        if 0.7 < roll < 0.705:
            yield line  # the export returns exact duplicates as they were ingested
        elif 0.8 < roll < 0.805 and "$insert_id" in props:
            later = dict(props, mp_processing_time_ms=props["mp_processing_time_ms"] + 60_000, reprocessed=True)
            yield orjson.dumps({"event": name, "properties": later})
    if dataset.experiment_users:
        from mixsync.sandbox import experiments

        for event in experiments.events_on(dataset.days, dataset.experiment_users, dataset.seed, day):
            props = {"time": event.time_ms, "distinct_id": event.key, "$insert_id": f"{rng.getrandbits(128):032x}",
                     "mp_processing_time_ms": event.time_ms + 1000, "mp_lib": "web", **event.properties}
            yield orjson.dumps({"event": event.name, "properties": props})


def ensure_day_file(dataset: Dataset, day: dt.date, directory: Path) -> Path:
    """Write (once) the gzipped JSONL of a day, so big days are generated once and served as bytes."""
    path = directory / dataset.file_name(day)
    if path.exists():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    with gzip.open(tmp, "wb", compresslevel=6) as out:
        chunk: list[bytes] = []
        for line in generate_day(dataset, day):
            chunk.append(line)
            if len(chunk) >= 10_000:
                out.write(b"\n".join(chunk) + b"\n")
                chunk = []
        if chunk:
            out.write(b"\n".join(chunk) + b"\n")
    os.replace(tmp, path)
    return path
