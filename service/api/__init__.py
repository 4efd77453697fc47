"""The HTTP API and dashboard of rtcontour; ``create_app(settings)`` in ``app.py`` builds it."""
