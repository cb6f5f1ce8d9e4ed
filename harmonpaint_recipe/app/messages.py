"""The status box of the page: errors as one readable line, never a stack trace.

Errors that attnctl raises on purpose (``AttnctlError``: bad input, bad recipe value)
are shown as they are, since their messages name the input and the fix. Anything else
is a bug: the page names the exception type and points at the server log, which gets
the full traceback.
"""

from __future__ import annotations

import html
import logging
from typing import Sequence

from attnctl.errors import AttnctlError

log = logging.getLogger("attnctl.app")


def error_html(exc: BaseException) -> str:
    """The status box for a failed action."""
    if isinstance(exc, AttnctlError):
        text = str(exc)
    else:
        log.error("unexpected error in the app", exc_info=exc)
        text = f"internal error ({type(exc).__name__}: {exc}); the server log has the details"
    return f'<div class="attnctl-status attnctl-error" role="alert"><b>Cannot run:</b> {html.escape(text)}</div>'


def done_html(summary: str, notes: Sequence[str] = ()) -> str:
    """The status box after a successful run, with input notes (crops, resizes) below."""
    items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return (f'<div class="attnctl-status attnctl-done">{html.escape(summary)}'
            + (f"<ul>{items}</ul>" if items else "") + "</div>")
