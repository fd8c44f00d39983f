"""The floor ``recsys bench serve`` divides by: a bare ASGI app (no framework) answering the API's
three busiest requests with the stored entries read in one Redis round trip, through the same
storage layer (live pointer cached for a second, the id's bucket). No key check, no rules, no
negative feedback, no validation: what Python, the server and Redis cost at least per request.

Run it as the API runs: ``uvicorn recsys.bench.floor_app:create_app --factory`` with the same
workers and RECSYS_REDIS_URL / RECSYS_REDIS_PREFIX.
"""

from __future__ import annotations

import json

from starlette.types import Receive, Scope, Send

from recsys.core.settings import Settings
from recsys.storage.live import LiveStore

_HEADERS = [(b"content-type", b"application/json")]


def create_app(settings: Settings | None = None):
    store = LiveStore(settings or Settings())

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await store.aclose()
            return await send({"type": "lifespan.shutdown.complete"})
        parts = scope["path"].split("/")
        if scope["method"] == "GET" and len(parts) == 4 and parts[1] == "users":
            _, raw = await store.raw_entry("user_recs", parts[2])
            body = (raw or "null").encode()
        elif scope["method"] == "GET" and len(parts) == 4 and parts[1] == "products":
            _, raw = await store.raw_entry("similar_products", parts[2])
            body = (raw or "null").encode()
        else:  # POST /carts/recommendations: both lists of every cart product
            chunks = []
            while True:
                message = await receive()
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    break
            product_ids = [str(p) for p in json.loads(b"".join(chunks))["product_ids"]]
            pointer = await store.pointer()
            found = await store.raw_entries(
                pointer.build, pointer.keys.buckets, ("bought_together", "similar_products"), product_ids
            )
            body = ("[" + ",".join(raw or "null" for lists in found.values() for raw in lists) + "]").encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [*_HEADERS, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return app
