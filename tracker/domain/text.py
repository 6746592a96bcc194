"""Text from outside that is stored: what PostgreSQL cannot keep never gets that far.

PostgreSQL's text and jsonb refuse NUL (and a lone surrogate cannot even be encoded), and control
characters in an identifier or a code are never what a shopper typed or a network meant. Values we
decide on are refused with a 400 when they carry them (`has_control`); values kept as evidence (a
URL parameter's decoded value) keep their text with each such character replaced (`without_control`).
"""
from __future__ import annotations

import re

# C0 controls, DEL, C1 controls, and lone surrogates (which only arrive through escapes).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
REPLACEMENT = "\ufffd"


def has_control(text: str) -> bool:
    return _CONTROL.search(text) is not None


def without_control(text: str) -> str:
    return _CONTROL.sub(REPLACEMENT, text)
