"""The labeling page's HTTP side: the page, its JSON API and the folder's images.

    GET  /                      the page (static/label.html, static/label.js)
    GET  /api/session           folder, model, label rules, the train command
    GET  /api/state?client=ID[&index=I]   the image to show (the first pending one, or I) and its neighbours
    POST /api/label             {client, index, action: save|skip|unreadable, label, base} -> the next image
    GET  /image/<path>          an image of the folder, and nothing else
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.middleware.trustedhost import TrustedHostMiddleware

from captcha_lit.labeling.session import LabelProblem, LabelSession
from captcha_lit.labeling.store import Conflict, describe_state
from captcha_lit.preprocess import ImageDecodeError, open_image

STATIC = Path(__file__).with_name("static")
BROWSER_IMAGES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp"}  # others are sent as PNG
IMAGE_CACHE = "private, max-age=3600"  # an image's bytes do not change while it is labeled


class Decision(BaseModel):
    client: str = Field(min_length=1, max_length=100, description="the tab's id")
    index: int = Field(description="the image's place in the page order")
    action: Literal["save", "skip", "unreadable"]
    label: str = Field("", max_length=200)
    base: str = Field(description="the image's state when the page showed it: pending, labeled:<label>, ...")


def create_app(session: LabelSession, *, host: str = "127.0.0.1") -> FastAPI:
    app = FastAPI(title="captcha_lit label", docs_url=None, redoc_url=None, openapi_url=None)
    # Another site's page in the same browser must not reach the labels through a DNS name it controls.
    if host not in ("0.0.0.0", "::"):
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=sorted({"127.0.0.1", "localhost", "[::1]", host}))
    page = (STATIC / "label.html").read_text(encoding="utf-8")
    script = (STATIC / "label.js").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    @app.get("/label.js")
    def label_js() -> Response:
        return Response(script, media_type="text/javascript", headers={"Cache-Control": "no-store"})

    @app.get("/api/session")
    def session_info() -> dict:
        return session.info()

    # The page's calls run on the event loop: a decision is a few milliseconds of work (its file is
    # flushed to disk), and a hop to the thread pool would add to the time before the next image.
    @app.get("/api/state")
    async def state(client: str, index: int | None = None) -> dict:
        try:
            return session.goto(client, index)
        except IndexError as exc:
            raise HTTPException(404, str(exc)) from None

    @app.post("/api/label")
    async def decide(decision: Decision):
        try:
            return session.act(decision.client, decision.index, decision.action, decision.label, decision.base)
        except IndexError as exc:
            raise HTTPException(404, str(exc)) from None
        except LabelProblem as exc:
            raise HTTPException(422, str(exc)) from None
        except Conflict as exc:
            return JSONResponse({"detail": f"another tab changed this image: it is now {describe_state(exc.state)}",
                                 "item": session.item(decision.index)}, status_code=409)

    @app.get("/image/{relpath:path}")
    def image(relpath: str) -> Response:
        path = session.image_file(relpath)
        if path is None:
            raise HTTPException(404, f"{relpath!r} is not an image file under {session.root}")
        if path.suffix.lower() in BROWSER_IMAGES:
            return FileResponse(path, headers={"Cache-Control": IMAGE_CACHE})
        try:  # TIFF, PPM, ...: a browser shows them only as PNG
            buffer = io.BytesIO()
            open_image(path, name=relpath).save(buffer, format="PNG")
        except ImageDecodeError as exc:
            raise HTTPException(422, str(exc)) from None
        return Response(buffer.getvalue(), media_type="image/png", headers={"Cache-Control": IMAGE_CACHE})

    return app

