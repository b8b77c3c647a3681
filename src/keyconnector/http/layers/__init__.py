"""Single-purpose ASGI layers around the endpoints; their order is composed in one place,
``keyconnector.http.app._layers``."""
