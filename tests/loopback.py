"""The tests' own HTTP requests to the servers they start on 127.0.0.1.

httpx's module functions (`httpx.get`, `httpx.post`, …) build a client for each request, and each client a TLS
context that reads the whole CA bundle (~55 ms of CPU), though these requests are plain HTTP: one client with
mixsync's shared context does the same requests without it. No keep-alive, so every request opens and closes its
own connection as the module functions do (tests count connections and stop servers under them).
"""

from __future__ import annotations

import httpx

from mixsync.http import tls_context

client = httpx.Client(verify=tls_context(), limits=httpx.Limits(max_keepalive_connections=0))
get, post, put = client.get, client.post, client.put
