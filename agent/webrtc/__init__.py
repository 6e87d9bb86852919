"""WebRTC with aiortc: passthrough tracks from the hub, the answering peer, ICE choices."""
