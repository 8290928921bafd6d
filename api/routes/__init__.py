"""The HTTP routes, one module per resource; `api.app` includes their routers."""
