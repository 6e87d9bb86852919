"""Finding cameras (ONVIF WS-Discovery, mDNS), asking them for streams, adopting them."""
