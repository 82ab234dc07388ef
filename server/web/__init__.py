"""The HTTP edge: the app factory, the URL map, thin handlers, the one exception-to-HTTP
mapping, access control, rate limits, TLS, the dashboard's files and the OpenAPI document."""
