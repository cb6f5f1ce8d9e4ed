"""Site selectors: the small syntax recipes use to pick sites.

Grammar (whitespace ignored)::

    selector := term ("," term)*                 union of the terms
    term     := kind ["@" stage] ["/" factor] ["[" index "]"] [":" block]
    kind     := "self" | "cross" | "joint" | "single" | "*"
    stage    := "down" | "mid" | "up" | "joint" | "single" | preset   (a model's named site set)
    factor   := 1 | 2 | 4 | 8 ...                grid = latent / factor
    index    := i | start:stop | i,j,k           Python indexing, negatives count from the end
    block    := ("img" | "txt") ">" ("img" | "txt")

Filters apply left to right: kind, then stage, then grid factor, then block, then the index
over the sites that are left, in execution order. Examples:

    self[2:7]        self-attention sites 2..6
    self[-8:]        the last 8 self-attention sites
    cross/4,cross/2  cross-attention sites whose grid is latent/4 or latent/2
    self@up          every self-attention site in the up blocks
    *@mid            every attention site of the mid block

On a diffusion transformer (``attnctl.backbones``) sites are ``joint`` (dual-stream
blocks), ``single`` (single-stream blocks) or ``self`` (image-only attention, SD3.5's
``attn2``), and ``self`` / ``cross`` also pick every site holding an img>img / img>txt
block, so a UNet recipe's selectors resolve there too (with another meaning of depth):

    joint[0:10]:img>txt      the first ten dual-stream sites (that hold an img>txt block)
    *[0,1,17,18,25,28]       sites by their place in execution order (published layer lists)
    single[-8:]              the last eight single-stream sites
    *@vital                  a model's named site set (FLUX: Stable Flow's vital layers)

A term that matches no site is an error (with the list of available sites), never a
silent no-op. A YAML list of selectors is the union of its items.
"""

from __future__ import annotations

import re
from typing import Iterable

from attnctl.errors import SelectorError
from attnctl.sites import Site, SiteTable

_TERM_RE = re.compile(
    r"^(?P<kind>self|cross|joint|single|\*)"
    r"(?:@(?P<stage>[a-z_]+))?"
    r"(?:/(?P<factor>\d+))?"
    r"(?:\[(?P<index>-?\d*(?::-?\d*)?|-?\d+(?:,-?\d+)+)\])?"
    r"(?::(?P<block>(?:img|txt)>(?:img|txt)))?$"
)


#: the stages a selector's ``@`` filter knows (a model may name more site sets: ``SiteTable.presets``)
STAGES = ("down", "mid", "up", "joint", "single")


def _parse_index(text: str, term: str) -> slice | int | list[int]:
    if "," in text:
        return [int(i) for i in text.split(",")]
    if ":" not in text:
        if text in ("", "-"):
            raise SelectorError(f"selector term '{term}': empty index; write e.g. '[3]' or '[2:7]'")
        return int(text)
    start, stop = text.split(":", 1)
    try:
        return slice(int(start) if start else None, int(stop) if stop else None)
    except ValueError:
        raise SelectorError(f"selector term '{term}': bad slice '[{text}]'; write e.g. '[2:7]' or '[-8:]'") from None


def _resolve_term(term: str, sites: SiteTable) -> list[Site]:
    m = _TERM_RE.match(term)
    if m is None:
        raise SelectorError(
            f"cannot parse selector term '{term}'; expected kind[@stage][/factor][[index]][:block], "
            "e.g. 'self[2:7]', 'self[-8:]', 'cross/4', 'self@up', 'joint[0,1,17]', 'joint[0:10]:img>txt'"
        )
    chosen = [s for s in sites if s.acts_as(m["kind"])]
    if m["stage"] in sites.presets:
        chosen = [s for s in chosen if s.name in sites.presets[m["stage"]]]
    elif m["stage"] in STAGES:
        chosen = [s for s in chosen if s.stage == m["stage"]]
    elif m["stage"]:
        named = ", ".join([*STAGES, *sites.presets])
        raise SelectorError(f"selector term '{term}': '@{m['stage']}' is neither a stage nor a named site set of "
                            f"this model; use one of {named}")
    if m["factor"]:
        factor = int(m["factor"])
        if factor < 1 or factor & (factor - 1):
            raise SelectorError(f"selector term '{term}': grid factor must be a power of two (1, 2, 4, ...)")
        chosen = [s for s in chosen if 2**s.level == factor]
    if m["block"]:
        chosen = [s for s in chosen if m["block"] in s.blocks]
    if m["index"] is not None:
        idx = _parse_index(m["index"], term)
        if isinstance(idx, list):
            outside = [i for i in idx if not -len(chosen) <= i < len(chosen)]
            if outside:
                raise SelectorError(f"selector term '{term}': index {outside[0]} is outside the {len(chosen)} "
                                    "sites left after its filters. Available sites:\n" + sites.format())
            chosen = [chosen[i] for i in idx]
        elif isinstance(idx, int):
            chosen = [chosen[idx]] if -len(chosen) <= idx < len(chosen) else []
        else:
            chosen = chosen[idx]
    if not chosen:
        raise SelectorError(
            f"selector term '{term}' matches no attention site of this model. Available sites:\n"
            + sites.format()
        )
    return chosen


def select_sites(selector: str | Iterable[str], sites: SiteTable) -> list[Site]:
    """Resolve ``selector`` against ``sites``; return the matched sites in table order.

    Raises:
        SelectorError: a term is malformed or matches nothing.
    """
    terms = [selector] if isinstance(selector, str) else list(selector)
    # commas inside brackets belong to an index list
    parts = [p.strip() for t in terms for p in re.split(r",(?![^\[]*\])", str(t).replace(" ", ""))]
    if not any(parts):
        raise SelectorError("empty site selector; write e.g. 'self[2:7]' or 'cross/4,cross/2'")
    picked: set[Site] = set()
    for part in parts:
        if part:
            picked.update(_resolve_term(part, sites))
    return [s for s in sites if s in picked]
