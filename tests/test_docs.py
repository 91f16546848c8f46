"""The documents: they render, and the protocol contract names everything the code sends."""

from __future__ import annotations

from pathlib import Path

import docutils.core
import pytest

from app.connection import CLOSE_GOING_AWAY, CLOSE_POLICY, CLOSE_TRY_AGAIN_LATER
from app.errors import ERROR_CODES
from app.protocol import OPS

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL = (ROOT / "docs" / "protocol.rst").read_text()


@pytest.mark.parametrize(
    "path", ["README.rst", *sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("docs/*.rst"))]
)
def test_document_renders_without_warnings(path):
    """Each reStructuredText document renders with no warning or error."""
    docutils.core.publish_string(
        (ROOT / path).read_text(),
        writer="null",
        settings_overrides={"halt_level": 2, "report_level": 5},
    )


def test_protocol_documents_every_op():
    """docs/protocol.rst documents every op the server parses."""
    for op in OPS:
        assert f"``{op}``" in PROTOCOL or f'"op": "{op}"' in PROTOCOL, op


def test_protocol_documents_every_client_facing_error_code():
    """docs/protocol.rst names every error code a client may see."""
    internal = {"CONFIG_ERROR", "ACTOR_STALLED"}
    for code in sorted(ERROR_CODES - internal):
        assert code in PROTOCOL, code


def test_protocol_documents_every_close_code():
    """docs/protocol.rst explains every close code the server uses."""
    for code in (CLOSE_GOING_AWAY, CLOSE_POLICY, 1009, CLOSE_TRY_AGAIN_LATER):
        assert str(code) in PROTOCOL, code
