"""A small JSON-over-HTTP client for lookups rules make (rule ``national_cli``'s roaming query).

:class:`JsonGetter` implements :class:`sipguard.policy.national_cli.HttpGetter` with one
aiohttp session (connections kept alive to the operator's lookup service): no redirects, no
proxy from the environment, no cookies, the body capped at ``MAX_BYTES``, the whole request
bounded by the caller's timeout (raised as :class:`TimeoutError`). It never blocks the event
loop. The URL is the operator's own configuration, not a peer's input, so it is not screened
like the x5u fetcher's.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import aiohttp

MAX_BYTES = 64 * 1024


class LookupError_(Exception):
    """The endpoint answered something other than a small JSON 200."""


class JsonGetter:
    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                trust_env=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                connector=aiohttp.TCPConnector(limit=100, ttl_dns_cache=60),
                headers={"Accept": "application/json", "User-Agent": "sipguard/1"},
            )
        return self._session

    async def get_json(self, url: str, params: Mapping[str, str], timeout_s: float) -> Any:
        try:
            async with asyncio.timeout(timeout_s):
                return await self._get(url, params)
        except asyncio.TimeoutError:  # noqa: UP041 - aiohttp may raise its own subclass
            raise TimeoutError(f"no answer from {url} within {timeout_s} s") from None

    async def _get(self, url: str, params: Mapping[str, str]) -> Any:
        async with self._client().get(url, params=dict(params), allow_redirects=False) as resp:
            if resp.status != 200:
                raise LookupError_(f"HTTP {resp.status}")
            body = await resp.content.read(MAX_BYTES + 1)
            if len(body) > MAX_BYTES:
                raise LookupError_("answer too large")
            return json.loads(body)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
