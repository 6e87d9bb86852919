"""The link to TheRelay cloud (docs/relay-protocol.md): a sans-I/O protocol and its I/O."""
