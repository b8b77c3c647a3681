"""What runs the service: settings, trust, the composition root, the server, logs."""
