"""The labeling app (FastAPI): labeling page, admin page and their JSON API.

Authentication: each labeler has a personal token (``tether label add-labeler NAME``).
Opening ``/login?token=…`` sets an HttpOnly, SameSite=Lax cookie and redirects to the
page, so the token leaves the address bar. Scripts may instead send ``Authorization:
Bearer <token>``. Cookie-authenticated writes must carry the page's CSRF token in an
``X-CSRF-Token`` header (an HMAC of the session, checked in constant time); bearer
requests cannot be forged cross-site and need none.

Model outputs are data, never markup: the pages insert every prompt and response with
``textContent``, the API returns JSON, and the pages send a strict Content-Security-Policy
(no inline event handlers, scripts from this origin only).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response

from tether.labeling.store import LabelStore, NotAssigned, StoreError, hash_token

__all__ = ["create_app"]

COOKIE = "tether_label"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


def _asset(name: str) -> str:
    return resources.files("tether.labeling").joinpath("static", name).read_text(encoding="utf-8")


def create_app(db: str, *, overlap: int | None = None, secret: str | None = None) -> FastAPI:
    store = LabelStore(db, overlap=overlap)
    key = (secret or store.secret()).encode()
    app = FastAPI(title="Tether labeling", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store = store

    def csrf_for(token: str) -> str:
        return hmac.new(key, hash_token(token).encode(), hashlib.sha256).hexdigest()

    def auth(request: Request, *, write: bool = False, admin: bool = False):
        """The labeler of this request, or an error response."""
        header = request.headers.get("authorization", "")
        token, via_cookie = None, False
        if header.lower().startswith("bearer "):
            token = header[7:].strip()
        elif request.cookies.get(COOKIE):
            token, via_cookie = request.cookies[COOKIE], True
        if not token:
            return None, _error(401, "no token: open your personal link (/login?token=...) or send a bearer token")
        who = store.labeler_by_token(token)
        if who is None:
            return None, _error(401, "unknown token")
        if admin and not who["is_admin"]:
            return None, _error(403, "the admin token is needed here")
        if write and via_cookie:
            sent = request.headers.get("x-csrf-token", "").encode("utf-8", "replace")
            if not hmac.compare_digest(sent, csrf_for(token).encode()):
                return None, _error(403, "missing or wrong CSRF token")
        return (who | {"token": token}), None

    def page(name: str, who: dict) -> HTMLResponse:
        html = _asset(name).replace("{{csrf}}", csrf_for(who["token"])).replace("{{name}}", _escape(who["name"]))
        return HTMLResponse(html, headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                                           "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"})

    @app.get("/")
    def root():
        return RedirectResponse("/label", status_code=303)

    @app.get("/login")
    def login(request: Request, token: str = ""):
        who = store.labeler_by_token(token)
        if who is None:
            return HTMLResponse("<!doctype html><title>Tether labeling</title><p>Unknown or missing token. "
                                "Ask for your personal link.</p>", status_code=401)
        resp = RedirectResponse("/admin" if who["is_admin"] else "/label", status_code=303)
        # Lax, not Strict: a personal link opened from mail or chat is a cross-site navigation,
        # and a Strict cookie would not follow its redirect. Writes need the CSRF header anyway.
        resp.set_cookie(COOKIE, token, httponly=True, samesite="lax", max_age=30 * 24 * 3600,
                        secure=request.url.scheme == "https")
        return resp

    @app.get("/logout")
    def logout():
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(COOKIE)
        return resp

    @app.get("/label")
    def label_page(request: Request):
        who, err = auth(request)
        return err if err else page("label.html", who)

    @app.get("/admin")
    def admin_page(request: Request):
        who, err = auth(request, admin=True)
        return err if err else page("admin.html", who)

    @app.get("/static/{name}")
    def static(name: str):
        if name not in ("label.js", "admin.js", "style.css"):
            return _error(404, "not found")
        kind = "text/css" if name.endswith(".css") else "text/javascript"
        return Response(_asset(name), media_type=kind, headers={"X-Content-Type-Options": "nosniff",
                                                               "Cache-Control": "no-cache"})

    @app.get("/api/next")
    def next_item(request: Request):
        who, err = auth(request)
        if err:
            return err
        item = store.next_item(who["id"])
        body = {"item": None if item is None else {k: item[k] for k in ("id", "prompt", "responses")},
                "progress": store.progress(who["id"]), "labeler": who["name"]}
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    @app.post("/api/labels")
    async def submit(request: Request):
        who, err = auth(request, write=True)
        if err:
            return err
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the body must be JSON")
        if not isinstance(body, dict) or not isinstance(body.get("item_id"), int):
            return _error(400, "item_id (an integer) is required")
        try:
            label, created = await run_in_threadpool(  # the database waits off the event loop
                store.submit, who["id"], body["item_id"], body.get("submission"), ranking=body.get("ranking"),
                rubric=body.get("rubric"), comment=body.get("comment") or "", skipped=bool(body.get("skipped")),
                seconds=body.get("seconds") if isinstance(body.get("seconds"), (int, float)) else None)
        except NotAssigned as exc:
            return _error(403, str(exc))
        except StoreError as exc:
            return _error(409 if "already" in str(exc) else 400, str(exc))
        return JSONResponse({"label": label, "created": created}, status_code=201 if created else 200)

    @app.get("/api/labels")
    def my_labels(request: Request):
        who, err = auth(request)
        return err if err else JSONResponse({"labels": store.labels(who["id"], include_skipped=True)})

    @app.get("/api/labels/{label_id}")
    def one_label(label_id: int, request: Request):
        who, err = auth(request)
        if err:
            return err
        mine = [lab for lab in store.labels(who["id"], include_skipped=True) if lab["id"] == label_id]
        return JSONResponse({"label": mine[0]}) if mine else _error(404, "no such label of yours")

    @app.get("/api/admin/stats")
    def stats(request: Request):
        who, err = auth(request, admin=True)
        return err if err else JSONResponse(admin_stats(store))

    @app.get("/api/admin/export")
    def export(request: Request, kind: str = "rankings"):
        who, err = auth(request, admin=True)
        if err:
            return err
        if kind not in ("rankings", "pairs"):
            return _error(400, "kind must be rankings or pairs")
        records = export_records(store, kind)
        return PlainTextResponse("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                                 media_type="application/x-ndjson",
                                 headers={"Content-Disposition": f'attachment; filename="{kind}.jsonl"'})

    return app


def admin_stats(store: LabelStore) -> dict:
    """Progress, per-labeler counts and agreement with the others' consensus, and the
    dataset's agreement statistics (Krippendorff's α over raters × response pairs)."""
    from tether.feedback.aggregate import agreement_stats

    rankings = store.rankings()
    agreement = agreement_stats(rankings) if rankings else {}
    per = {lab["name"]: {"labels": 0, "skipped": 0, "seconds": []} for lab in store.labelers()}
    for lab in store.labels(include_skipped=True):
        row = per.setdefault(lab["rater"], {"labels": 0, "skipped": 0, "seconds": []})
        row["skipped" if lab["skipped"] else "labels"] += 1
        if lab["seconds"] is not None and not lab["skipped"]:
            row["seconds"].append(lab["seconds"])
    quality = agreement.get("raters") or {}
    labelers = []
    for name, row in per.items():
        secs = sorted(row["seconds"])
        labelers.append({"name": name, "labels": row["labels"], "skipped": row["skipped"],
                         "median_seconds": secs[len(secs) // 2] if secs else None,
                         "agreement_with_consensus": (quality.get(name) or {}).get("agreement_with_consensus"),
                         "pairs_scored": (quality.get(name) or {}).get("items")})
    return {"progress": store.progress(), "labelers": labelers,
            "agreement": {k: v for k, v in agreement.items() if k != "raters"}}


def export_records(store: LabelStore, kind: str = "rankings") -> list[dict]:
    """Labels as ranking records (ties as nested lists) or TRL-style pairs."""
    from tether.data.schemas import ranking_record, rankings_to_pairs

    rankings = store.rankings()
    if kind == "pairs":
        return rankings_to_pairs(rankings)
    return [ranking_record(r) for r in rankings]


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers={"Cache-Control": "no-store"})


def _escape(text: str) -> str:
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
            .replace("'", "&#39;"))
