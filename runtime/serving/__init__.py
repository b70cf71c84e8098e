"""Serving: the OpenAI-compatible server (request parsing, the service, HTTP transport), metrics, Ray."""
