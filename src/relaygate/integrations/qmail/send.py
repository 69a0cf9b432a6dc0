"""relay-ctrl-send: tell other hosts' relay-ctrl-udp that this client logged in.

Theory of operation
-------------------
Chained like ``relay-ctrl-allow`` (after the password check, before the POP3
or IMAP server). After the same checks (``$TCPREMOTEIP`` must be an address,
exit 111 otherwise; Courier's ``$AUTHENTICATED``), it sends a request packet
for the client to every host of ``$RELAY_CTRL_REMOTES`` (comma separated;
``ADDRESS``, ``ADDRESS:PORT`` or ``[IPv6]:PORT``) on UDP port
``$RELAY_CTRL_PORT`` (811), and ``execvp``s the rest of its arguments at once:
the sending happens in a background process (detached, so it never becomes
the POP server's zombie), which tries ``$RELAY_CTRL_TRIES`` times (5) and
waits ``$RELAY_CTRL_TIMEOUT`` seconds (1) each time for every remote to
answer, and logs the ones that never did.

The packet is relay-ctrl's designed format (``relayctrl_packet``): REQUEST,
TIMESTAMP, the address (IPv4 or IPv6), ``USER``/``DOMAIN`` as ENV items and,
with ``$RELAY_CTRL_SECRET``, the SHA signature; a remote's answer counts only
when it is a RESPONSE carrying our timestamp (and, with a secret, correctly
signed). ``RELAY_CTRL_PACKET=legacy`` sends relay-ctrl 3.x's bare ASCII
address instead, for receivers still running the C ``relay-ctrl-udp``
(unsigned: the C receiver cannot check anything).
"""

from __future__ import annotations

import os
import sys

from relaygate.addresses import parse_ip
from relaygate.errors import InvalidAddress
from relaygate.integrations.qmail.env import (
    DEFAULT_PORT,
    EXIT_TEMPFAIL,
    Messages,
    client_address,
    courier_authenticated,
    exec_next,
    parse_port,
    parse_uint,
    shown,
    wants_help,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import MutableMapping
    from typing import NoReturn

PROGRAM = "relay-ctrl-send"

#: relay-ctrl's defaults for $RELAY_CTRL_TRIES and $RELAY_CTRL_TIMEOUT (seconds).
DEFAULT_TRIES = 5
DEFAULT_TIMEOUT = 1


def parse_remotes(value: str, port: int, say: Messages) -> list[tuple[str, int]]:
    """$RELAY_CTRL_REMOTES as (canonical address, port) pairs; bad entries are warned."""
    out: list[tuple[str, int]] = []
    for item in value.replace(" ", ",").split(","):
        if not item:
            continue
        host, item_port = item, port
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            if rest.startswith(":") and parse_uint(rest[1:]):
                item_port = int(rest[1:])
        elif item.count(":") == 1:
            host, _, port_text = item.partition(":")
            number = parse_uint(port_text)
            if number is None or not 0 < number < 65536:
                say.warn(f"Could not parse IP '{shown(item)}'.")
                continue
            item_port = number
        try:
            out.append((parse_ip(host), item_port))
        except InvalidAddress:
            say.warn(f"Could not parse IP '{shown(item)}'.")
    return out


def main(argv: list[str] | None = None) -> NoReturn:
    args = sys.argv if argv is None else argv
    wants_help(args, PROGRAM)
    say = Messages(PROGRAM)
    if len(args) < 2:
        say.die(EXIT_TEMPFAIL, "usage: relay-ctrl-send program [args ...]")
    env = os.environ
    ip = client_address(env.get("TCPREMOTEIP"), say)
    remotes = env.get("RELAY_CTRL_REMOTES")
    if remotes is None:
        say.warn("$RELAY_CTRL_REMOTES is not set.")
    elif courier_authenticated(env):
        start_sender(env, ip, remotes, say)
    exec_next(args[1:], say)


def start_sender(env: MutableMapping[str, str], ip: str, remotes: str, say: Messages) -> None:
    """Fork a detached process that sends ``ip`` to the remotes; return at once."""
    port = parse_port(env.get("RELAY_CTRL_PORT"), DEFAULT_PORT)
    tries = parse_uint(env.get("RELAY_CTRL_TRIES") or "") or DEFAULT_TRIES
    timeout = parse_uint(env.get("RELAY_CTRL_TIMEOUT") or "") or DEFAULT_TIMEOUT
    targets = parse_remotes(remotes, port, say)
    if not targets:
        return
    secret = env.get("RELAY_CTRL_SECRET")
    legacy = env.get("RELAY_CTRL_PACKET") == "legacy"
    fields = {name: env[name] for name in ("USER", "DOMAIN") if name in env}
    try:
        pid = os.fork()
    except OSError:
        say.warn("Could not fork.")
        return
    if pid:
        os.waitpid(pid, 0)  # the middle process exits at once: nothing to wait for
        return
    # middle process: fork again so the sender is adopted by init, not the POP server
    code = 0
    try:
        if os.fork() == 0:
            _detach_stdio()
            code = send(ip, targets, tries=tries, timeout=timeout, fields=fields,
                        secret=os.fsencode(secret) if secret else None, legacy=legacy, say=say)
    except BaseException:  # a forked child must never return into main()
        code = EXIT_TEMPFAIL
    finally:
        os._exit(code)


def _detach_stdio() -> None:
    # The client connection is on 0 and 1: do not keep it open while retrying.
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    if null > 1:
        os.close(null)


def send(
    ip: str,
    targets: list[tuple[str, int]],
    *,
    tries: int,
    timeout: float,
    fields: dict[str, str],
    secret: bytes | None,
    legacy: bool,
    say: Messages,
) -> int:
    """Send until every target answered or the tries are used up; 0, or 111 if any never did."""
    import select
    import socket
    import time

    from relaygate.protocols import relayctrl_packet as rp

    if legacy:
        packet = ip.encode("ascii")
        if secret is not None:
            say.warn("RELAY_CTRL_PACKET=legacy cannot be signed: sending unsigned")
    else:
        try:
            packet = rp.encode_request(ip, now=time.time(), env=fields, secret=secret)
        except (rp.PacketError, UnicodeEncodeError) as exc:
            say.warn(f"Failed to build packet data: {exc}")
            return EXIT_TEMPFAIL
    stamp = None if legacy else rp.decode(packet).timestamp

    def answered(data: bytes) -> bool:
        if legacy:
            return len(data) == 1
        try:
            answer = rp.decode(data)
        except (rp.PacketError, InvalidAddress):
            return False
        if not answer.response or answer.timestamp != stamp:
            return False
        return secret is None or rp.verify(answer, secret)

    socks: dict[int, socket.socket] = {}
    for host, _ in targets:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        if family not in socks:
            s = socket.socket(family, socket.SOCK_DGRAM)
            s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
            socks[family] = s
    pending = set(targets)
    for _ in range(tries):
        for host, port in sorted(pending):
            s = socks[socket.AF_INET6 if ":" in host else socket.AF_INET]
            try:
                s.sendto(packet, (host, port))
            except OSError:
                say.warn(f"Sending IP to '{host}' failed.")
        deadline = time.monotonic() + timeout
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, _, _ = select.select(list(socks.values()), [], [], left)
            for s in ready:
                try:
                    data, addr = s.recvfrom(rp.MAX_PACKET + 1)
                    peer = (parse_ip(addr[0]), int(addr[1]))
                except (OSError, InvalidAddress):
                    continue
                if peer in pending and answered(data):
                    pending.discard(peer)
        if not pending:
            break
    for host, _ in sorted(pending):
        say.warn(f"Timed out waiting for response from '{host}'.")
    for s in socks.values():
        s.close()
    return EXIT_TEMPFAIL if pending else 0


if __name__ == "__main__":  # pragma: no cover - the installed script calls main()
    main()
