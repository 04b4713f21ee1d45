"""`dspark serve`: an OpenAI-compatible HTTP server on the library API (dspark_cli.api.Pair).

schemas.py reads and checks requests and writes responses and errors in OpenAI's shapes; worker.py runs one
generation at a time in a thread, in arrival order, behind a bounded queue; app.py is the Starlette app that
ties them to the routes. Starlette and uvicorn are the stack: small, maintained, and an ASGI app is plain
async code with nothing hidden (FastAPI would add validation with 422 answers, where OpenAI's clients expect
400 with OpenAI's error object).
"""
