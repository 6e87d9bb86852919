"""The agent's LAN HTTP server (aiohttp): ``/healthz``, WHEP viewing (``whep.py``), snapshots,
the camera list, the viewer page and Token Studio (``views.py``), the admin API and its
OpenAPI document (``admin.py``, ``openapi.py``) and ``/metrics``. Every handler but
``/healthz`` and the static pages asks ``agent.access`` whether the presented token may."""
