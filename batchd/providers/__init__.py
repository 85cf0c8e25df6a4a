"""Provider adapters: thin layers over the official SDKs."""

from __future__ import annotations

import contextlib

from ..settings import ProviderProfile, resolve_api_key
from .base import Provider, ProviderError, RemoteBatch


class MissingAPIKey(ProviderError):
    """A profile is used but no API key was configured for it."""


def make_provider(name: str, profile: ProviderProfile) -> Provider:
    """The adapter for a profile; raises MissingAPIKey when the profile has no key."""
    api_key = resolve_api_key(name, profile)
    if not api_key:
        source = profile.api_key_env or "api_key"
        raise MissingAPIKey(f"provider {name!r} has no API key (set {source} or a credential)", retryable=True)
    if profile.kind == "openai":
        from .openai import OpenAIProvider

        return OpenAIProvider(
            name, api_key, profile.base_url, profile.request_timeout, completion_window=profile.completion_window
        )
    from .anthropic import AnthropicProvider

    return AnthropicProvider(name, api_key, profile.base_url, profile.request_timeout)


class ProviderPool:
    """One adapter per profile, made on first use and closed together."""

    def __init__(self, profiles: dict[str, ProviderProfile]) -> None:
        self._profiles = profiles
        self._made: dict[str, Provider] = {}

    def prepare(self) -> None:
        """Make every adapter whose key is there, now (at start-up, before READY). The first one of a
        kind imports its SDK, most of a second of CPU: made on first use instead, during a large
        ingest, it held the event loop that long (the first batch of the watchdog test, 0.9 s)."""
        for name in self._profiles:
            # A missing key, or a base_url the SDK refuses, is raised again when the profile is first
            # used, and reported there as before (/readyz names it too): start-up only warms up.
            with contextlib.suppress(Exception):
                self.get(name)

    def get(self, name: str) -> Provider:
        if name not in self._made:
            self._made[name] = make_provider(name, self._profiles[name])
        return self._made[name]

    async def close(self) -> None:
        for provider in self._made.values():
            await provider.close()
        self._made.clear()


__all__ = ["MissingAPIKey", "Provider", "ProviderError", "ProviderPool", "RemoteBatch", "make_provider"]
