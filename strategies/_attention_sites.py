"""Helpers shared by the self-attention editing strategies (region_mask, kv_bank)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from attnctl.errors import ConfigError, RunError
from attnctl.selectors import select_sites
from attnctl.sites import Site, SiteTable

if TYPE_CHECKING:
    from attnctl.call import AttentionCall


def self_attention_sites(selector: str, sites: SiteTable, where: str) -> list[Site]:
    """Resolve ``selector`` and refuse sites without an img>img block (a UNet's cross-attention: its
    keys are text tokens, not a grid); a transformer's joint sites have one."""
    picked = select_sites(selector, sites)
    cross = [s.key for s in picked if "img>img" not in s.blocks]
    if cross:
        raise ConfigError(
            f"{where}.sites='{selector}' selects cross-attention site(s) {', '.join(cross)}; this strategy "
            "edits self-attention over image tokens only; select self sites, e.g. 'self[2:7]'"
        )
    return picked


def grid_tokens(call: AttentionCall) -> int:
    """H*W of the call's site; checks that the module's own keys are exactly those tokens."""
    h, w = call.state.grid(call.site)
    if call.num_own_keys != h * w or call.query.shape[-2] != h * w:
        raise RunError(
            f"{call.site.key}: expected {h}x{w}={h * w} image tokens for queries and own keys, got "
            f"{call.query.shape[-2]} queries and {call.num_own_keys} keys; is this a self-attention site?"
        )
    return h * w
