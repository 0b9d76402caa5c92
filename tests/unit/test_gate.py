"""The gate for connections that have not said hello yet (pure bookkeeping)."""

from __future__ import annotations

from pbt_server.server import Gate, peer_key


def test_one_peer_gets_half_the_places_then_a_few() -> None:
    gate = Gate(per_listener=8, per_peer=2)
    for n in range(4):
        assert gate.admit("tcp", "10.0.0.1", n) == (None, None)
    refused, displaced = gate.admit("tcp", "10.0.0.1", 99)
    assert refused == "4 connections from 10.0.0.1 have not said hello yet"
    assert displaced is None


def test_a_full_gate_displaces_the_connection_that_waited_longest() -> None:
    gate = Gate(per_listener=4, per_peer=1)
    for n, peer in enumerate(["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]):
        assert gate.admit("tcp", peer, n) == (None, None)
    assert gate.admit("tcp", "10.0.0.5", "newcomer") == (None, 0)
    assert list(gate.pending["tcp"]) == [1, 2, 3, "newcomer"]
    assert "10.0.0.1" not in gate.peers
    gate.leave("tcp", 0)  # the displaced one's own close later: nothing more to do
    assert len(gate.pending["tcp"]) == 4


def test_leaving_frees_the_place_once() -> None:
    gate = Gate(per_listener=2, per_peer=1)
    gate.admit("unix", None, "a")
    gate.leave("unix", "a")
    gate.leave("unix", "a")
    assert gate.pending["unix"] == {}
    assert gate.admit("unix", None, "b") == (None, None)


def test_an_ipv6_peer_is_counted_by_its_64() -> None:
    assert (
        peer_key("2001:db8:1:2:aaaa::1")
        == peer_key("2001:db8:1:2:bbbb::2")
        == ("2001:db8:1:2::/64")
    )
    assert peer_key("2001:db8:1:3::1") != peer_key("2001:db8:1:2::1")
    assert peer_key("192.0.2.7") == "192.0.2.7"
