"""Single-purpose ASGI layers around the endpoints."""
