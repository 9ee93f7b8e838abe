"""What runs inside the ASGI app: the middleware (the per-request scope), and the diagnostics page
with the sockets that let it ask every worker."""
