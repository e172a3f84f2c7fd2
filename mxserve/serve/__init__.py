"""OpenAI-compatible HTTP server of the embedded engine (FastAPI + uvicorn + pydantic)."""
