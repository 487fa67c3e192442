"""Two seeded experiments for the demo: shoppers exposed through Split, with the purchases Mixpanel then recorded.

`one_click_checkout` has a real effect (users on "on" convert at 15% instead of 10%); `recommendation_carousel`
(three treatments, assigned independently) changes nothing, so it should not come out significant.
Impression keys are Mixpanel distinct_ids, so the warehouse can join the two halves.
"""

from __future__ import annotations

import datetime as dt
import functools
import random
from collections.abc import Iterator
from dataclasses import dataclass

ENVIRONMENT = ("194da2f0-3e22-11ea-ba75-12f2f63694e5", "Production")  # the impressions generator's environment
CHECKOUT = "one_click_checkout"
CAROUSEL = "recommendation_carousel"
CONVERSION = {"off": 0.10, "on": 0.15}
CAROUSEL_TREATMENTS = ("control", "carousel_a", "carousel_b")
WINDOW = dt.timedelta(days=2)
HOUR_MS = 3_600_000


@dataclass(frozen=True)
class Shopper:
    key: str
    checkout: str                 # treatment of one_click_checkout
    checkout_at: int              # first exposure, epoch ms
    carousel: str
    carousel_at: int
    switched: bool                # re-bucketed: later also saw the other checkout treatment


@dataclass(frozen=True)
class SandboxEvent:
    name: str
    key: str
    time_ms: int
    properties: dict


def _day_ms(day: dt.date) -> int:
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp() * 1000)


def shoppers(days: tuple[dt.date, ...], users: int, seed: int) -> list[Shopper]:
    """Exposed on the first two days, so each 2-day window closes within the data."""
    first = _day_ms(min(days))
    span = min(2, len(days)) * 86_400_000
    out = []
    for n in range(users):
        rng = random.Random(f"{seed}-shopper-{n}")
        # The carousel draws from its own stream: assigned independently of the checkout, as Split's hashing would.
        carousel = random.Random(f"{seed}-carousel-{n}")
        out.append(Shopper(f"shopper-{n:05d}", rng.choice(("off", "on")), first + rng.randrange(span),
                           carousel.choice(CAROUSEL_TREATMENTS), first + carousel.randrange(span), rng.random() < 0.005))
    return out


def _events(shopper: Shopper, seed: int) -> Iterator[SandboxEvent]:
    rng = random.Random(f"{seed}-events-{shopper.key}")
    exposed = shopper.checkout_at
    for _ in range(rng.randrange(1, 4)):
        yield SandboxEvent("Viewed Product", shopper.key, exposed + rng.randrange(-12 * HOUR_MS, 40 * HOUR_MS), {})
    if rng.random() < CONVERSION[shopper.checkout]:
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            amount: object = round(rng.uniform(5, 120), 2)
            if rng.random() < 0.01:
                amount = "n/a"            # a client that sent text: ignored by sums, and counted
            yield SandboxEvent("Purchase", shopper.key, exposed + rng.randrange(int(WINDOW.total_seconds() * 1000)),
                               {"amount": amount, "currency": "EUR"})
    if rng.random() < 0.05:               # before the exposure: must not count
        yield SandboxEvent("Purchase", shopper.key, exposed - rng.randrange(HOUR_MS, 10 * HOUR_MS), {"amount": 50.0})
    if rng.random() < 0.05:               # after the window: must not count
        yield SandboxEvent("Purchase", shopper.key, exposed + int(WINDOW.total_seconds() * 1000) + rng.randrange(HOUR_MS),
                           {"amount": 50.0})


@functools.lru_cache(maxsize=4)
def events(days: tuple[dt.date, ...], users: int, seed: int) -> tuple[SandboxEvent, ...]:
    """Every event of the shoppers, on whatever day it happened (kept: the sandbox serves the days one by one)."""
    return tuple(e for s in shoppers(days, users, seed) for e in _events(s, seed))


def events_on(days: tuple[dt.date, ...], users: int, seed: int, day: dt.date) -> list[SandboxEvent]:
    """The shoppers' events that happened on `day` (UTC)."""
    start = _day_ms(day)
    return [e for e in events(days, users, seed) if start <= e.time_ms < start + 86_400_000]


def impressions(days: tuple[dt.date, ...], users: int, seed: int) -> list[dict]:
    """Split webhook impressions of both experiments, in time order: each first exposure, some repeats, and the few
    shoppers re-bucketed into the other checkout treatment."""
    out = []
    for shopper in shoppers(days, users, seed):
        rng = random.Random(f"{seed}-impressions-{shopper.key}")
        seen = [(CHECKOUT, shopper.checkout, shopper.checkout_at), (CAROUSEL, shopper.carousel, shopper.carousel_at)]
        seen += [(CHECKOUT, shopper.checkout, shopper.checkout_at + rng.randrange(1, 20 * HOUR_MS))
                 for _ in range(rng.randrange(3))]
        if shopper.switched:
            other = "off" if shopper.checkout == "on" else "on"
            seen.append((CHECKOUT, other, shopper.checkout_at + rng.randrange(1, 20 * HOUR_MS)))
        for split, treatment, moment in seen:
            out.append({"key": shopper.key, "bucketingKey": None, "split": split, "treatment": treatment,
                        "label": "default rule", "time": moment, "splitVersionNumber": 1_700_000_000_000,
                        "environmentId": ENVIRONMENT[0], "environmentName": ENVIRONMENT[1], "sdk": "javascript",
                        "sdkVersion": "10.26.0", "machineName": "web-1", "properties": None})
    return sorted(out, key=lambda i: (i["time"], i["key"], i["split"]))
