"""Serving: an OpenAI-compatible image-edit server (FastAPI + uvicorn) with micro-batching, and its Ray Serve
deployment for many GPUs and nodes."""
