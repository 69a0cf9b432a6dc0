"""Postfix policy protocol core: bytes in, requests out, OK/DUNNO back (no sockets)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relaygate.decision import Decision, Verdict
from relaygate.protocols.policy import (
    _ASKS,
    _ASKS_MAX,
    DUNNO,
    MAX_ATTRIBUTES,
    MAX_LINE_LENGTH,
    OK,
    Answer,
    Ask,
    PolicyProtocolError,
    PolicyReader,
    PolicyRequest,
    answer_for,
    format_answer,
    format_request,
    triage,
)

# What Postfix 3.7 sends (SMTPD_POLICY_README, "Protocol description").
POSTFIX_REQUEST = (
    b"request=smtpd_access_policy\n"
    b"protocol_state=RCPT\n"
    b"protocol_name=ESMTP\n"
    b"helo_name=client.example.org\n"
    b"queue_id=\n"
    b"sender=alice@example.org\n"
    b"recipient=bob@remote.example\n"
    b"recipient_count=0\n"
    b"client_address=192.0.2.7\n"
    b"client_name=unknown\n"
    b"reverse_client_name=unknown\n"
    b"instance=1a2b.5f3e.9c1d.0\n"
    b"sasl_method=\n"
    b"sasl_username=\n"
    b"sasl_sender=\n"
    b"size=0\n"
    b"ccert_subject=\n"
    b"encryption_protocol=\n"
    b"stress=\n"
    b"server_address=192.0.2.1\n"
    b"server_port=25\n"
    b"policy_context=\n"
    b"compatibility_level=3.6\n"
    b"mail_version=3.7.11\n"
    b"\n"
)


def read_all(data: bytes, chunks: list[int] | None = None) -> list[PolicyRequest]:
    reader = PolicyReader()
    out: list[PolicyRequest] = []
    pieces = [data] if chunks is None else _split(data, chunks)
    for piece in pieces:
        reader.receive_data(piece)
        while (req := reader.next_request()) is not None:
            out.append(req)
    reader.receive_data(b"")
    while (req := reader.next_request()) is not None:
        out.append(req)
    assert reader.closed
    return out


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return [p for p in out if p]


def test_postfix_request_is_parsed() -> None:
    (req,) = read_all(POSTFIX_REQUEST)
    assert req.request_type == "smtpd_access_policy"
    assert req.get("client_address") == b"192.0.2.7"
    assert req.get("queue_id") == b""
    assert req.text("helo_name") == "client.example.org"
    assert req.get("missing") is None


def test_many_requests_per_connection_and_byte_by_byte() -> None:
    stream = POSTFIX_REQUEST * 5
    assert len(read_all(stream)) == 5
    reader = PolicyReader()
    got = 0
    for i in range(len(stream)):
        reader.receive_data(stream[i : i + 1])
        while reader.next_request() is not None:
            got += 1
    assert got == 5


@pytest.mark.parametrize("bad, why", [
    (b"\n", "empty request"),
    (b"request=smtpd_access_policy\nno equals sign\n\n", "name=value"),
    (b"request=smtpd_access_policy\nClient_Address=1.2.3.4\n\n", "name=value"),
    (b"request=smtpd_access_policy\n=value\n\n", "name=value"),
    (b"request=smtpd_access_policy\nclient_address=1.2.3.4\nclient_address=5.6.7.8\n\n",
     "repeated"),
    (b"request=smtpd_access_policy\nXrequest=x\n\n", "name=value"),
    (b"request=smtpd_access_policy\n request=x\n\n", "name=value"),
    (b"client_address=1.2.3.4\n\n", "request"),
    (b"request=smtpd_access_policy\nsender=a\x00b\n\n", "NUL"),
    (b"request=smtpd_access_policy\nsender=" + b"x" * (MAX_LINE_LENGTH + 1) + b"\n\n",
     "longer"),
    (b"request=smtpd_access_policy\n" + b"a=b\n" * MAX_ATTRIBUTES + b"\n", "attributes"),
    (b"request=smtpd_access_policy\r\nclient_address=1.2.3.4\r\n\r\n", "CRLF"),
    (b"\r\n", "CRLF"),
])
def test_malformed_requests_are_protocol_errors(bad: bytes, why: str) -> None:
    reader = PolicyReader()
    reader.receive_data(bad)
    with pytest.raises(PolicyProtocolError, match=why):
        reader.next_request()


@pytest.mark.parametrize("name", ["request", "client_address", "sasl_username"])
@pytest.mark.parametrize("first", [True, False])
def test_an_attribute_a_decision_reads_may_not_repeat(name: str, first: bool) -> None:
    line = f"{name}=x\n".encode()
    rest = b"request=smtpd_access_policy\n" if name != "request" else b"sender=a\n"
    body = (line + rest + line) if first else (rest + line + b"sender=b\n" + line)
    reader = PolicyReader()
    reader.receive_data(body + b"\n")
    with pytest.raises(PolicyProtocolError, match=f"{name} repeated"):
        reader.next_request()


def test_other_attributes_are_split_out_only_when_asked_for() -> None:
    (req,) = read_all(POSTFIX_REQUEST)
    # What a decision reads was taken out while parsing ...
    assert req.read == {b"request": b"smtpd_access_policy", b"client_address": b"192.0.2.7",
                        b"sasl_username": b""}
    # ... the rest comes from the request text on demand, every line of it.
    lines = POSTFIX_REQUEST.rstrip(b"\n").split(b"\n")
    assert req.fields == dict(line.split(b"=", 1) for line in lines)
    assert len(req.fields) == len(lines) == 24
    assert req.get("mail_version") == b"3.7.11"
    # A repeated attribute nobody decides on is not a protocol error (Postfix never
    # sends one; refusing it would cost a dict of every attribute per request).
    reader = PolicyReader()
    reader.receive_data(b"request=smtpd_access_policy\nsender=a\nsender=b\n\n")
    assert reader.next_request() is not None


def test_overlong_line_is_refused_before_it_ends() -> None:
    reader = PolicyReader()
    reader.receive_data(b"request=smtpd_access_policy\nsender=")
    assert reader.next_request() is None
    reader.receive_data(b"x" * MAX_LINE_LENGTH)
    with pytest.raises(PolicyProtocolError, match="line longer"):
        reader.next_request()


def test_endless_attributes_are_refused_before_the_blank_line() -> None:
    reader = PolicyReader()
    reader.receive_data(b"request=smtpd_access_policy\n" + b"a=b\n" * (MAX_ATTRIBUTES + 1))
    with pytest.raises(PolicyProtocolError, match="attributes"):
        reader.next_request()


def test_huge_request_is_refused() -> None:
    reader = PolicyReader()
    reader.receive_data(b"request=smtpd_access_policy\n" + (b"s=" + b"x" * 4000 + b"\n") * 10)
    with pytest.raises(PolicyProtocolError, match="request longer"):
        reader.next_request()


def test_eof_in_the_middle_of_a_request() -> None:
    reader = PolicyReader()
    reader.receive_data(b"request=smtpd_access_policy\nclient_address=1.2.3.4\n")
    assert reader.next_request() is None
    reader.receive_data(b"")
    with pytest.raises(PolicyProtocolError, match="middle"):
        reader.next_request()


def test_eof_between_requests_is_clean() -> None:
    reader = PolicyReader()
    reader.receive_data(POSTFIX_REQUEST)
    reader.receive_data(b"")
    assert reader.next_request() is not None
    assert reader.next_request() is None
    assert reader.closed


def req(**attrs: str) -> PolicyRequest:
    return PolicyRequest.of({k: v.encode() for k, v in attrs.items()})


def test_triage() -> None:
    assert triage(req(request="smtpd_access_policy", client_address="192.0.2.7")) == \
        Ask("192.0.2.7")
    # Postfix writes IPv6 without brackets; mapped IPv4 folds to IPv4.
    assert triage(req(request="smtpd_access_policy", client_address="2001:DB8::0:1")) == \
        Ask("2001:db8::1")
    assert triage(req(request="smtpd_access_policy", client_address="::ffff:192.0.2.7")) == \
        Ask("192.0.2.7")
    sasl = triage(req(request="smtpd_access_policy", client_address="192.0.2.7",
                      sasl_username="alice"))
    assert isinstance(sasl, Answer) and sasl.action == DUNNO and sasl.kind == "sasl"
    empty_sasl = triage(req(request="smtpd_access_policy", client_address="192.0.2.7",
                            sasl_username=""))
    assert empty_sasl == Ask("192.0.2.7")
    other = triage(req(request="junk", client_address="192.0.2.7"))
    assert isinstance(other, Answer) and other.action == DUNNO
    for bad in ("unknown", "../../etc", "1.2.3.4%eth0", ""):
        got = triage(req(request="smtpd_access_policy", client_address=bad))
        assert isinstance(got, Answer) and got.action == DUNNO, bad
    missing = triage(req(request="smtpd_access_policy"))
    assert isinstance(missing, Answer) and missing.action == DUNNO


def test_answers() -> None:
    allow = Decision(Verdict.ALLOW, "window opened by alice", "grant")
    assert answer_for(allow).action == OK
    assert answer_for(Decision(Verdict.DENY, "none", "none")).action == DUNNO
    # A store failure never allows: DUNNO lets reject_unauth_destination refuse.
    assert answer_for(Decision(Verdict.TEMPFAIL, "store down", "store")).action == DUNNO
    assert format_answer(OK) == b"action=OK\n\n"
    assert format_answer(DUNNO) == b"action=DUNNO\n\n"
    with pytest.raises(ValueError):
        format_answer("REJECT")


def test_format_request_round_trip() -> None:
    data = format_request({"request": "smtpd_access_policy", "client_address": "::1"})
    (r,) = read_all(data)
    assert r.attributes == {"request": b"smtpd_access_policy", "client_address": b"::1"}
    with pytest.raises(ValueError):
        format_request({"request": "x\ny"})


# -- properties ----------------------------------------------------------------

names = st.from_regex(r"[a-z][a-z0-9_]{0,20}", fullmatch=True)
values = st.binary(max_size=200).filter(lambda b: b"\n" not in b and b"\0" not in b)


@settings(max_examples=80, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(names, values, max_size=30), st.lists(st.integers(0, 10_000)))
def test_any_valid_request_survives_any_chunking(attrs: dict[str, bytes],
                                                 cuts: list[int]) -> None:
    attrs = {"request": b"smtpd_access_policy", **attrs}
    data = format_request(dict(attrs)) * 2
    got = read_all(data, cuts)
    assert [r.attributes for r in got] == [attrs, attrs]


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=300), max_size=8))
def test_arbitrary_bytes_never_crash_the_reader(chunks: list[bytes]) -> None:
    reader = PolicyReader(max_line=64, max_attributes=8, max_request=512)
    try:
        for chunk in [*chunks, b""]:
            reader.receive_data(chunk)
            while (r := reader.next_request()) is not None:
                assert "request" in r.attributes
                for name, value in r.attributes.items():
                    assert name.isascii() and b"\n" not in value and b"\0" not in value
                assert isinstance(triage(r), (Ask, Answer))
    except PolicyProtocolError:
        pass
    assert reader.buffered <= 512 + 300


@settings(max_examples=200)
@given(st.binary(max_size=100))
def test_no_client_address_text_is_asked_about_unless_it_is_an_address(raw: bytes) -> None:
    r = PolicyRequest.of({"request": b"smtpd_access_policy", "client_address": raw})
    got = triage(r)
    if isinstance(got, Ask):
        # Only a real address reaches the store, in canonical form.
        assert got.ip.isascii() and "/" not in got.ip and " " not in got.ip


def test_address_parse_memo_is_bounded() -> None:
    for i in range(_ASKS_MAX + 10):
        triage(req(request="smtpd_access_policy", client_address=f"10.{i >> 8 & 255}.{i & 255}.1"))
    assert 0 < len(_ASKS) <= _ASKS_MAX
    assert triage(req(request="smtpd_access_policy", client_address="10.0.0.1")) == \
        Ask("10.0.0.1")
