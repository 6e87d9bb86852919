"""The agent's local HTTP server (aiohttp): health now; WHEP, snapshots, pages and API later."""
