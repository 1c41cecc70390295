"""The HTTP service: `policy-engine serve` (see docs/serve.md).

Importing this package (or its modules `command`, `settings`, `context`, `pool`, `readiness`)
never imports FastAPI, Starlette, uvicorn or prometheus-client: the CLI registers the command at
start-up and `policy-engine --help` must stay light. The web stack is imported by
`policy_engine.serve.app` and the modules only it (or the running command) uses (`models`,
`errors`, `limits`, `accesslog`, `metrics`, `service`, `moderation`, `native`, `logs`).

Building the service without a socket (tests, embedding)::

    from policy_engine.serve.app import create_app
    from policy_engine.serve.pool import EnginePool
    from policy_engine.serve.settings import ServeSettings

    pool = EnginePool(["llavaguard"], "static", backend_options={"rating": "Unsafe"})
    app = create_app(ServeSettings(), pool)  # the lifespan loads the backend, then closes it
"""
