"""Run the real app under uvicorn on a loopback port, in a thread of the test process."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from jaxattn.serve.api_server import build_app
from jaxattn.serve.async_engine import AsyncEngine
from jaxattn.serve.metrics import EngineMetrics


class LiveServer:
    def __init__(self, engine, model_name="test-model", **app_kwargs):
        self.metrics = EngineMetrics(model_name)
        engine.attach_metrics(self.metrics)
        self.engine = engine
        self.async_engine = AsyncEngine(engine)
        app = build_app(self.async_engine, model_name=model_name, metrics=self.metrics,
                        **app_kwargs)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
