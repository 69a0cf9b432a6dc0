"""relay-ctrl-udp: receive relay windows opened on other hosts, over UDP.

Theory of operation
-------------------
A long-running receiver (run it under daemontools' ``supervise``) for the
packets ``relay-ctrl-send`` sends after a login on another POP/IMAP host. It
binds ``$RELAY_CTRL_BIND`` (default ``0.0.0.0``; ``::`` for IPv6 and IPv4)
port ``$RELAY_CTRL_PORT`` (default 811) and, for each acceptable request,
opens a window in the store (the spool ``$RELAY_CTRL_DIR`` or
``$RELAY_CTRL_DIR_FD``, or ``$RELAYGATE_STORE``) and answers.

Packets are relay-ctrl's format (``relaygate.protocols.relayctrl_packet``).
With ``$RELAY_CTRL_SECRET`` set, a packet is refused, logged and not answered
when it is unsigned, badly signed, older than 60 s (or as far in the future),
or a replay of one already seen. Without a secret, relay-ctrl 3.x senders'
bare ASCII addresses are accepted too (answered with one byte, as relay-ctrl
does), as are unsigned requests; that mode trusts the network, so set
``$RELAY_CTRL_SENDERS`` (addresses allowed to send) or firewall the port.

Only ``USER`` and ``DOMAIN`` ENV items are recorded; other names are logged
and ignored, as ``relay-ctrl-check`` does with spool files.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, MutableMapping

from relaygate.addresses import parse_ip
from relaygate.errors import ConfigError, InvalidAddress, StoreError
from relaygate.grants import Grant
from relaygate.integrations.qmail.env import (
    EXIT_TEMPFAIL,
    EXPORTED,
    Messages,
    expiry_from_env,
    open_store_from_env,
    parse_port,
    shown,
    wants_help,
)
from relaygate.protocols import relayctrl_packet as rp
from relaygate.stores.base import GrantStore

PROGRAM = "relay-ctrl-udp"

#: relay-ctrl binds every IPv4 address.
DEFAULT_BIND = "0.0.0.0"
#: Where grants received over UDP say they came from (SQLite/Redis keep it).
SOURCE = "udp"


def parse_senders(value: str | None) -> frozenset[str] | None:
    """$RELAY_CTRL_SENDERS: comma/space separated addresses, or None (anyone)."""
    if not value:
        return None
    out = set()
    for item in value.replace(",", " ").split():
        try:
            out.add(parse_ip(item))
        except InvalidAddress:
            raise ConfigError("bad address in $RELAY_CTRL_SENDERS", value=item) from None
    return frozenset(out)


class Receiver:
    """The receiver's decisions, without sockets: bytes and a peer in, an answer out."""

    def __init__(
        self,
        store: GrantStore,
        *,
        expiry: float,
        secret: bytes | None,
        say: Messages,
        senders: frozenset[str] | None = None,
        log_ips: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.expiry = expiry
        self.secret = secret
        self.say = say
        self.senders = senders
        self.log_ips = log_ips
        self.clock = clock
        self.guard = rp.ReplayGuard()

    def refuse(self, peer: str, why: str) -> None:
        self.say.warn(f"refused packet from {peer}: {why}")

    def handle(self, data: bytes, peer: str) -> bytes | None:
        """The answer to send back to ``peer``, or None (refused, logged)."""
        if self.senders is not None and peer not in self.senders:
            self.refuse(peer, "sender not in $RELAY_CTRL_SENDERS")
            return None
        if len(data) > rp.MAX_PACKET:
            self.refuse(peer, f"longer than {rp.MAX_PACKET} bytes")
            return None
        if rp.is_legacy(data):
            return self._legacy(data, peer)
        try:
            packet = rp.decode(data)
        except (rp.PacketError, InvalidAddress) as exc:
            self.refuse(peer, f"malformed: {exc}")
            return None
        if packet.response or packet.address is None:
            self.refuse(peer, "not a request")
            return None
        now = self.clock()
        if self.secret is not None:
            if not packet.signed:
                self.refuse(peer, "unsigned (this receiver requires $RELAY_CTRL_SECRET)")
                return None
            if not rp.verify(packet, self.secret):
                self.refuse(peer, "bad signature")
                return None
            why = self.guard.check(packet, now)
            if why is not None:
                self.refuse(peer, why)
                return None
        ignored = [shown(name) for name, _ in packet.env if name not in EXPORTED]
        if ignored:
            self.say.warn(f"packet from {peer} also sets {', '.join(ignored)}: ignored")
        if not self._grant(packet.address, packet.env_value("USER"),
                           packet.env_value("DOMAIN"), now, peer):
            return None
        return rp.encode_response(packet.timestamp, self.secret)

    def _legacy(self, data: bytes, peer: str) -> bytes | None:
        if self.secret is not None:
            self.refuse(peer, "unsigned relay-ctrl 3.x packet (a secret is configured)")
            return None
        try:
            ip = rp.decode_legacy(data)
        except rp.PacketError:
            self.say.warn(f"Invalid IP from '{peer}'.")
            return None
        if not self._grant(ip, None, None, self.clock(), peer):
            return None
        return rp.LEGACY_ACK

    def _grant(self, ip: str, user: str | None, domain: str | None, now: float,
               peer: str) -> bool:
        try:
            self.store.put(Grant.opening(ip, user, domain, SOURCE, now, self.expiry))
        except (StoreError, ValueError) as exc:
            self.say.warn(f"Could not touch '{ip}': {exc}")
            return False
        if self.log_ips:
            self.say.msg(f"IP {ip} allowed to relay (from {peer})")
        return True


def secret_from(env: MutableMapping[str, str]) -> bytes | None:
    """$RELAY_CTRL_SECRET as bytes (any bytes an envdir file can hold), or None."""
    value = env.get("RELAY_CTRL_SECRET")
    return os.fsencode(value) if value else None


def main(argv: list[str] | None = None) -> None:
    args = sys.argv if argv is None else argv
    wants_help(args, PROGRAM)
    say = Messages(PROGRAM, show_pid=False)
    env = os.environ
    try:
        expiry = expiry_from_env(env)
    except ValueError as exc:
        say.die(EXIT_TEMPFAIL, str(exc))
    try:
        choice = open_store_from_env(env, expiry, say)
        senders = parse_senders(env.get("RELAY_CTRL_SENDERS"))
    except (StoreError, ConfigError) as exc:
        say.die(EXIT_TEMPFAIL, str(exc))
    if choice is None:
        raise SystemExit(EXIT_TEMPFAIL)
    receiver = Receiver(choice.store, expiry=expiry, secret=secret_from(env), say=say,
                        senders=senders, log_ips="RELAY_CTRL_LOG_IPS" in env)
    serve(receiver, env.get("RELAY_CTRL_BIND") or DEFAULT_BIND,
          parse_port(env.get("RELAY_CTRL_PORT")), say)


def serve(receiver: Receiver, bind: str, port: int, say: Messages) -> None:
    """Receive forever on ``bind``:``port`` (SIGTERM ends the process)."""
    import socket

    try:
        host = parse_ip(bind)
    except InvalidAddress:
        say.die(EXIT_TEMPFAIL, f"$RELAY_CTRL_BIND is not an address: '{shown(bind)}'")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6 and host == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 too
        sock.bind((host, port))
    except OSError as exc:
        say.die(EXIT_TEMPFAIL, f"Could not bind socket: {exc.strerror}")
    bound = sock.getsockname()[1]
    mode = "signed packets only" if receiver.secret is not None else "no secret: unsigned"
    say.msg(f"listening on {host} port {bound} ({mode})")
    while True:
        try:
            data, addr = sock.recvfrom(rp.MAX_PACKET + 1)
        except InterruptedError:
            continue
        except OSError as exc:
            say.warn(f"receive failed: {exc.strerror}")
            continue
        try:
            peer = parse_ip(addr[0])
        except InvalidAddress:
            continue
        reply = receiver.handle(data, peer)
        if reply is not None:
            try:
                sock.sendto(reply, addr)
            except OSError as exc:
                say.warn(f"could not answer {peer}: {exc.strerror}")


if __name__ == "__main__":  # pragma: no cover - the installed script calls main()
    main()
