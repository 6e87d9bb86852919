"""Access control: token format, model, policy (authorize), store, audit, usage, sessions.

Pure values in, pure values out: nothing here imports aiohttp, aiortc, PyAV or sockets.
"""
