"""HLS for viewers WebRTC cannot reach: LL-HLS with fMP4, muxed once per camera."""
