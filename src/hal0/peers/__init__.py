"""Other hal0 nodes: their slots followed live, and the requests this node forwards to them."""

from hal0.peers.follow import Peers
from hal0.peers.forward import HOP_HEADER, PeerBackend
from hal0.peers.view import PeerStatus, PeerView, RemoteSlot

__all__ = ["HOP_HEADER", "PeerBackend", "PeerStatus", "PeerView", "Peers", "RemoteSlot"]
