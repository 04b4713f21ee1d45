"""`dspark serve`: an OpenAI-compatible HTTP server on the library API (dspark_cli.api.Pair).

schemas.py reads and checks requests and writes responses and errors in OpenAI's shapes; worker.py admits
requests to the pair's slots in arrival order, behind a bounded queue, and runs their generations in threads;
app.py is the Starlette app that ties them to the routes; protocol.py is uvicorn's HTTP protocol with a deadline
for each request's head (slow clients). Starlette and uvicorn are the stack: small, maintained, and an ASGI app is plain
async code with nothing hidden (FastAPI would add validation with 422 answers, where OpenAI's clients expect
400 with OpenAI's error object).
"""
