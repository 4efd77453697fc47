"""rtcontour worker: series loading, contouring pipeline, RTSTRUCT writer, Celery tasks."""
