"""A client's failures (TLS setup, resets) are info lines without a traceback."""

from __future__ import annotations

import logging
import socket
import struct
from pathlib import Path

import pytest
from test_smtp_support import STRANGER_IP, RawClient, SmtpHarness, tls_files


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.parametrize("how", ["garbage", "close", "reset"])
def test_starttls_failures_are_info_lines(tmp_path: Path, how: str) -> None:
    tls, _ = tls_files(tmp_path)
    h = SmtpHarness(tmp_path, tls=tls)
    records = Records()
    logger = logging.getLogger("relaygate")
    level = logger.level
    logger.addHandler(records)
    logger.setLevel(logging.DEBUG)
    try:
        r = RawClient("127.0.0.1", h.port(), STRANGER_IP)
        r.cmd("EHLO client.example")
        assert r.cmd("STARTTLS").startswith("220")
        if how == "garbage":
            r.send(b"\x16\x03\x01garbage" * 10)
            assert r.closed()
        elif how == "reset":
            r.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        r.close()
        assert h.wait_for(lambda: any("TLS handshake failed" in x.getMessage()
                                      for x in records.records))
    finally:
        h.stop()
        logger.removeHandler(records)
        logger.setLevel(level)
    assert [x.getMessage() for x in records.records if x.exc_info] == []
    assert [x.getMessage() for x in records.records if x.levelno >= logging.WARNING] == []
