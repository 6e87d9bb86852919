"""The state layer: the one SQLite database in ``state_dir`` and what lives in it.

``db`` opens and migrates the file and gives the transaction helper; ``database.StateDB`` is
the shared connection every table module works on; ``outbox.RelayOutbox`` is the relay's
usage outbox. The modules on top — ``access.store.TokenStore`` (tokens),
``discovery.adopted.AdoptedCameras`` (adopted cameras and sightings) — each take a
``StateDB`` in their constructor. Nothing here imports the daemon or any domain package.
"""
