"""Seeded, realistic Split impression batches, posted (gzipped, as Split does) to an impressions webhook."""

from __future__ import annotations

import gzip
import random
import time
import zlib
from dataclasses import dataclass, field

import httpx
import orjson

# (split, treatments, targeting rule labels): what a team running a few experiments and rollouts sees.
SPLITS = [
    ("new_checkout_flow", ["on", "off"], ["default rule", "in segment beta_testers", "whitelisted"]),
    ("pricing_page_layout", ["control", "variant_a", "variant_b"], ["default rule", "in segment eu_users"]),
    ("onboarding_tour", ["on", "off"], ["default rule", "killed", "not in split"]),
    ("search_ranking_v2", ["v1", "v2"], ["default rule", "in segment power_users"]),
    ("dark_mode", ["on", "off"], ["default rule"]),
]
SDKS = [("javascript", "10.26.0"), ("java", "4.13.0"), ("python", "10.2.0"), ("go", "6.6.0"), ("ios", "2.25.1")]
ENVIRONMENT = ("194da2f0-3e22-11ea-ba75-12f2f63694e5", "Production")


@dataclass
class ImpressionGenerator:
    """Batches shaped like Split's webhook bodies: a flat JSON array of impressions, in time order."""

    seed: int = 11
    users: int = 500
    rng: random.Random = field(init=False)
    versions: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        base = int(time.time() * 1000) - 30 * 86_400_000
        self.versions = {name: base + self.rng.randrange(86_400_000) for name, _, _ in SPLITS}
        self.keys = [f"user-{self.rng.randrange(16**8):08x}" for _ in range(self.users)]

    def batch(self, size: int, end_ms: int | None = None) -> list[dict]:
        """`size` impressions from the 10 seconds before `end_ms` (now by default)."""
        end_ms = end_ms or int(time.time() * 1000)
        times = sorted(end_ms - self.rng.randrange(10_000) for _ in range(size))
        batch = []
        for moment in times:
            name, treatments, labels = self.rng.choice(SPLITS)
            key = self.rng.choice(self.keys)
            sdk, sdk_version = self.rng.choice(SDKS)
            impression = {
                "key": key,
                "bucketingKey": None if self.rng.random() < 0.9 else f"account-{key[-4:]}",
                "split": name,
                # A user stays in the same treatment of a split, as Split's hashing would keep them.
                "treatment": treatments[zlib.crc32(f"{key}/{name}".encode()) % len(treatments)],
                "label": self.rng.choice(labels),
                "time": moment,
                "splitVersionNumber": self.versions[name],
                "environmentId": ENVIRONMENT[0],
                "environmentName": ENVIRONMENT[1],
                "sdk": sdk,
                "sdkVersion": sdk_version,
                "machineName": f"ip-10-0-{self.rng.randrange(4)}-{self.rng.randrange(256)}",
                "properties": None if self.rng.random() < 0.7 else orjson.dumps({"plan": self.rng.choice(["free", "pro"])}).decode(),
            }
            if self.rng.random() < 0.8:    # older SDKs omit machineIp
                impression["machineIp"] = f"10.0.{self.rng.randrange(4)}.{self.rng.randrange(256)}"
            batch.append(impression)
        return batch


def encode(batch: list[dict], gzipped: bool = True) -> tuple[bytes, dict[str, str]]:
    """The request body and headers Split would send for `batch`."""
    body = orjson.dumps(batch)
    headers = {"Content-Type": "application/json"}
    if gzipped:
        body = gzip.compress(body, compresslevel=6, mtime=0)  # same batch, same bytes
        headers["Content-Encoding"] = "gzip"
    return body, headers


@dataclass
class PostReport:
    bodies: int = 0
    impressions: int = 0
    resent: int = 0
    statuses: dict[int, int] = field(default_factory=dict)


def post_batches(url: str, generator: ImpressionGenerator, batches: int, size: int = 100, gzipped: bool = True,
                 resend_probability: float = 0.0, client: httpx.Client | None = None) -> PostReport:
    """Post `batches` bodies to the webhook `url`. Like Split, resend a body once (its retry after 300 ms) with
    `resend_probability`, which is how the same impressions arrive twice."""
    report = PostReport()
    own = client is None
    client = client or httpx.Client(timeout=30)
    try:
        for _ in range(batches):
            batch = generator.batch(size)
            body, headers = encode(batch, gzipped)
            sends = 2 if generator.rng.random() < resend_probability else 1
            for attempt in range(sends):
                status = client.post(url, content=body, headers=headers).status_code
                report.statuses[status] = report.statuses.get(status, 0) + 1
                report.bodies += 1
                report.resent += attempt
            report.impressions += len(batch)
    finally:
        if own:
            client.close()
    return report
