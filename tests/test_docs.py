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


def _client_texts() -> set[str]:
    """The fixed part of every 4xx text the WebSocket path can answer, read from the code."""
    import ast

    sources = ["app/protocol.py", "app/models.py", "app/ws.py", "app/directory.py",
               "actors/room_writer.py"]  # fmt: skip
    texts = set()
    for source in sources:
        for node in ast.walk(ast.parse((ROOT / source).read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", None)
            if name is None or name.startswith("HTTP"):
                continue  # aiohttp's HTTP refusals happen before any WebSocket frame
            values = [kw.value for kw in node.keywords if kw.arg == "text"]
            if name == "BadFrame" and node.args:
                values.append(node.args[0])
            for value in values:
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    texts.add(value.value)
                elif isinstance(value, ast.JoinedStr):
                    # An f-string: each literal piece must appear in the documented text.
                    texts.update(
                        part.value.strip()
                        for part in value.values
                        if isinstance(part, ast.Constant) and part.value.strip()
                    )
    return texts


def test_protocol_lists_every_4xx_text():
    """docs/protocol.rst lists every fixed text a 4xx reply on the WebSocket can carry."""
    from app.errors import STATUS_TEXTS, AuthFailed, AuthRequired, MessageTooLong

    texts = _client_texts() | {AuthFailed.text, AuthRequired.text, MessageTooLong.text}
    texts |= {text for status, text in STATUS_TEXTS.items() if 400 <= status < 500}
    assert len(texts) > 25
    missing = sorted(text for text in texts if text not in PROTOCOL)
    assert not missing, missing
