"""Rule `rate` (being written)."""

from __future__ import annotations

from sipguard.policy.settings import RuleSettings


class Settings(RuleSettings):
    """Parameters of rule `rate`."""


def build(settings: Settings, ctx: object, peer: object) -> None:
    """Not written yet: the rule is accepted in the config and does nothing."""
    return None
