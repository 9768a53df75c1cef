"""How the app's handlers turn errors into page messages: one line each, never a stack trace in the page.

Library errors (ValueError) are the user's input: ``user_error`` shows their message alone. Anything else
(out of memory, I/O) is ``failure``: one line in the page, the traceback in the server log.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import gradio as gr

log = logging.getLogger(__name__)


def user_error(message: str) -> gr.Error:
    """A page error for bad input: the message alone, no server-side traceback (nothing went wrong)."""
    return gr.Error(message.splitlines()[0] if message else "invalid input", print_exception=False)


def failure(what: str, e: Exception) -> gr.Error:
    """An unexpected error (out of memory, I/O): one line in the page, the traceback in the server log."""
    log.exception("%s failed", what)
    detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return gr.Error(f"{what} failed: {type(e).__name__}: {detail}", print_exception=False)


@contextlib.contextmanager
def shown_in_page(what: str) -> Iterator[None]:
    """Around a library call: its ValueError becomes ``user_error``, any other error ``failure(what, e)``."""
    try:
        yield
    except ValueError as e:
        raise user_error(str(e)) from None
    except Exception as e:
        raise failure(what, e) from None
