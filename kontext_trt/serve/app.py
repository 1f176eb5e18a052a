"""The FastAPI app: OpenAI's image endpoints over a Runner (the local micro-batcher, or a Ray Serve replica's
@serve.batch), /healthz, /metrics and a page to try an edit."""
from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import Executor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from kontext_trt.core.errors import KontextError
from kontext_trt.core.specs import CacheSpec
from kontext_trt.runtime.flow import EditRequest, EditResult
from kontext_trt.safety.checker import ContentFlagged
from kontext_trt.serve import openai_api
from kontext_trt.serve.batcher import QueueFull
from kontext_trt.serve.metrics import Metrics
from kontext_trt.serve.openai_api import ApiError, bad_request
from kontext_trt.serve.service import Served

log = logging.getLogger(__name__)
PAGE = Path(__file__).with_name("page.html")
MAX_UPLOAD_BYTES = 32 * 2**20


class Runner(Protocol):
    """What the app runs requests on."""

    ready: bool  # loaded and warmed
    max_batch: int
    pool: Executor  # the worker threads that check, watermark and encode (never the model thread)

    async def submit(self, req: EditRequest) -> Served: ...

    def signer(self, result: EditResult) -> Callable[[bytes, str], bytes] | None: ...


@dataclass
class Settings:
    """Per-request limits and defaults of the app."""

    timeout_s: float = 300.0
    cache: CacheSpec = field(default_factory=CacheSpec)  # the step cache of requests that send none (serve --cache)


class ClientGone(Exception):
    """The client hung up before its answer was ready."""


async def until_answered(work: Awaitable[Any], request: Request, timeout_s: float) -> Any:
    """Await `work` for up to timeout_s (TimeoutError), watching the connection: a client that hangs up cancels it
    (ClientGone), and so does the timeout; a runner stops a cancelled request's batch between steps."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watch}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server cancelled this handler (Ray does when the client goes)
        task.cancel()
        raise
    finally:
        watch.cancel()
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)  # the request's cancel event is set once this returns
    raise ClientGone() if watch in done else TimeoutError()


async def disconnected(request: Request) -> None:
    """Return once the client has closed its connection (the body was read: the next ASGI message is the
    disconnect); never, where the server cannot tell."""
    try:
        while (await request.receive())["type"] != "http.disconnect":
            await asyncio.sleep(0.05)
    except Exception:  # noqa: BLE001 - a server that cannot report disconnects: wait for the answer or the timeout
        await asyncio.Event().wait()


def create_app(runner: Runner, metrics: Metrics, settings: Settings | None = None,
               lifespan: Callable[[FastAPI], AsyncIterator[None]] | None = None) -> FastAPI:
    """The app; `lifespan` loads the model and starts/stops the runner (none under Ray: the replica does)."""
    settings = settings or Settings()
    app = FastAPI(title="kontext-trt", description="FLUX.1 Kontext image edits, OpenAI Images API shapes",
                  lifespan=asynccontextmanager(lifespan) if lifespan else None)
    app.state.runner, app.state.metrics, app.state.settings = runner, metrics, settings

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(KontextError)
    async def kontext_error(request: Request, exc: KontextError) -> JSONResponse:
        return JSONResponse(bad_request(exc.message, exc.param, exc.code).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(ApiError(exc.status_code, str(exc.detail), kind).body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(bad_request(f"malformed request: {exc.errors()[0].get('msg')}", code="invalid_body").body(),
                            status_code=400)

    @app.middleware("http")
    async def count(request: Request, call_next):
        response = await call_next(request)
        if request.url.path.startswith("/v1/"):
            metrics.requests.labels(request.url.path, str(response.status_code)).inc()
        return response

    @app.post("/v1/images/edits")
    async def edits(request: Request) -> JSONResponse:
        start = time.perf_counter()
        try:
            form = await request.form(max_part_size=MAX_UPLOAD_BYTES)
        except Exception as exc:  # noqa: BLE001 - a malformed body is the client's fault
            raise bad_request(f"the body is not readable multipart/form-data ({exc}): send the fields as a form "
                              "with the image as a file", code="invalid_body") from None
        files = [value for key in ("image", "image[]") for value in form.getlist(key)]
        if len(files) != 1 or not isinstance(files[0], UploadFile):
            raise bad_request("send exactly one image file in the `image` field (Kontext edits one image)", "image",
                              "invalid_value" if files else "missing_argument")
        if "mask" in form:
            raise bad_request("mask is not supported: Kontext edits from the instruction alone", "mask",
                              "unsupported_parameter")
        if files[0].size is not None and files[0].size > MAX_UPLOAD_BYTES:
            raise ApiError(413, f"image is over {MAX_UPLOAD_BYTES >> 20} MiB: send a smaller file",
                           code="file_too_large", param="image")
        image = openai_api.read_image(await files[0].read())
        fields = {key: value for key, value in form.multi_items() if key not in ("image", "image[]")}
        return await answer(openai_api.parse_request(fields, image, runner_max_n(), defaults()), start, request)

    @app.post("/v1/images/generations")
    async def generations(request: Request) -> JSONResponse:
        start = time.perf_counter()
        try:
            body = await request.json()
        except ValueError:
            raise bad_request("the body is not JSON: send {\"prompt\": \"...\"}", code="invalid_body") from None
        if not isinstance(body, dict):
            raise bad_request("the body must be a JSON object like {\"prompt\": \"...\"}", code="invalid_body")
        return await answer(openai_api.parse_request(body, None, runner_max_n(), defaults()), start, request)

    def defaults() -> dict[str, str]:
        return {"cache": settings.cache}

    def runner_max_n() -> int:
        return min(openai_api.MAX_N, runner.max_batch)

    async def answer(req: EditRequest, start: float, request: Request) -> Response:
        if not runner.ready:
            raise ApiError(503, "the model is still loading: retry shortly", "server_error", "model_loading",
                           headers={"Retry-After": "5"})
        try:
            served = await until_answered(runner.submit(req), request, settings.timeout_s)
        except QueueFull as exc:
            raise ApiError(429, str(exc), "rate_limit_error", "queue_full",
                           headers={"Retry-After": str(exc.retry_after)}) from None
        except TimeoutError:
            raise ApiError(504, f"the edit took longer than the server's {settings.timeout_s:g}s timeout: retry, "
                           "or ask for fewer steps or a smaller size", "timeout", "timeout") from None
        except ClientGone:  # nobody reads this answer: its status is for the access log and /metrics
            return Response(status_code=499)
        except ContentFlagged as exc:
            metrics.observe_flagged(exc)
            raise openai_api.content_policy_violation(str(exc)) from None
        except KontextError as exc:  # a request the model cannot run (engine geometry, LoRA): its field and code
            raise bad_request(exc.message, exc.param, exc.code) from None
        except Exception as exc:  # noqa: BLE001 - one failed request, never a dead server
            log.exception("request failed")
            raise ApiError(500, f"the edit failed: {exc.__class__.__name__}: {exc}", "server_error") from None
        # PNG encoding (and C2PA signing) on the pool: ~134 ms per 1024x1024 image that must not stall the loop
        body = await asyncio.get_running_loop().run_in_executor(runner.pool, openai_api.response_body, served.result,
                                                                runner.signer(served.result))
        total = time.perf_counter() - start
        metrics.stage_latency.labels("request").observe(total)
        timing = f"{served.server_timing()}, total;dur={1e3 * total:.1f}"
        return JSONResponse(body, headers={"Server-Timing": timing, "X-Batch-Size": str(served.batch_images)})

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        if not runner.ready:
            return JSONResponse({"status": "loading", "pid": os.getpid()}, status_code=503)
        return JSONResponse({"status": "ok", "pid": os.getpid()})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text())

    return app
