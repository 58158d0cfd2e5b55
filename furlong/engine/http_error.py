"""EngineHTTPError: an engine server answered an error status.

Raised by every caller of an engine server's HTTP API: `HTTPEngine` (client.py) for
generation and control calls, the weight senders (weights/send.py) for weight pushes.
Its message names the URL; `status` is the HTTP status.
"""
from __future__ import annotations


class EngineHTTPError(RuntimeError):
    """The engine server answered an error status."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status
