"""``--help`` for the qmail chain programs: one manual page each.

Imported only when ``--help`` is the first argument, so the text costs the
per-connection programs nothing. Keep each page in step with its module.
"""

from __future__ import annotations

_COMMON_STORE = """\
  RELAY_CTRL_DIR      The spool directory (relay-ctrl 3.x layout: one file per
                      address, shared with the C programs during a migration).
  RELAY_CTRL_DIR_FD   An open descriptor of that directory, handed down by
                      relay-ctrl-chdir; used instead of the path when set.
  RELAYGATE_STORE     relaygate only: use another grant store instead of the
                      spool: sqlite:///PATH, redis://HOST:PORT/DB, spool:///DIR.
  RELAY_CTRL_EXPIRY   Seconds a window stays open after the login: a plain
                      positive integer up to 31536000 (one year); default 900
                      when unset. Anything else (1e3, 30s, abc, -5, 0, a huge
                      number) is a configuration error, logged with the value:
                      relay-ctrl-check then treats every window as closed and
                      relay-ctrl-allow records nothing (both still run program);
                      relay-ctrl-age and relay-ctrl-udp exit 111.
"""

PAGES: dict[str, str] = {
    "relay-ctrl-check": f"""\
NAME
  relay-ctrl-check - let a client whose relay window is open relay (qmail-smtpd)

SYNOPSIS
  relay-ctrl-check program [arguments ...]
  e.g.  tcpserver -x smtp.cdb 0 smtp relay-ctrl-check qmail-smtpd

DESCRIPTION
  Unless $RELAYCLIENT is already set (a tcprules line), looks $TCPREMOTEIP up
  in the grant store. If the client logged in (relay-ctrl-allow) less than
  $RELAY_CTRL_EXPIRY seconds ago, sets RELAYCLIENT=$RELAY_CTRL_RELAYCLIENT and
  exports the USER and DOMAIN recorded with the window; an expired spool file
  is removed. Then executes program with its arguments.

  Differences from relay-ctrl 3.x, on purpose:
  - IPv6 clients are looked up (::ffff:a.b.c.d is folded to a.b.c.d);
  - $TCPREMOTEIP that is not an address (e.g. ../x) is refused before any
    file is opened;
  - only USER and DOMAIN are exported from a spool file; any other NAME=VALUE
    in it (LD_PRELOAD, QMAILQUEUE, RELAYCLIENT ...) is ignored and logged;
  - if the store cannot be read, RELAYCLIENT is not set (fail closed), a
    warning is logged and program still runs (local mail still arrives).

ENVIRONMENT
  TCPREMOTEIP         The client address (set by tcpserver).
  RELAYCLIENT         If set on entry, nothing is looked up. Set on exit when
                      the client may relay (qmail-smtpd appends it to every
                      recipient; empty means plain relaying).
  RELAY_CTRL_RELAYCLIENT
                      The value given to $RELAYCLIENT (default empty).
{_COMMON_STORE}\
  RELAY_CTRL_LOG_IPS  If set, log each lookup, e.g.
                      relay-ctrl-check[PID]: IP 1.2.3.4 found, setting $RELAYCLIENT
  RELAY_CTRL_LOG_ENV  If set, log each variable exported (Setting USER=alice).
  USER, DOMAIN        Set on exit from the window's record.

DESCRIPTORS
  None used; all are passed on to program unchanged, except
  $RELAY_CTRL_DIR_FD, which is closed before program runs.

EXIT CODES
  That of program. 1: no program given. 111: program could not be executed.

SEE ALSO
  relay-ctrl-allow, relay-ctrl-chdir, relay-ctrl-age, relaygate tcpserver,
  qmail-smtpd(8), tcpserver(1), docs/qmail.md
""",
    "relay-ctrl-allow": f"""\
NAME
  relay-ctrl-allow - open a relay window for the client that just logged in

SYNOPSIS
  relay-ctrl-allow [program [arguments ...]]
  e.g.  qmail-popup HOST checkpassword relay-ctrl-allow qmail-pop3d Maildir

DESCRIPTION
  Records $TCPREMOTEIP in the grant store with $USER and $DOMAIN, then
  executes program (with no program, exits 0). In the spool the record is a
  file named after the address holding USER=<v>\\0DOMAIN=<v>\\0, written to
  a temporary .<sec>.<usec>:<pid> file and renamed into place, mode 0600
  (0666 when the directory came as $RELAY_CTRL_DIR_FD): byte-compatible with
  relay-ctrl 3.x.

  Under Courier ($AUTHUSER and $AUTHARGV0 set) the window is opened only if
  $AUTHENTICATED is non-empty; otherwise the caller (checkpassword) runs
  relay-ctrl-allow only after a successful login. A failure to record the
  window is logged and the login still proceeds.

  Unlike relay-ctrl 3.x, IPv6 clients can open windows too. Python programs
  cannot be setuid: give the POP server access to the spool with
  relay-ctrl-chdir (see docs/qmail.md, "Secure deployment").

ENVIRONMENT
  TCPREMOTEIP         The client address (set by tcpserver); required.
  USER, DOMAIN        Recorded with the window (each only when set).
  AUTHUSER, AUTHARGV0, AUTHENTICATED
                      Courier: see above.
{_COMMON_STORE}\
  RELAY_CTRL_LOG_IPS  If set, log each window opened.

DESCRIPTORS
  None used; all are passed on to program unchanged, except
  $RELAY_CTRL_DIR_FD, which is closed before program runs.

EXIT CODES
  That of program; 0 without one. 111: $TCPREMOTEIP missing or not an
  address, or program could not be executed.

SEE ALSO
  relay-ctrl-check, relay-ctrl-send, relay-ctrl-chdir, qmail-pop3d(8)
""",
    "relay-ctrl-age": f"""\
NAME
  relay-ctrl-age - remove expired relay windows

SYNOPSIS
  relay-ctrl-age
  e.g. in crontab:  * * * * * envdir /etc/relay-ctrl relay-ctrl-age

DESCRIPTION
  Deletes every entry of the spool whose modification time is more than
  $RELAY_CTRL_EXPIRY seconds ago, including leftover temporary files. With
  $RELAYGATE_STORE, ages that store instead. Prints nothing on success.

ENVIRONMENT
{_COMMON_STORE}\
  RELAY_CTRL_LOG_IPS  If set, say how many windows were removed.

DESCRIPTORS
  None.

EXIT CODES
  0: done. 1: $RELAY_CTRL_DIR not set, or the store could not be reached.
  111: $RELAY_CTRL_EXPIRY is not a plain positive integer.

SEE ALSO
  relay-ctrl-allow, relay-ctrl-check, relaygate age
""",
    "relay-ctrl-chdir": """\
NAME
  relay-ctrl-chdir - hand the spool directory down as a descriptor

SYNOPSIS
  relay-ctrl-chdir program [arguments ...]
  e.g.  relay-ctrl-chdir tcpserver -u 7791 -g 2108 0 smtp \\
            relay-ctrl-check qmail-smtpd

DESCRIPTION
  Opens $RELAY_CTRL_DIR, moves the descriptor to the highest free number at
  or below 255, exports that number as $RELAY_CTRL_DIR_FD and executes
  program. Run it as root before privileges are dropped: the later programs
  (relay-ctrl-allow, relay-ctrl-check, relay-ctrl-udp) then use the
  directory through the descriptor, so the spool's parent can stay mode 0700
  and no directory needs to be world-writable. Warns when the directory is
  world-writable.

ENVIRONMENT
  RELAY_CTRL_DIR      The spool directory; required.
  RELAY_CTRL_DIR_FD   Set on exit to the descriptor number.

DESCRIPTORS
  Adds the directory descriptor; all others are passed on unchanged.

EXIT CODES
  That of program. 1: no program given. 111: $RELAY_CTRL_DIR not set, not a
  directory or not openable, or program could not be executed.

SEE ALSO
  relay-ctrl-allow, relay-ctrl-check, docs/qmail.md ("Secure deployment")
""",
    "relay-ctrl-send": """\
NAME
  relay-ctrl-send - tell other hosts' relay-ctrl-udp that a client logged in

SYNOPSIS
  relay-ctrl-send program [arguments ...]
  e.g.  qmail-popup HOST checkpassword relay-ctrl-allow relay-ctrl-send \\
            qmail-pop3d Maildir

DESCRIPTION
  After the same checks as relay-ctrl-allow, sends a request for
  $TCPREMOTEIP (with $USER and $DOMAIN) to every host in
  $RELAY_CTRL_REMOTES, from a detached background process, and executes
  program at once. The background process sends up to $RELAY_CTRL_TRIES
  times, waiting $RELAY_CTRL_TIMEOUT seconds each time for every remote's
  answer, and logs the remotes that never answered.

  Packets follow relay-ctrl's packet.html (version 1; REQUEST, TIMESTAMP,
  IPV4 or IPV6, ENV, SHA items). With $RELAY_CTRL_SECRET they are signed:
  SHA-256 over the packet followed by the secret.

ENVIRONMENT
  TCPREMOTEIP         The client address; required.
  USER, DOMAIN        Sent as ENV items.
  AUTHUSER, AUTHARGV0, AUTHENTICATED
                      Courier: send only when $AUTHENTICATED is non-empty.
  RELAY_CTRL_REMOTES  Receivers: ADDRESS, ADDRESS:PORT or [IPv6]:PORT,
                      comma separated. Nothing is sent when unset.
  RELAY_CTRL_PORT     UDP port (default 811).
  RELAY_CTRL_TRIES    Attempts (default 5).
  RELAY_CTRL_TIMEOUT  Seconds to wait per attempt (default 1).
  RELAY_CTRL_SECRET   Shared secret; the receivers must have the same one.
  RELAY_CTRL_PACKET   "legacy": send relay-ctrl 3.x's bare ASCII address (for
                      C receivers; unsigned).

DESCRIPTORS
  All are passed on to program. The background sender keeps only standard
  error (0 and 1 are the client connection; it lets go of them).

EXIT CODES
  That of program. 111: no program, $TCPREMOTEIP missing or not an address,
  or program could not be executed.

SEE ALSO
  relay-ctrl-udp, relay-ctrl-allow
""",
    "relay-ctrl-udp": f"""\
NAME
  relay-ctrl-udp - receive relay windows from relay-ctrl-send over UDP

SYNOPSIS
  relay-ctrl-udp
  e.g. under supervise:  exec envdir /etc/relay-ctrl relay-ctrl-udp

DESCRIPTION
  Listens on UDP $RELAY_CTRL_BIND port $RELAY_CTRL_PORT and opens a relay
  window for the address in each acceptable request, recording the USER and
  DOMAIN it carries (other ENV names are logged and ignored), then answers
  with a RESPONSE packet carrying the request's timestamp.

  With $RELAY_CTRL_SECRET set, unsigned packets, badly signed packets, and
  replays (a timestamp more than 60 seconds old or ahead, or a packet seen
  before) are refused, logged and not answered. Without a secret it also
  accepts relay-ctrl 3.x's bare ASCII address (answered with one byte) and
  unsigned requests: restrict the senders ($RELAY_CTRL_SENDERS) or firewall
  the port.

ENVIRONMENT
{_COMMON_STORE}\
  RELAY_CTRL_PORT     UDP port (default 811).
  RELAY_CTRL_BIND     Local address to listen on (default 0.0.0.0; :: for
                      IPv6 and IPv4).
  RELAY_CTRL_SECRET   Shared secret (see above).
  RELAY_CTRL_SENDERS  If set: the only source addresses accepted (comma or
                      space separated).
  RELAY_CTRL_LOG_IPS  If set, log each window opened.

DESCRIPTORS
  None used.

EXIT CODES
  Runs until killed. 111: no store configured, the port cannot be bound, or
  $RELAY_CTRL_EXPIRY is not a plain positive integer.

SEE ALSO
  relay-ctrl-send, relay-ctrl-check
""",
}


def page(program: str) -> str:
    """The manual page of ``program`` (a relay-ctrl-* name)."""
    return PAGES[program]
