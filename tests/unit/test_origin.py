"""Which peers may name the client in x-forwarded-for: addresses and networks of --trusted-proxies."""

from __future__ import annotations

import pytest

from flowport.server.auth.origin import Origin, TrustedProxies, origin_of, peer_host, trusted_network
from flowport.server.settings import Settings

FORWARDED = (("x-forwarded-for", "198.51.100.9, 203.0.113.7"),)


def test_addresses_and_networks_of_both_families() -> None:
    proxies = TrustedProxies(["10.0.0.0/8", "192.0.2.7", "fd00::/8", "::1"])
    assert "10.1.2.3" in proxies and "192.0.2.7" in proxies and "fd12::5" in proxies and "::1" in proxies
    assert "11.0.0.1" not in proxies and "192.0.2.8" not in proxies and "fe80::1" not in proxies
    # An IPv4 peer reached over an IPv6 socket, and a link-local zone, are read as the address they name.
    assert "::ffff:10.9.9.9" in proxies and "fd00::1%eth0" in proxies
    # What is no address never matches, and is remembered as such like any other answer.
    assert "unix:/tmp/socket" not in proxies and "" not in proxies and "10.0.0.1:50" not in proxies
    assert "10.1.2.3" in proxies  # asked again: the remembered answer


def test_a_peer_in_a_trusted_network_names_the_client_and_others_do_not() -> None:
    proxies = TrustedProxies(["10.0.0.0/8"])
    assert origin_of(FORWARDED, "ipv4:10.4.5.6:40000", proxies) == Origin("203.0.113.7", "10.4.5.6")
    assert origin_of(FORWARDED, "ipv4:172.16.0.1:40000", proxies) == Origin("172.16.0.1")
    assert origin_of(FORWARDED, "ipv6:[::1]:40000", TrustedProxies([])) == Origin("::1")


def test_an_ipv6_peer_as_grpcio_writes_it_is_read() -> None:
    # grpcio escapes the brackets of an IPv6 peer: "ipv6:%5B::1%5D:50232".
    proxies = TrustedProxies(["::1", "fd00::/8"])
    assert peer_host("ipv6:%5B::1%5D:50232") == "::1"
    assert origin_of(FORWARDED, "ipv6:%5B::1%5D:50232", proxies) == Origin("203.0.113.7", "::1")
    assert origin_of(FORWARDED, "ipv6:%5Bfd00::5%5D:1", proxies) == Origin("203.0.113.7", "fd00::5")
    assert origin_of(FORWARDED, "ipv6:%5B2001:db8::1%5D:1", proxies) == Origin("2001:db8::1")


async def test_a_real_ipv6_call_counts_its_forwarded_address_from_a_trusted_peer() -> None:
    import grpc

    seen: list[str] = []

    class Probe(grpc.GenericRpcHandler):
        def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[bytes, bytes] | None:
            async def echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
                seen.append(context.peer())
                return request

            return grpc.unary_unary_rpc_method_handler(echo)

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((Probe(),))
    try:
        port = server.add_insecure_port("[::1]:0")
    except RuntimeError:
        pytest.skip("no IPv6 loopback here")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"[::1]:{port}") as channel:
            echo: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary("/probe/Echo")
            assert await echo(b"x", timeout=10) == b"x"
    finally:
        await server.stop(None)
    [peer] = seen
    assert peer_host(peer) == "::1", peer
    assert origin_of(FORWARDED, peer, TrustedProxies(["::1"])) == Origin("203.0.113.7", "::1")


def test_a_network_of_every_address_is_known_as_such() -> None:
    assert TrustedProxies(["0.0.0.0/0"]).everyone and TrustedProxies(["::/0", "10.0.0.1"]).everyone
    assert not TrustedProxies(["10.0.0.0/8", "::1"]).everyone and not TrustedProxies([]).everyone
    assert "198.51.100.1" in TrustedProxies(["0.0.0.0/0"])


def test_remembered_answers_stay_bounded() -> None:
    proxies = TrustedProxies(["10.0.0.0/8"])
    for n in range(5000):
        assert f"10.{n // 65536}.{n // 256 % 256}.{n % 256}" in proxies
    assert len(proxies._seen) <= 1024


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ("10.0.0.1/8", "'10.0.0.1/8' has host bits set: the network is 10.0.0.0/8"),
        ("envoy.internal", "'envoy.internal' is not an IP address or network"),
        ("10.0.0.0/33", "is not an IP address or network"),
    ],
)
def test_an_entry_that_is_no_address_or_network_is_refused_by_name(entry: str, says: str) -> None:
    with pytest.raises(ValueError) as caught:
        trusted_network(entry)
    assert says in str(caught.value)
    with pytest.raises(ValueError, match="trusted_proxies") as refused:
        Settings.load({"trusted_proxies": f"127.0.0.1,{entry}"}, environ={})
    assert says in str(refused.value)


def test_an_overlong_entry_is_not_echoed_whole() -> None:
    with pytest.raises(ValueError) as caught:
        trusted_network("x" * 10_000)
    assert len(str(caught.value)) < 200
