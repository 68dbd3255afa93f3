"""``grappa serve``: visual search over HTTP, on loopback unless told otherwise.

``GET /`` is an upload page; ``POST /`` (a form: ``image``, ``top_k``) answers it with the query
beside its neighbours as thumbnails; ``POST /api/search`` (the same form) answers JSON
``{"model_sha256", "hits": [{rank, score, image_id, uri, domain, label}]}``; ``GET /api/health``.
The index and the model it was built with are loaded once (:class:`grappa.use.Searcher`). An upload
that is not an image, or is larger than ``data.max_file_bytes``, is a one-line error (400 / 413).
"""
# no `from __future__ import annotations`: FastAPI reads the handlers' annotations as objects
import socket
import threading

from grappa.config import ConfigError, Params
from grappa.use import Searcher

MAX_TOP_K = 100  # a page of thumbnails, not an export
HIT_FIELDS = ("rank", "score", "image_id", "uri", "domain", "label")


class UploadError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def create_app(searcher: Searcher, host: str = "127.0.0.1"):
    """The web app around one loaded searcher, for clients of ``host``."""
    from fastapi import FastAPI, File, Form, UploadFile
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    from grappa.io import pages

    params = searcher.params
    lock = threading.Lock()  # one model: one forward pass at a time
    title, subtitle = "grappa search", f"{len(searcher.rows):,} catalogue images, model {searcher.built_by}"
    # FastAPI's /docs pages load their scripts from a CDN: off, nothing here fetches from outside
    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)
    if host in LOOPBACK:  # a web page cannot reach this server through a rebound DNS name
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=["127.0.0.1", "localhost", "[::1]"])

    @app.middleware("http")
    async def refuse_large_uploads(request, call_next):
        """413 before the body is read (Starlette would spool a whole upload to disk first)."""
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > params.data.max_file_bytes + (1 << 16):  # + the form's fields
            return JSONResponse({"error": f"the upload is larger than data.max_file_bytes "
                                          f"({params.data.max_file_bytes:,} bytes)"}, 413)
        return await call_next(request)

    async def query(image: UploadFile, top_k: int, thumbnails: bool) -> tuple[str, list[dict]]:
        """(the upload's thumbnail, its hits, with theirs if ``thumbnails``); UploadError for what the
        user can fix. Decoding, the forward pass and the thumbnails run off the event loop."""
        if not 1 <= top_k <= MAX_TOP_K:
            raise UploadError(400, f"top_k must be from 1 to {MAX_TOP_K}, got {top_k}")
        limit = params.data.max_file_bytes
        data = await image.read(limit + 1)
        if not data:
            raise UploadError(400, "no image was uploaded")
        if len(data) > limit:
            raise UploadError(413, f"{image.filename} is larger than data.max_file_bytes ({limit:,} bytes)")

        def run() -> tuple[str, list[dict]]:
            from grappa.io.sources import ImageDecodeError, decode_image

            try:  # decoded once, for the thumbnail and the query's embedding
                decoded = decode_image(data, 1, params.data.max_pixels)
            except ImageDecodeError:
                raise UploadError(400, f"{image.filename} is not an image that can be read (JPEG, PNG, WebP, ...)") from None
            thumb = pages.thumbnail_image(decoded)
            try:
                with lock:
                    hits = searcher.search([decoded], top_k)[0]
            except ConfigError as err:
                raise UploadError(400, f"{image.filename}: {err}") from None
            if thumbnails:
                hits = [{**hit, "thumb": searcher.thumbnail(hit["uri"])} for hit in hits]
            return thumb, hits

        return await run_in_threadpool(run)

    # async: answered on the event loop, never queued behind searches in the threadpool
    @app.get("/", response_class=HTMLResponse)
    async def upload_page() -> str:
        return pages.upload_page(title, subtitle, 5, MAX_TOP_K)

    @app.post("/", response_class=HTMLResponse)
    async def search_page(image: UploadFile = File(...), top_k: int = Form(5)):
        try:
            thumb, hits = await query(image, top_k, thumbnails=True)
        except UploadError as err:
            return HTMLResponse(pages.upload_page(title, subtitle, top_k, MAX_TOP_K, error=str(err)), err.status)
        row = pages.query_row({"thumb": thumb, "caption": [image.filename or "upload"]}, hits)
        result = pages.section(f"{image.filename}: the {len(hits)} nearest catalogue images", row)
        return pages.upload_page(title, subtitle, top_k, MAX_TOP_K, result=result)

    @app.post("/api/search")
    async def search_api(image: UploadFile = File(...), top_k: int = Form(5)):
        try:
            _, hits = await query(image, top_k, thumbnails=False)
        except UploadError as err:
            return JSONResponse({"error": str(err)}, err.status)
        return {"model_sha256": searcher.meta["model_sha256"],
                "hits": [{key: hit.get(key) for key in HIT_FIELDS} for hit in hits]}

    @app.get("/api/health")
    async def health() -> dict:
        return {"status": "ok", "images": len(searcher.rows), "model_sha256": searcher.meta["model_sha256"]}

    return app


def serve_command(params: Params, host: str, port: int, folder: str | None, model_ref: str | None) -> None:
    """`grappa serve`: load the index and its model, then answer on http://host:port/ until interrupted."""
    import uvicorn

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:  # a taken port is the user's to fix: one line, before loading anything
            probe.bind((host, port))
        except OSError as err:
            raise ConfigError(f"serve: cannot listen on {host}:{port} ({err.strerror}); pick another with --port") from None
        port = probe.getsockname()[1]  # --port 0: the free port the system chose, printed and served
    searcher = Searcher(params, folder, model_ref)
    print(f"grappa serve: http://{host}:{port}/ ({len(searcher.rows):,} catalogue images, "
          f"model {searcher.built_by}); Ctrl-C stops", flush=True)
    uvicorn.run(create_app(searcher, host), host=host, port=port, log_level="warning")
