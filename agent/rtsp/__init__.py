"""RTSP 1.0 server for LAN clients (VMS, NVRs, VLC, FFmpeg) with access tokens."""
