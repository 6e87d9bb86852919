"""Media: camera sources (RTSP, test pattern, file), the per-camera hub, snapshots.

Packets are demuxed, never decoded on the hot path; blocking PyAV work runs in threads.
"""
