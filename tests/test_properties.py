"""Property tests of the pure functions under the data plane: the token parser, the IP allowlist
matcher, origin normalisation and the verify decision. No database; oracles are independent
re-statements of CONTRACT §2/§4 (zlib CRC32, Python's `ipaddress`), not calls back into the code
under test.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import string
import zlib
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from app.net import (
    compile_allowlist,
    ip_allowed,
    normalise_allowed_ip,
    normalise_allowed_ips,
    normalise_origin,
    parse_address,
)
from app.tokens import (
    BASE62,
    BODY_CHARS,
    CHECKSUM_CHARS,
    RANDOM_CHARS,
    TAG_BY_TYPE,
    KeyType,
    ParsedToken,
    display_prefix,
    mint_bearer,
    mint_token,
    parse_bearer,
    parse_token,
)
from app.verifier import Code, KeyRecord, RequestFacts, http_status, verify

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# The exhaustive single-character tests do ~3,000 parses per example: fewer examples suffice.
# The verify decision has many branches; 200 examples reach each of them.
VERIFY = settings(max_examples=200, deadline=None)
EXHAUSTIVE = settings(max_examples=25, deadline=None)

ALPHABET = string.digits + string.ascii_uppercase + string.ascii_lowercase
STRICT_TOKEN = re.compile(r"[a-z]{2,12}_(sdk|mob|cs)_[0-9A-Za-z]{28}")


# --- independent oracles ---------------------------------------------------------------------


def b62_encode(number: int, width: int) -> str:
    digits = ""
    while number:
        number, rem = divmod(number, 62)
        digits = ALPHABET[rem] + digits
    return digits.rjust(width, "0")


def b62_decode(text: str) -> int:
    value = 0
    for char in text:
        value = value * 62 + ALPHABET.index(char)
    return value


def contract_checksum(head: str) -> str:
    """CONTRACT §2: CRC32 (zlib) of everything before the checksum, base62, left-padded."""
    return b62_encode(zlib.crc32(head.encode("ascii")), 6)


def build_token(prefix: str, key_type: KeyType, random_value: int) -> str:
    head = f"{prefix}_{TAG_BY_TYPE[key_type]}_{b62_encode(random_value, 22)}"
    return head + contract_checksum(head)


prefixes = st.from_regex(r"[a-z]{2,12}", fullmatch=True)
key_types = st.sampled_from(list(KeyType))
random_values = st.integers(min_value=0, max_value=2**128 - 1)


@st.composite
def tokens(draw: st.DrawFn) -> tuple[str, str, KeyType, int]:
    prefix, key_type, value = draw(prefixes), draw(key_types), draw(random_values)
    return build_token(prefix, key_type, value), prefix, key_type, value


# --- tokens ----------------------------------------------------------------------------------


def test_token_constants_match_the_contract() -> None:
    assert BASE62 == ALPHABET
    assert (RANDOM_CHARS, CHECKSUM_CHARS, BODY_CHARS) == (22, 6, 28)
    assert 62**RANDOM_CHARS >= 2**128
    assert {t.value: TAG_BY_TYPE[t] for t in KeyType} == {
        "SERVER": "sdk",
        "MOBILE": "mob",
        "CLIENT_SIDE": "cs",
    }


@FAST
@given(prefixes, key_types)
def test_minted_token_round_trips_through_the_parser(prefix: str, key_type: KeyType) -> None:
    token = mint_token(prefix, key_type)
    parsed = parse_token(token)
    assert parsed == ParsedToken(prefix=prefix, key_type=key_type, token=token)
    head, tag, body = token.split("_")
    assert (head, tag) == (prefix, TAG_BY_TYPE[key_type])
    assert len(body) == 28 and set(body) <= set(ALPHABET)
    assert b62_decode(body[:22]) < 2**128
    assert body[22:] == contract_checksum(token[:-6])
    assert display_prefix(token) == f"{prefix}_{tag}_{body[:4]}"
    assert STRICT_TOKEN.fullmatch(token)


@FAST
@given(tokens())
def test_built_token_parses_to_its_parts(case: tuple[str, str, KeyType, int]) -> None:
    token, prefix, key_type, value = case
    parsed = parse_token(token)
    assert parsed is not None
    assert (parsed.prefix, parsed.key_type, parsed.token) == (prefix, key_type, token)
    assert b62_decode(token.rsplit("_", 1)[1][:22]) == value


def test_mint_refuses_a_bad_prefix() -> None:
    for bad in ["", "a", "Acme", "acme1", "a" * 13, "ac_me"]:
        with pytest.raises(ValueError):
            mint_token(bad, KeyType.SERVER)


@EXHAUSTIVE
@given(tokens())
def test_every_single_character_substitution_is_rejected(
    case: tuple[str, str, KeyType, int],
) -> None:
    token = case[0]
    candidates = set(ALPHABET) | set("_-. ")
    tried = 0
    for position, original in enumerate(token):
        for replacement in candidates - {original}:
            mutated = token[:position] + replacement + token[position + 1 :]
            assert parse_token(mutated) is None, (token, position, replacement)
            tried += 1
    assert tried >= len(token) * 61


@EXHAUSTIVE
@given(tokens())
def test_adjacent_transpositions_insertions_and_deletions_are_rejected(
    case: tuple[str, str, KeyType, int],
) -> None:
    token = case[0]
    for i in range(len(token) - 1):
        if token[i] != token[i + 1]:
            swapped = token[:i] + token[i + 1] + token[i] + token[i + 2 :]
            assert parse_token(swapped) is None, (token, i)
    for i in range(len(token)):
        assert parse_token(token[:i] + token[i + 1 :]) is None, (token, i)
        for extra in "0aZ_":
            assert parse_token(token[:i] + extra + token[i:]) is None, (token, i, extra)
    for suffix in ["\n", " ", "\x00", "0"]:
        assert parse_token(token + suffix) is None
        assert parse_token(suffix + token) is None


@FAST
@given(st.text(max_size=80))
def test_arbitrary_text_never_crashes_the_parser(text: str) -> None:
    parsed = parse_token(text)
    if parsed is not None:  # only a well-formed, checksummed token may be accepted
        assert STRICT_TOKEN.fullmatch(text)
        assert text[-6:] == contract_checksum(text[:-6])
    assert parse_bearer(text) is None or re.fullmatch(r"kp[ms]_[0-9A-Za-z]{28}", text)


near_tokens = st.from_regex(
    r"\A[a-z]{1,13}_(sdk|mob|cs|sd|mobx)_[0-9A-Za-z]{26,30}[\n ]?\Z", fullmatch=False
)


@FAST
@given(near_tokens)
def test_token_shaped_text_is_accepted_only_with_shape_and_checksum(text: str) -> None:
    parsed = parse_token(text)
    good = bool(STRICT_TOKEN.fullmatch(text)) and text[-6:] == contract_checksum(text[:-6])
    assert (parsed is not None) == good


@FAST
@given(st.sampled_from(["kpm", "kps"]), random_values)
def test_bearer_tokens_round_trip_and_reject_substitutions(tag: str, value: int) -> None:
    head = f"{tag}_{b62_encode(value, 22)}"
    token = head + contract_checksum(head)
    assert parse_bearer(token) == tag
    assert parse_token(token) is None  # never mistaken for an API key
    minted = mint_bearer(tag)
    assert parse_bearer(minted) == tag and len(minted) == 4 + 28
    position = value % len(token)
    for replacement in set(ALPHABET) - {token[position]}:
        mutated = token[:position] + replacement + token[position + 1 :]
        assert parse_bearer(mutated) is None


# --- IP allowlists ---------------------------------------------------------------------------

Addr = ipaddress.IPv4Address | ipaddress.IPv6Address
Net = ipaddress.IPv4Network | ipaddress.IPv6Network


@st.composite
def networks(draw: st.DrawFn, v: int | None = None) -> Net:
    address = draw(st.ip_addresses(v=v) if v else st.ip_addresses())
    prefix = draw(st.integers(min_value=0, max_value=address.max_prefixlen))
    return ipaddress.ip_network(f"{address}/{prefix}", strict=False)


@st.composite
def address_in(draw: st.DrawFn, network: Net) -> Addr:
    offset = draw(st.integers(min_value=0, max_value=network.num_addresses - 1))
    return network.network_address + offset


@FAST
@given(st.ip_addresses(), st.lists(networks(), max_size=4))
def test_ip_allowed_agrees_with_ipaddress(address: Addr, allowlist: list[Net]) -> None:
    expected = not allowlist or any(address in net for net in allowlist)
    assert ip_allowed(address, allowlist) == expected


@FAST
@given(networks(), st.data())
def test_every_address_inside_a_network_is_allowed(network: Net, data: st.DataObject) -> None:
    inside = data.draw(address_in(network))
    assert ip_allowed(inside, [network])
    # Just outside, when the network does not reach the end of the address space.
    top = int(network.broadcast_address)
    if top < 2**network.max_prefixlen - 1:
        assert not ip_allowed(type(network.network_address)(top + 1), [network])
    if int(network.network_address) > 0:
        below = type(network.network_address)(int(network.network_address) - 1)
        assert not ip_allowed(below, [network])


@FAST
@given(st.lists(networks(), max_size=3))
def test_unknown_client_ip_is_allowed_only_without_a_list(allowlist: list[Net]) -> None:
    assert ip_allowed(None, allowlist) == (not allowlist)


@FAST
@given(st.ip_addresses(v=4), st.ip_addresses(v=6))
def test_versions_never_match_across(v4: ipaddress.IPv4Address, v6: ipaddress.IPv6Address) -> None:
    everything_v4 = ipaddress.ip_network("0.0.0.0/0")
    everything_v6 = ipaddress.ip_network("::/0")
    assert not ip_allowed(v6, [everything_v4])
    assert not ip_allowed(v4, [everything_v6])


@FAST
@given(networks(v=4), st.data())
def test_ipv4_mapped_client_matches_ipv4_entries(
    network: ipaddress.IPv4Network, data: st.DataObject
) -> None:
    """What the code does (app/net.py): `ip_allowed` compares versions strictly; IPv4-mapped
    IPv6 (`::ffff:a.b.c.d`) becomes IPv4 in `parse_address` (how the client IP is resolved) and
    in `normalise_allowed_ip` for a single address, so a dual-stack peer `::ffff:10.0.0.5`
    matches an allowlist entry `10.0.0.0/8` end to end."""
    inside = data.draw(address_in(network))
    mapped = ipaddress.IPv6Address(f"::ffff:{inside}")
    client = parse_address(str(mapped))
    assert client == inside
    assert parse_address(f"[{mapped}]:443") == inside
    allowlist = compile_allowlist(normalise_allowed_ips([network.compressed]))
    assert ip_allowed(client, allowlist)
    # The single-address mapped form is stored as plain IPv4 and still matches.
    assert normalise_allowed_ip(str(mapped)) == inside.compressed
    assert ip_allowed(client, compile_allowlist([normalise_allowed_ip(str(mapped))]))


@settings(max_examples=50, deadline=None)
@given(networks(v=4), st.data())
def test_ipv4_mapped_cidr_entry_matches_like_its_ipv4_form(
    network: ipaddress.IPv4Network, data: st.DataObject
) -> None:
    inside = data.draw(address_in(network))
    entry = f"::ffff:{network.network_address}/{96 + network.prefixlen}"
    stored = normalise_allowed_ips([entry])
    client = parse_address(f"::ffff:{inside}")
    assert ip_allowed(client, compile_allowlist(stored))


@FAST
@given(st.ip_addresses())
def test_a_single_address_entry_is_stored_canonical(address: Addr) -> None:
    assume(not (address.version == 6 and address.ipv4_mapped is not None))
    expected = address.compressed
    assert normalise_allowed_ip(str(address)) == expected
    assert normalise_allowed_ip(address.exploded) == expected
    assert normalise_allowed_ip(f"  {address}\t") == expected
    assert normalise_allowed_ip(f"{address}/{address.max_prefixlen}") == expected
    assert normalise_allowed_ip(expected) == expected
    assert compile_allowlist([expected]) == (ipaddress.ip_network(expected),)


@FAST
@given(networks())
def test_a_cidr_entry_is_stored_as_ipaddress_prints_it(network: Net) -> None:
    assume(network.num_addresses > 1)
    expected = as_ipv4_if_mapped(str(network))  # a mapped range is stored as its IPv4 form
    assert normalise_allowed_ip(str(network)) == expected
    assert normalise_allowed_ip(network.exploded) == expected
    assert normalise_allowed_ip(expected) == expected  # idempotent
    assert [str(n) for n in compile_allowlist([expected])] == [expected]
    if not ipv4_mapped(str(network)):
        assert expected == network.compressed
        assert compile_allowlist([expected]) == (network,)


@FAST
@given(networks(), st.data())
def test_a_cidr_with_host_bits_is_refused_with_a_suggestion(
    network: Net, data: st.DataObject
) -> None:
    assume(network.num_addresses > 1)
    host = data.draw(address_in(network))
    assume(host != network.network_address)
    with pytest.raises(ValueError, match=re.escape(f"did you mean {network.compressed}?")):
        normalise_allowed_ip(f"{host}/{network.prefixlen}")


def ipv4_mapped(text: str) -> bool:
    """An entry inside ::ffff:0:0/96 (IPv4-mapped IPv6), address or CIDR."""
    try:
        network = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        return False
    return (
        network.version == 6
        and network.prefixlen >= 96
        and network.network_address.ipv4_mapped is not None
    )


@FAST
@given(st.lists(st.one_of(st.ip_addresses().map(str), networks().map(str)), max_size=8))
def test_allowlist_normalisation_is_idempotent_and_deduplicated(values: list[str]) -> None:
    once = normalise_allowed_ips(values)  # networks() has no host bits: nothing is refused
    assert normalise_allowed_ips(once) == once
    assert len(set(once)) == len(once)
    assert {str(n) for n in compile_allowlist(once)} == {as_ipv4_if_mapped(v) for v in values}


def as_ipv4_if_mapped(text: str) -> str:
    """What an allowlist entry stands for: an IPv4-mapped IPv6 range is its IPv4 range."""
    network = ipaddress.ip_network(text, strict=False)
    if ipv4_mapped(text):
        mapped = network.network_address.ipv4_mapped  # type: ignore[union-attr]
        return str(ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}"))
    return str(network)


@settings(max_examples=50, deadline=None)
@given(st.ip_addresses(v=4))
def test_ipv4_mapped_single_address_cidr_is_normalised_idempotently(
    address: ipaddress.IPv4Address,
) -> None:
    once = normalise_allowed_ip(f"::ffff:{address}/128")
    assert normalise_allowed_ip(once) == once
    assert once == normalise_allowed_ip(f"::ffff:{address}") == address.compressed


@FAST
@given(st.text(max_size=60))
def test_arbitrary_allowlist_text_fails_only_with_value_error(text: str) -> None:
    try:
        canonical = normalise_allowed_ip(text)
    except ValueError:
        return
    if not ipv4_mapped(text):
        assert normalise_allowed_ip(canonical) == canonical
    assert len(compile_allowlist([canonical])) == 1


# --- origins ---------------------------------------------------------------------------------

labels = st.from_regex(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,10}[a-zA-Z0-9])?", fullmatch=True)
hostnames = st.lists(labels, min_size=1, max_size=4).map(".".join)
hosts = st.one_of(
    hostnames,
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
)
schemes = st.sampled_from(["http", "https", "HTTP", "Https", "hTtPs"])
ports = st.none() | st.integers(min_value=1, max_value=65535)


@st.composite
def origins(draw: st.DrawFn) -> tuple[str, str, str, int | None]:
    scheme, host, port = draw(schemes), draw(hosts), draw(ports)
    text = f"{scheme}://{host}" + (f":{port}" if port is not None else "")
    return text, scheme, host, port


def expected_origin(scheme: str, host: str, port: int | None) -> str:
    scheme = scheme.lower()
    default = {"http": 80, "https": 443}[scheme]
    suffix = "" if port is None or port == default else f":{port}"
    return f"{scheme}://{host.lower()}{suffix}"


@FAST
@given(origins())
def test_origin_is_lowercased_default_port_dropped_and_idempotent(
    case: tuple[str, str, str, int | None],
) -> None:
    text, scheme, host, port = case
    once = normalise_origin(text)
    assert once == expected_origin(scheme, host, port)
    assert normalise_origin(once) == once
    assert normalise_origin(f"  {text} ") == once


@FAST
@given(
    origins(),
    st.sampled_from(["/", "/path", "/a/b", "?q=1", "?", "#frag", "/?x", "/index.html"]),
)
def test_origin_with_path_query_or_fragment_is_refused(
    case: tuple[str, str, str, int | None], tail: str
) -> None:
    with pytest.raises(ValueError):
        normalise_origin(case[0] + tail)


@FAST
@given(origins(), st.sampled_from(["user@", "user:pw@", ":pw@", "a%40b@"]))
def test_origin_with_credentials_is_refused(
    case: tuple[str, str, str, int | None], userinfo: str
) -> None:
    text = case[0]
    scheme, rest = text.split("://", 1)
    with pytest.raises(ValueError):
        normalise_origin(f"{scheme}://{userinfo}{rest}")


@FAST
@given(origins(), st.sampled_from(["ftp", "ws", "wss", "file", "javascript", "data", "chrome"]))
def test_origin_with_another_scheme_is_refused(
    case: tuple[str, str, str, int | None], scheme: str
) -> None:
    rest = case[0].split("://", 1)[1]
    with pytest.raises(ValueError):
        normalise_origin(f"{scheme}://{rest}")


@FAST
@given(st.text(max_size=30), st.text(max_size=30))
def test_origin_with_a_wildcard_is_refused(before: str, after: str) -> None:
    with pytest.raises(ValueError):
        normalise_origin(f"{before}*{after}")


def test_origin_fixed_refusals() -> None:
    for bad in ["*", "null", "", "  ", "https://", "example.com", "//example.com", "https:///x"]:
        with pytest.raises(ValueError):
            normalise_origin(bad)


@FAST
@given(st.text(max_size=60) | st.from_regex(r"\A(https?|HTTP)://[^/?#]{0,20}\Z"))
def test_arbitrary_origin_text_fails_only_with_value_error(text: str) -> None:
    try:
        once = normalise_origin(text)
    except ValueError:
        return
    assert normalise_origin(once) == once
    assert re.fullmatch(r"https?://[^/?#@*\s]+", once), once
    assert once == once.lower() or "[" in once


# --- the verify decision ---------------------------------------------------------------------

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
segments = st.sampled_from(["pdf", "template", "read", "generate", "admin", "x"])
plain_permissions = st.lists(segments, min_size=1, max_size=3).map(".".join)
held_permissions = st.one_of(plain_permissions, plain_permissions.map(lambda p: p + ".*"))
moments = st.none() | st.sampled_from([-86400, -61, -1, 0, 1, 60, 86400]).map(
    lambda s: NOW + timedelta(seconds=s)
)
origin_pool = ["https://app.example.com", "http://localhost:3000", "https://other.test"]


@st.composite
def records(draw: st.DrawFn) -> KeyRecord:
    permissions = frozenset(draw(st.lists(held_permissions, max_size=4)))
    if draw(st.booleans()) and draw(st.booleans()):
        permissions = permissions | {"*"}
    return KeyRecord(
        key_id="key_" + "A" * 22,
        key_pk=3,
        key_type=draw(st.sampled_from(["SERVER", "MOBILE", "CLIENT_SIDE"])),
        workspace_pk=1,
        workspace_id="ws_" + "B" * 22,
        environment_pk=2,
        environment_id="env_" + "C" * 22,
        status=draw(st.sampled_from(["ENABLED", "ENABLED", "ENABLED", "DISABLED", "REVOKED"])),
        permissions=permissions,
        permission_list=tuple(sorted(permissions)),
        allowed_networks=tuple(draw(st.just([]) | st.lists(networks(), max_size=3))),
        authorized_origins=frozenset(draw(st.lists(st.sampled_from(origin_pool), max_size=2))),
        expires_at=draw(moments),
        grace_ends_at=draw(moments),
    )


@st.composite
def facts_for(draw: st.DrawFn, record: KeyRecord) -> RequestFacts:
    token: str | None = draw(tokens())[0]
    spoil = draw(st.sampled_from(["no", "no", "no", "no", "no", "no", "none", "empty", "sum"]))
    if spoil == "none":
        token = None
    elif spoil == "empty":
        token = ""
    elif spoil == "sum" and token:
        token = token[:-1] + ("0" if token[-1] != "0" else "1")
    client_ip: Addr | None
    if record.allowed_networks and draw(st.booleans()):
        client_ip = draw(address_in(draw(st.sampled_from(record.allowed_networks))))
    else:
        client_ip = draw(st.none() | st.ip_addresses())
    origin = draw(st.none() | st.sampled_from([*origin_pool, "https://evil.test"]))
    if record.authorized_origins and draw(st.booleans()):
        origin = draw(st.sampled_from(sorted(record.authorized_origins)))
    # Ask for what the key holds (or members of its families) as often as for anything else.
    own = sorted(record.permissions - {"*"})
    asked = plain_permissions | held_permissions
    if own:
        asked = asked | st.sampled_from(own) | st.sampled_from(own).map(lambda p: p[:-1] + "x")
    required = tuple(draw(st.lists(asked, max_size=3)))
    # Now and then a body whose requirements could not be read (app.http.verify): fail closed.
    unreadable = draw(st.sampled_from([None] * 8 + ["the request body is not valid JSON"]))
    return RequestFacts(
        token=token, client_ip=client_ip, origin=origin, required=required, unreadable=unreadable
    )


cases = records().flatmap(lambda r: st.tuples(st.just(r), facts_for(r)))


def covered(held: frozenset[str], required: str) -> bool:
    """CONTRACT §2: exact match, or a held `family.*` (or `*`) covering the required one."""
    if required in held or "*" in held:
        return True
    return any(
        h.endswith(".*") and required.startswith(h[:-1]) and len(required) > len(h) - 1
        for h in held
    )


def expected_code(facts: RequestFacts, record: KeyRecord | None) -> Code:
    """The check order of CONTRACT §4, re-stated."""
    if not facts.token:
        return Code.MISSING_KEY
    if not STRICT_TOKEN.fullmatch(facts.token) or facts.token[-6:] != contract_checksum(
        facts.token[:-6]
    ):
        return Code.INVALID_KEY
    if record is None:
        return Code.INVALID_KEY
    if record.status == "DISABLED":
        return Code.DISABLED
    if record.status == "REVOKED" and (record.grace_ends_at is None or record.grace_ends_at <= NOW):
        return Code.REVOKED
    if record.expires_at is not None and record.expires_at <= NOW:
        return Code.EXPIRED
    if record.allowed_networks and not (
        facts.client_ip is not None and any(facts.client_ip in n for n in record.allowed_networks)
    ):
        return Code.IP_NOT_ALLOWED
    if record.key_type == "CLIENT_SIDE" and facts.origin not in record.authorized_origins:
        return Code.ORIGIN_NOT_ALLOWED
    if facts.unreadable is not None:  # requirements that could not be read are not held
        return Code.INSUFFICIENT_PERMISSIONS
    if not all(covered(record.permissions, r) for r in facts.required):
        return Code.INSUFFICIENT_PERMISSIONS
    return Code.VALID


def dead(record: KeyRecord) -> bool:
    return (
        record.status == "DISABLED"
        or (
            record.status == "REVOKED"
            and (record.grace_ends_at is None or record.grace_ends_at <= NOW)
        )
        or (record.expires_at is not None and record.expires_at <= NOW)
    )


@VERIFY
@given(cases)
def test_a_disabled_revoked_or_expired_key_is_never_valid(
    case: tuple[KeyRecord, RequestFacts],
) -> None:
    record, facts = case
    decision = verify(facts, record, NOW)
    if dead(record):
        assert not decision.valid
        assert decision.code in {
            Code.MISSING_KEY,
            Code.INVALID_KEY,
            Code.DISABLED,
            Code.REVOKED,
            Code.EXPIRED,
        }
        assert decision.http_status == 401


@VERIFY
@given(cases)
def test_a_valid_decision_covers_every_required_permission(
    case: tuple[KeyRecord, RequestFacts],
) -> None:
    record, facts = case
    decision = verify(facts, record, NOW)
    if decision.valid:
        assert all(covered(record.permissions, r) for r in facts.required)
        assert not dead(record)
        assert record.status in {"ENABLED", "REVOKED"}
        assert decision.record is record
        assert decision.http_status == 200


@VERIFY
@given(cases)
def test_verify_follows_the_contract_check_order(case: tuple[KeyRecord, RequestFacts]) -> None:
    record, facts = case
    decision = verify(facts, record, NOW)
    assert decision.code == expected_code(facts, record)
    assert decision.http_status == http_status(decision.code)
    assert decision.valid == (decision.code is Code.VALID)
    if facts.token:
        assert facts.token not in decision.message
    unknown = verify(facts, None, NOW)
    assert not unknown.valid and unknown.code == expected_code(facts, None)
    assert unknown.record is None


DEATHS = {
    "disabled": {"status": "DISABLED"},
    "revoked": {"status": "REVOKED", "grace_ends_at": None},
    "grace over": {"status": "REVOKED", "grace_ends_at": NOW},
    "grace long over": {"status": "REVOKED", "grace_ends_at": NOW - timedelta(days=1)},
    "expired now": {"expires_at": NOW},
    "expired": {"expires_at": NOW - timedelta(seconds=1)},
}


@VERIFY
@given(cases, st.sampled_from(sorted(DEATHS)), st.integers(min_value=0, max_value=3))
def test_dead_stays_dead_whatever_the_other_inputs(
    case: tuple[KeyRecord, RequestFacts], death: str, variant: int
) -> None:
    """Give a dead key every advantage (no IP list, its own origin, a wildcard grant, nothing
    or anything required) and it is still refused, with the code of the first reason."""
    record, facts = case
    token = facts.token if facts.token and parse_token(facts.token) else tokens_example()
    generous = dataclasses.replace(
        record,
        **DEATHS[death],
        allowed_networks=(),
        permissions=frozenset({"*"}),
        permission_list=("*",),
        authorized_origins=frozenset(origin_pool),
    )
    assert dead(generous)
    request = RequestFacts(
        token=token,
        client_ip=facts.client_ip,
        origin=origin_pool[variant % len(origin_pool)],
        required=() if variant < 2 else facts.required,
        unreadable=None if variant < 3 else facts.unreadable,
    )
    decision = verify(request, generous, NOW)
    assert decision.code in {Code.DISABLED, Code.REVOKED, Code.EXPIRED}
    assert decision.code == expected_code(request, generous)
    assert decision.http_status == 401 and decision.record is generous


def tokens_example() -> str:
    return build_token("kp", KeyType.SERVER, 12345)
