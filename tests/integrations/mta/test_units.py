"""The shipped systemd unit's command line runs (binary, store and listener swapped for
the test's)."""

from __future__ import annotations

import re
import shlex
import signal
from pathlib import Path

from .mta_support import DEPLOY, free_port, start_relaygate


def test_socketmap_unit_command_line(tmp_path: Path) -> None:
    unit = (DEPLOY / "sendmail" / "relaygate-socketmap.service").read_text()
    m = re.search(r"^ExecStart=(.*)$", unit, re.MULTILINE)
    assert m is not None
    argv = shlex.split(m.group(1))
    assert argv[0].endswith("/relaygate") and "socketmap" in argv
    port = free_port()
    args = [a.replace("sqlite:///var/lib/relaygate/shared/grants.db",
                      f"sqlite://{tmp_path / 'g.db'}").replace("127.0.0.1:10041",
                                                               f"127.0.0.1:{port}")
            for a in argv[1:]]
    daemon = start_relaygate(args, tmp_path / "unit.err", port=port)
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(30) == 0, daemon.text()
