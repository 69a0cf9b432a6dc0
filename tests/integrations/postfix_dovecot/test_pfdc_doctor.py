"""``relaygate doctor postfix`` against real postconf and the tests' Postfix configuration."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import _postfix_testbed as testbed
import pytest
from click.testing import CliRunner

from relaygate.cli import main
from relaygate.integrations.postfix_doctor import (
    check_lists,
    normalize_endpoint,
    parse_restrictions,
)

from .pfdc_support import need_program, start_policyd

POLICY = "check_policy_service inet:127.0.0.1:10040"
GOOD_RELAY = f"permit_mynetworks, permit_sasl_authenticated, {POLICY}, reject_unauth_destination"


@pytest.fixture
def postfix_dir(tmp_path: Path) -> Iterator[testbed.PostfixTestbed]:
    need_program("postconf", testbed.POSTCONF)
    pf = testbed.PostfixTestbed(tmp_path, port=10025, relay_restrictions=GOOD_RELAY)
    pf.configure()
    yield pf


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str


def doctor(pf: testbed.PostfixTestbed, *args: str) -> Outcome:
    # In-process (click's runner): a relaygate process per call costs a second here.
    result = CliRunner().invoke(main, ["--store", "memory:", "doctor", "postfix", "-c",
                                       str(pf.etc), *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Outcome(result.exit_code, result.stdout, result.stderr)


def test_good_configuration(postfix_dir: testbed.PostfixTestbed) -> None:
    out = doctor(postfix_dir)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ok: main.cf: smtpd_relay_restrictions: relaygate's policy comes before " \
           "reject_unauth_destination" in out.stdout
    assert "Postfix 3." in out.stdout


def test_missing_policy(postfix_dir: testbed.PostfixTestbed) -> None:
    postfix_dir.set(smtpd_relay_restrictions="permit_mynetworks, reject_unauth_destination",
                    smtpd_client_restrictions=POLICY)
    out = doctor(postfix_dir)
    assert out.returncode == 1
    assert "in neither smtpd_relay_restrictions nor smtpd_recipient_restrictions" in out.stdout
    assert "smtpd_client_restrictions, where OK cannot allow relaying" in out.stdout


def test_policy_after_reject_unauth_destination(postfix_dir: testbed.PostfixTestbed) -> None:
    postfix_dir.set(smtpd_relay_restrictions=f"permit_mynetworks, reject_unauth_destination, "
                                             f"{POLICY}")
    out = doctor(postfix_dir)
    assert out.returncode == 1
    assert "sits after reject_unauth_destination" in out.stdout


def test_policy_after_defer_unauth_destination(postfix_dir: testbed.PostfixTestbed) -> None:
    postfix_dir.set(smtpd_relay_restrictions=f"defer_unauth_destination, {POLICY}")
    out = doctor(postfix_dir)
    assert out.returncode == 1
    assert "sits after defer_unauth_destination" in out.stdout


def test_shadowed_by_default_relay_restrictions(postfix_dir: testbed.PostfixTestbed) -> None:
    # The Facts: Postfix's default smtpd_relay_restrictions runs first and defers strangers.
    postfix_dir.postconf("-X", "smtpd_relay_restrictions")
    postfix_dir.set(smtpd_recipient_restrictions=f"{POLICY}, reject_unauth_destination")
    out = doctor(postfix_dir)
    assert out.returncode == 1
    assert "(Postfix's default)" in out.stdout
    assert "defer_unauth_destination" in out.stdout


def test_legacy_recipient_restrictions_overrule_the_ok(
        postfix_dir: testbed.PostfixTestbed) -> None:
    postfix_dir.set(smtpd_recipient_restrictions="permit_mynetworks, reject_unauth_destination")
    out = doctor(postfix_dir)
    assert out.returncode == 1
    assert "smtpd_recipient_restrictions has reject_unauth_destination and no relaygate" \
           in out.stdout


def test_unconditional_permit_before_policy(postfix_dir: testbed.PostfixTestbed) -> None:
    postfix_dir.set(smtpd_relay_restrictions=f"permit, {POLICY}, reject_unauth_destination")
    out = doctor(postfix_dir)
    assert out.returncode == 1
    assert "every client may relay" in out.stdout


def test_brace_syntax_and_unix_endpoints(postfix_dir: testbed.PostfixTestbed) -> None:
    postfix_dir.set(smtpd_relay_restrictions="check_policy_service { inet:127.0.0.1:10040, "
                                             "timeout=10s, default_action=DUNNO }, "
                                             "reject_unauth_destination")
    assert doctor(postfix_dir).returncode == 0
    postfix_dir.set(smtpd_relay_restrictions="permit_mynetworks, check_policy_service "
                                             "unix:private/relaygate, reject_unauth_destination")
    assert doctor(postfix_dir).returncode == 1  # not the default endpoint
    out = doctor(postfix_dir, "--policy", "unix:private/relaygate")
    assert out.returncode == 0, out.stdout
    queue = postfix_dir.root / "queue"
    assert doctor(postfix_dir, "--policy", f"unix:{queue}/private/relaygate").returncode == 0


def test_master_cf_override_is_a_warning(postfix_dir: testbed.PostfixTestbed) -> None:
    postfix_dir.postconf("-P", "127.0.0.1:10025/inet/smtpd_relay_restrictions="
                               "permit_sasl_authenticated,reject")
    out = doctor(postfix_dir)
    assert out.returncode == 0, out.stdout
    assert "warning: master.cf 127.0.0.1:10025/inet" in out.stdout


def test_probe(postfix_dir: testbed.PostfixTestbed, tmp_path: Path) -> None:
    policyd = start_policyd(tmp_path, "memory:", ipv6=False)
    try:
        relay = (f"check_policy_service inet:127.0.0.1:{policyd.port}, "
                 "reject_unauth_destination")
        postfix_dir.set(smtpd_relay_restrictions=relay)
        out = doctor(postfix_dir, "--policy", f"127.0.0.1:{policyd.port}", "--probe")
        assert out.returncode == 0, out.stdout
        assert "answers (action=DUNNO for a stranger)" in out.stdout
    finally:
        policyd.stop()
    out = doctor(postfix_dir, "--policy", f"127.0.0.1:{policyd.port}", "--probe")
    assert out.returncode == 1
    assert "does not answer" in out.stdout


def test_postconf_missing_is_a_temporary_failure(postfix_dir: testbed.PostfixTestbed) -> None:
    out = doctor(postfix_dir, "--postconf", "/nonexistent/postconf")
    assert out.returncode == 111
    assert "not found" in out.stderr


def test_the_test_postfix_configuration_passes(tmp_path: Path) -> None:
    """The exact configuration the scenario tests run Postfix with is what the docs show."""
    need_program("postconf", testbed.POSTCONF)
    pf = testbed.PostfixTestbed(tmp_path, port=10025, relay_restrictions=(
        "permit_mynetworks, permit_sasl_authenticated, check_policy_service "
        "inet:127.0.0.1:10041, reject_unauth_destination"))
    pf.configure()
    out = doctor(pf, "--policy", "inet:127.0.0.1:10041")
    assert out.returncode == 0, out.stdout


def test_parse_and_check_pure() -> None:
    rs = parse_restrictions("permit_mynetworks,check_client_access hash:/x reject, "
                            "check_policy_service { inet:localhost:10040, timeout=5s } ,"
                            "reject_unauth_destination")
    assert [r.name for r in rs] == ["permit_mynetworks", "check_client_access", "reject",
                                    "check_policy_service", "reject_unauth_destination"]
    assert rs[3].args == ("inet:localhost:10040", "timeout=5s")
    assert normalize_endpoint("inet:localhost:10040") == "inet:127.0.0.1:10040"
    assert normalize_endpoint("[::1]:10040") == "inet:::1:10040"
    assert normalize_endpoint("unix:private/p", "/q") == "unix:/q/private/p"
    # An access table named like a restriction is an argument, not a gate.
    ok = check_lists(f"check_client_access hash:reject, {POLICY}, reject_unauth_destination",
                     "", ["127.0.0.1:10040"], queue_directory="/q")
    assert [f.level for f in ok] == ["ok"]
    nothing = check_lists(POLICY, "", ["127.0.0.1:10040"], queue_directory="/q")
    assert [f.level for f in nothing] == ["warning"]
    twice = check_lists(f"{POLICY}, reject_unauth_destination",
                        f"{POLICY}, reject_unauth_destination", ["127.0.0.1:10040"],
                        queue_directory="/q")
    assert sorted(f.level for f in twice) == ["ok", "ok", "warning"]


# -- mynetworks before the policy (issue 17 point 8) ----------------------------------------


def test_mynetworks_shown_and_wide_one_warned(postfix_dir: testbed.PostfixTestbed) -> None:
    postfix_dir.set(mynetworks="127.0.0.0/8 [::ffff:127.0.0.0]/104 [::1]/128")
    out = doctor(postfix_dir)
    assert out.returncode == 0, out.stdout
    assert "  mynetworks = 127.0.0.0/8 [::ffff:127.0.0.0]/104 [::1]/128" in out.stdout
    assert "permit_mynetworks comes before relaygate's policy; mynetworks covers only " \
           "this host" in out.stdout
    assert "relaygate's policy is in place\n" in out.stdout

    postfix_dir.set(mynetworks="127.0.0.0/8 192.168.0.0/16 [2001:db8::]/32")
    out = doctor(postfix_dir)
    assert out.returncode == 0, out.stdout  # a warning, not a problem
    assert "warning: main.cf: smtpd_relay_restrictions: permit_mynetworks comes before " \
           "relaygate's policy, and mynetworks is wider than this host (192.168.0.0/16, " \
           "[2001:db8::]/32)" in out.stdout
    assert "relaygate's policy is in place (1 warning(s) above)" in out.stdout


def test_mynetworks_checks_pure() -> None:
    from relaygate.integrations.postfix_doctor import check_mynetworks

    own = {"127.0.0.1", "::1", "192.0.2.10"}
    relay = f"permit_mynetworks, {POLICY}, reject_unauth_destination"
    assert [f.level for f in check_mynetworks(relay, "", "127.0.0.0/8 192.0.2.10/32",
                                              ["127.0.0.1:10040"], queue_directory="/q",
                                              own=own)] == ["ok"]
    found = check_mynetworks(relay, "", "192.0.2.11/32 hash:/etc/postfix/net",
                             ["127.0.0.1:10040"], queue_directory="/q", own=own)
    assert [f.level for f in found] == ["warning", "warning"]
    assert "192.0.2.11/32" in found[0].message and "hash:/etc/postfix/net" in found[1].message
    # after the policy, permit_mynetworks cannot let anyone past it
    after = f"{POLICY}, permit_mynetworks, reject_unauth_destination"
    assert check_mynetworks(after, "", "0.0.0.0/0", ["127.0.0.1:10040"],
                            queue_directory="/q", own=own) == []
