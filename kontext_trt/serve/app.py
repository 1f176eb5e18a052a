"""The FastAPI app: OpenAI's image endpoints over a Runner (the local micro-batcher, or a Ray Serve replica's
@serve.batch), /v1/models, /healthz, /metrics and a page to try an edit; access.Guard in front (Host, Origin, API
key, body caps) and CORS only for --cors-origin."""
from __future__ import annotations

import asyncio
import json
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
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect

from kontext_trt.core.errors import KontextError
from kontext_trt.core.family import MAX_REFERENCES
from kontext_trt.core.specs import CacheSpec
from kontext_trt.runtime.flow import EditRequest, EditResult
from kontext_trt.safety.checker import ContentFlagged
from kontext_trt.serve import openai_api
from kontext_trt.serve.access import LOOPBACK_HOSTS, Access, Guard
from kontext_trt.serve.batcher import QueueFull
from kontext_trt.serve.forms import MAX_FIELD_BYTES, MAX_PARTS, Form, read_form, read_json_edit
from kontext_trt.serve.metrics import Metrics
from kontext_trt.serve.openai_api import ApiError, Limits, bad_request
from kontext_trt.serve.service import Served

log = logging.getLogger(__name__)
PAGE = Path(__file__).with_name("page.html")
EDITS = "/v1/images/edits"
DEFAULT_MODEL_ID = "flux.1-kontext"
IMAGE_FIELDS = ("image", "image[]")  # one image, or a list as the openai SDK sends it (image[] once per image)


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
    limits: Limits = field(default_factory=Limits)
    api_key: str | None = field(default=None, repr=False)  # None: no key asked
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS  # Host header names answered (empty or "*": any)
    cors_origins: tuple[str, ...] = ()  # origins whose pages may call the API (CORS); none: CORS off
    model_id: str = DEFAULT_MODEL_ID  # the id /v1/models lists
    hidden_paths: tuple[str, ...] = ()  # the server's folders: error messages name them by their last part only
    started: int = field(default_factory=lambda: int(time.time()))

    def access(self) -> Access:
        """The Guard's settings: an upload may bring its image plus MAX_PARTS fields."""
        return Access(self.api_key, self.allowed_hosts, self.cors_origins,
                      {EDITS: self.limits.max_upload_bytes + MAX_PARTS * MAX_FIELD_BYTES})


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
    limits = settings.limits

    def error(exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(settings.hidden_paths), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error(exc)

    @app.exception_handler(KontextError)
    async def kontext_error(request: Request, exc: KontextError) -> JSONResponse:
        return error(bad_request(exc.message, exc.param, exc.code))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error(ApiError(exc.status_code, str(exc.detail), kind, code))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s", request.url.path, exc_info=exc)
        return error(ApiError(500, f"the server failed ({exc.__class__.__name__}): see its log", "server_error",
                              "server_error"))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error(bad_request(f"malformed request: {exc.errors()[0].get('msg')}", code="invalid_body"))

    @app.middleware("http")
    async def count(request: Request, call_next):
        response = await call_next(request)
        if request.url.path.startswith("/v1/"):
            metrics.requests.labels(request.url.path, str(response.status_code)).inc()
        return response

    @app.post(EDITS)
    async def edits(request: Request) -> JSONResponse:
        start = time.perf_counter()
        try:
            form = await read_edit(request)
        except ClientDisconnect:
            raise bad_request("the client disconnected before sending the whole form", code="invalid_body") from None
        files = [data for key, data in form.files if key in IMAGE_FIELDS]
        names = {key for key, _ in form.fields} | {key for key, _ in form.files}
        if "mask" in names:
            raise bad_request("mask is not supported: Kontext edits from the instruction alone", "mask",
                              "unsupported_parameter")
        if {key for key, _ in form.fields} & set(IMAGE_FIELDS):
            raise bad_request("image must be a file: send it as a file part (curl -F image=@in.png)", "image",
                              "invalid_type")
        other = sorted({key for key, _ in form.files} - set(IMAGE_FIELDS))
        if other:
            raise bad_request(f"unrecognized file field {openai_api.shown(other[0])}: send images as `image` (one) or "
                              "`image[]` (several, in order)", other[0], "unknown_parameter")
        if sum(key == "image" for key, _ in form.files) > 1:
            raise bad_request("send one image in the `image` field, or several as `image[]` parts (in order)",
                              "image", "invalid_value")
        if not files:
            raise bad_request("send an image file in the `image` field (several as `image[]`)", "image",
                              "missing_argument")
        if len(files) > MAX_REFERENCES:
            raise bad_request(f"{len(files)} images were sent: at most {MAX_REFERENCES} are taken (FLUX.2 [klein]; "
                              "FLUX.1 Kontext edits one)", "image", "out_of_range")
        fields = dict(form.fields)
        output = openai_api.parse_output(fields)
        openai_api.parse_request(fields, None, limits, defaults())  # refuse bad fields before decoding the images
        images = [await run_in_threadpool(openai_api.read_image, data, limits.max_pixels) for data in files]
        return await answer(openai_api.parse_request(fields, images, limits, defaults()), output, start,
                            request)

    async def read_edit(request: Request) -> Form:
        """An edit's body: multipart/form-data (or urlencoded), or JSON with data-URL images."""
        content_type = request.headers.get("content-type")
        if (content_type or "").split(";")[0].strip().lower() == "application/json":
            return read_json_edit(await request.body(), limits.max_upload_bytes)
        return await read_form(content_type, request.stream(), limits.max_upload_bytes)

    @app.post("/v1/images/generations")
    async def generations(request: Request) -> JSONResponse:
        start = time.perf_counter()
        try:
            body = json.loads(await request.body())
        except (ValueError, RecursionError):
            raise bad_request("the body is not JSON: send {\"prompt\": \"...\"}", code="invalid_body") from None
        except ClientDisconnect:
            raise bad_request("the client disconnected before sending the whole body", code="invalid_body") from None
        if not isinstance(body, dict):
            raise bad_request("the body must be a JSON object like {\"prompt\": \"...\"}", code="invalid_body")
        output = openai_api.parse_output(body)
        return await answer(openai_api.parse_request(body, None, limits, defaults()), output, start, request)

    def defaults() -> dict[str, str]:
        return {"cache": settings.cache}

    async def submit_all(reqs: list[EditRequest]) -> list[Served]:
        """Each image of a request as its own request (seed + i), so n splits across batches; should one fail,
        the others are withdrawn."""
        tasks = [asyncio.ensure_future(runner.submit(req)) for req in reqs]
        try:
            return await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()

    async def answer(req: EditRequest, output: openai_api.Output, start: float, request: Request) -> Response:
        if not runner.ready:
            raise ApiError(503, "the model is still loading: retry shortly", "server_error", "model_loading",
                           headers={"Retry-After": "5"})
        try:
            served = await until_answered(submit_all(openai_api.per_image(req)), request, settings.timeout_s)
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
        except KontextError as exc:  # a request the model cannot run (family, engine geometry, LoRA): its field and code
            raise bad_request(exc.message, exc.param, exc.code) from None
        except Exception as exc:  # noqa: BLE001 - one failed request, never a dead server
            log.exception("request failed")  # the traceback stays in the log; the body names no path (hide_paths)
            raise ApiError(500, f"the edit failed: {exc.__class__.__name__}: {str(exc)[:300]}",
                           "server_error", "server_error") from None
        total = time.perf_counter() - start
        metrics.stage_latency.labels("request").observe(total)
        results = [s.result for s in served]
        # encoding (and C2PA signing) on the pool: ~134 ms per 1024x1024 PNG that must not stall the loop
        body = await asyncio.get_running_loop().run_in_executor(
            runner.pool, openai_api.response_body, results, [runner.signer(result) for result in results], output)
        timing = f"{served[0].server_timing()}, total;dur={1e3 * total:.1f}"
        return JSONResponse(body, headers={"Server-Timing": timing,
                                           "X-Batch-Size": str(max(s.batch_images for s in served))})

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> JSONResponse:
        if model_id != settings.model_id:
            raise ApiError(404, f"the model {openai_api.shown(model_id)} does not exist here: this server serves "
                           f"{settings.model_id!r}", code="model_not_found", param="model")
        return JSONResponse(model_card())

    def model_card() -> dict:
        return {"id": settings.model_id, "object": "model", "created": settings.started, "owned_by": "kontext-trt"}

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

    app.add_middleware(Guard, access=settings.access())
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600,
                           expose_headers=["Server-Timing", "X-Batch-Size", "Retry-After"])
    return app
