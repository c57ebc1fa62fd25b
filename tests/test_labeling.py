"""The labeling app: storage and scheduling, the HTTP API's safety (tokens, CSRF, other
labelers' items, model output shown as text), 20 labelers at once over real HTTP, and the
pages in headless Chromium driven by Playwright (mouse and keyboard)."""

from __future__ import annotations

import json
import re
import shutil
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

import pytest

from tether.labeling.store import LabelStore, NotAssigned, StoreError

XSS = ['<script>window.__pwned = 1</script>', '<img src=x onerror="window.__pwned = 2">']


def _items(n, k=3, prefix="p"):
    return [{"prompt": f"{prefix}{i}: which is best?", "responses": [f"answer {j} to {prefix}{i}" for j in range(k)]}
            for i in range(n)]


# ----------------------------------------------------------------------------- the store


@pytest.fixture(scope="module")
def postgres_server():
    """A throwaway PostgreSQL server (Debian's postgresql package), or a skip."""
    import glob
    import os
    import socket
    import subprocess
    import tempfile
    from pathlib import Path

    pytest.importorskip("psycopg")
    initdb = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not initdb:
        pytest.skip("no PostgreSQL server binaries (Debian: apt-get install postgresql)")
    bindir = Path(initdb[-1]).parent
    run = []
    if os.geteuid() == 0:  # initdb refuses root: run the server as the postgres user
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user")
        run = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="tether-pg-"))
    root.chmod(0o755)
    if run:
        shutil.chown(root, "postgres", "postgres")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    data, log = root / "data", root / "log"
    subprocess.run(run + [str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "tether"], check=True,
                   capture_output=True)
    subprocess.run(run + [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-o",
                          f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql://tether@127.0.0.1:{port}"
    finally:
        subprocess.run(run + [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    """A fresh labeling database: a SQLite file, or a new database on the PostgreSQL server."""
    if request.param == "sqlite":
        return str(tmp_path / "l.sqlite")
    import psycopg

    server = request.getfixturevalue("postgres_server")
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return f"{server}/{name}"


def test_scheduling_overlap_and_no_item_twice(db_url):
    store = LabelStore(db_url, overlap=2)
    tokens = [store.add_labeler(n) for n in ("ann", "bob", "cy")]
    ids = [store.labeler_by_token(t)["id"] for t in tokens]
    store.add_items(_items(3))
    seen = {i: [] for i in ids}
    for _ in range(3):
        for lab in ids:
            item = store.next_item(lab)
            if item is None:
                continue
            assert store.next_item(lab)["id"] == item["id"]  # asked again: the same open item
            seen[lab].append(item["id"])
            store.submit(lab, item["id"], uuid.uuid4().hex, ranking=[0, 1, 2])
    assert all(len(v) == len(set(v)) for v in seen.values())  # nobody saw an item twice
    labels = store.labels()
    per_item = {}
    for lab in labels:
        per_item[lab["item_id"]] = per_item.get(lab["item_id"], 0) + 1
    assert per_item == {1: 2, 2: 2, 3: 2}  # every item got exactly `overlap` labelers
    assert all(store.next_item(i) is None for i in ids)
    assert store.progress()["items_complete"] == 3


def test_submissions_are_idempotent_and_checked(db_url):
    store = LabelStore(db_url)
    ann = store.labeler_by_token(store.add_labeler("ann"))["id"]
    bob = store.labeler_by_token(store.add_labeler("bob"))["id"]
    store.add_items(_items(2))
    item = store.next_item(ann)["id"]
    first, created = store.submit(ann, item, "click-0001", ranking=[2, [0, 1]], rubric={"helpful": 4})
    again, created2 = store.submit(ann, item, "click-0001", ranking=[2, [0, 1]], rubric={"helpful": 4})
    assert created and not created2 and first == again and len(store.labels()) == 1
    with pytest.raises(StoreError, match="already"):
        store.submit(ann, item, "click-0002", ranking=[0, 1, 2])
    with pytest.raises(NotAssigned):
        store.submit(bob, item, "click-0003", ranking=[0, 1, 2])  # item 1 went to ann (overlap 1)
    other = store.next_item(ann)["id"]
    for bad, match in (([0, 1], "each of 0..2"), ([0, 0, 1], "each of 0..2"), ("0,1,2", "list"),
                       ([[0], True, 2], "each of 0..2")):
        with pytest.raises(StoreError, match=match):
            store.submit(ann, other, "click-0004", ranking=bad)
    with pytest.raises(StoreError, match="1-5"):
        store.submit(ann, other, "click-0005", ranking=[0, 1, 2], rubric={"helpful": 9})
    with pytest.raises(StoreError, match="rubric"):
        store.submit(ann, other, "click-0006", ranking=[0, 1, 2], rubric={"funny": 3})
    with pytest.raises(StoreError, match="seconds"):
        store.submit(ann, other, "click-0007", ranking=[0, 1, 2], seconds=float("inf"))
    with pytest.raises(StoreError, match="used already"):  # a submission id of another item
        store.submit(ann, other, "click-0001", ranking=[0, 1, 2])
    [r] = store.rankings()
    assert (r.order, r.tiers, r.rater) == ([2, 0, 1], [0, 1, 1], "ann")


def test_a_lapsed_turn_does_not_overfill_an_item(tmp_path, monkeypatch):
    import time

    from tether.labeling import store as store_module

    store = LabelStore(tmp_path / "l.sqlite", overlap=2)
    a, b, c = (store.labeler_by_token(store.add_labeler(n))["id"] for n in ("a", "b", "c"))
    store.add_items(_items(1))
    assert store.next_item(a)["id"] == 1
    assert store.next_item(b)["id"] == 1 and store.next_item(c) is None  # a's and b's turns fill it
    monkeypatch.setattr(store_module, "ASSIGNMENT_TTL", 0.05)
    time.sleep(0.1)  # a walks away; their turn lapses and c gets the item
    assert store.next_item(c)["id"] == 1
    store.submit(b, 1, "b-00000001", ranking=[0, 1, 2])
    store.submit(c, 1, "c-00000001", ranking=[1, 0, 2])
    assert store.next_item(a) is None  # full now: a is not given it again
    with pytest.raises(StoreError, match="has its 2 labels already"):
        store.submit(a, 1, "a-00000001", ranking=[0, 1, 2])
    assert len(store.labels()) == 2


# ----------------------------------------------------------------------------- the API


@pytest.fixture()
def app_and_tokens(tmp_path):
    from tether.labeling.app import create_app

    app = create_app(str(tmp_path / "l.sqlite"), overlap=2)
    store = app.state.store
    tokens = {"ann": store.add_labeler("ann"), "bob": store.add_labeler("bob"),
              "admin": store.add_labeler("boss", admin=True)}
    store.add_items([{"prompt": "Say hi <b>bold</b>", "responses": XSS + ["plain & simple"]}])
    store.add_items(_items(3))
    return app, tokens


def _bearer(token):
    return {"Authorization": f"Bearer {token}"}


def test_tokens_csrf_and_other_labelers_items_are_refused(app_and_tokens):
    from fastapi.testclient import TestClient

    app, tok = app_and_tokens
    c = TestClient(app)
    assert c.get("/api/next").status_code == 401
    assert c.get("/api/next", headers=_bearer("wrong")).status_code == 401
    assert c.get("/label").status_code == 401
    assert c.get("/login?token=wrong").status_code == 401
    assert c.get("/admin", headers=_bearer(tok["ann"])).status_code == 403
    assert c.get("/api/admin/export", headers=_bearer(tok["ann"])).status_code == 403
    LabelStore(app.state.store.path, overlap=1)  # one labeler per item: ann's item is hers alone
    item = c.get("/api/next", headers=_bearer(tok["ann"])).json()["item"]
    assert "gold" not in item
    assert c.get("/api/next", headers=_bearer(tok["bob"])).json()["item"]["id"] != item["id"]
    r = c.post("/api/labels", headers=_bearer(tok["bob"]), json={"item_id": item["id"], "submission": "bob-00001",
                                                                    "ranking": list(range(len(item["responses"])))})
    assert r.status_code == 403 and "not given to you" in r.json()["error"]
    assert c.post("/api/labels", headers={**_bearer(tok["ann"])}, content=b"not json").status_code == 400
    body = {"item_id": item["id"], "submission": "ann-000001", "ranking": [1, 0, 2], "rubric": {"honest": 5}}
    if len(item["responses"]) == 3:
        body["ranking"] = [2, [0, 1]]
    # a cookie session must send the page's CSRF token
    c.get(f"/login?token={tok['ann']}", follow_redirects=False)
    assert c.post("/api/labels", json=body).status_code == 403
    page = c.get("/label")
    assert page.status_code == 200 and "default-src 'none'" in page.headers["content-security-policy"]
    csrf = re.search(r'name="csrf" content="([0-9a-f]+)"', page.text).group(1)
    assert c.post("/api/labels", json=body, headers={"X-CSRF-Token": "0" * 64}).status_code == 403
    r1 = c.post("/api/labels", json=body, headers={"X-CSRF-Token": csrf})
    r2 = c.post("/api/labels", json=body, headers={"X-CSRF-Token": csrf})  # a double click
    assert (r1.status_code, r2.status_code) == (201, 200) and r1.json()["label"]["id"] == r2.json()["label"]["id"]
    label_id = r1.json()["label"]["id"]
    # a labeler sees only their own labels
    assert c.get(f"/api/labels/{label_id}", headers=_bearer(tok["bob"])).status_code == 404
    assert c.get("/api/labels", headers=_bearer(tok["bob"])).json()["labels"] == []
    assert c.get(f"/api/labels/{label_id}", headers=_bearer(tok["ann"])).status_code == 200
    # tokens are stored hashed
    import sqlite3

    stored = [row[0] for row in sqlite3.connect(app.state.store.path).execute("SELECT token_hash FROM labelers")]
    assert all(t not in stored for t in tok.values()) and all(len(h) == 64 for h in stored)


def test_model_output_is_data_never_markup(app_and_tokens):
    from fastapi.testclient import TestClient

    app, tok = app_and_tokens
    c = TestClient(app)
    item = c.get("/api/next", headers=_bearer(tok["ann"])).json()["item"]
    assert item["responses"][:2] == XSS  # returned as JSON strings, untouched
    page = c.get("/label", headers=_bearer(tok["ann"]))
    assert "<script>window.__pwned" not in page.text  # items reach the page only as JSON
    js = resources.files("tether.labeling").joinpath("static", "label.js").read_text()
    assert "innerHTML" not in js and "insertAdjacentHTML" not in js and "document.write" not in js
    admin_js = resources.files("tether.labeling").joinpath("static", "admin.js").read_text()
    assert "innerHTML" not in admin_js
    # a name with markup is escaped in the page
    t = app.state.store.add_labeler('<img src=x onerror="1">')
    assert "<img src=x" not in c.get("/label", headers=_bearer(t)).text


def test_export_matches_the_labels(app_and_tokens, tmp_path):
    from fastapi.testclient import TestClient

    from tether.data.schemas import load_rankings

    app, tok = app_and_tokens
    c = TestClient(app)
    done = []
    for who in ("ann", "bob"):
        while (item := c.get("/api/next", headers=_bearer(tok[who])).json()["item"]) is not None:
            k = len(item["responses"])
            ranking = list(range(k))[::-1] if who == "ann" else [[0, 1]] + list(range(2, k))
            r = c.post("/api/labels", headers=_bearer(tok[who]),
                       json={"item_id": item["id"], "submission": uuid.uuid4().hex, "ranking": ranking})
            assert r.status_code == 201
            done.append((who, item["id"], ranking))
    export = c.get("/api/admin/export?kind=rankings", headers=_bearer(tok["admin"]))
    (tmp_path / "r.jsonl").write_text(export.text)
    rs = load_rankings(tmp_path / "r.jsonl")
    assert [(r.rater, r.meta["item"]) for r in rs] == [(w, i) for w, i, _ in done]
    assert [json.loads(line)["ranking"] for line in export.text.splitlines()] == [rk for _, _, rk in done]
    stats = c.get("/api/admin/stats", headers=_bearer(tok["admin"])).json()
    assert stats["progress"]["labels"] == len(done) == 8 and stats["agreement"]["items_multi"] == 4
    assert {row["name"]: row["labels"] for row in stats["labelers"]} == {"ann": 4, "bob": 4, "boss": 0}


def test_twenty_labelers_at_once_over_http(db_url):
    """20 labelers × 50 labels, all at once, each submitted twice (a double click): every
    label stored exactly once, none lost, no error — on SQLite and on PostgreSQL."""
    import httpx

    from tether.labeling.app import create_app
    from tether.serve import serve_in_thread

    app = create_app(db_url, overlap=3)
    store = app.state.store
    tokens = [store.add_labeler(f"labeler-{i:02d}") for i in range(20)]
    store.add_items(_items(400, k=4))
    errors, stored = [], []
    barrier = threading.Barrier(20)

    def work(token, base):
        try:
            with httpx.Client(base_url=base, headers=_bearer(token), timeout=60) as c:
                barrier.wait()
                for _ in range(50):
                    item = c.get("/api/next").json()["item"]
                    body = {"item_id": item["id"], "submission": uuid.uuid4().hex, "ranking": [3, 1, [0, 2]]}
                    # the same submission twice, both in flight at once (a double click on a slow line)
                    with ThreadPoolExecutor(2) as pool:
                        codes = sorted(pool.map(lambda _: c.post("/api/labels", json=body).status_code, range(2)))
                    if codes != [200, 201]:
                        errors.append(codes)
                    stored.append((token, item["id"]))
        except Exception as exc:  # noqa: BLE001 - the test reports it
            errors.append(repr(exc))

    with serve_in_thread(app) as url:
        base = url.removesuffix("/v1")
        threads = [threading.Thread(target=work, args=(t, base)) for t in tokens]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
    labels = store.labels()
    assert len(labels) == len(stored) == 1000
    assert len({(lab["item_id"], lab["labeler_id"]) for lab in labels}) == 1000
    per_item = {}
    for lab in labels:
        per_item[lab["item_id"]] = per_item.get(lab["item_id"], 0) + 1
    assert max(per_item.values()) <= 3


# ----------------------------------------------------------------------------- in a browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if CHROMIUM is None:
        pytest.skip("no chromium on this machine (Debian: apt-get install chromium)")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.mark.smoke
def test_a_labeler_ranks_with_mouse_and_keyboard_and_the_export_matches(browser, tmp_path):
    from playwright.sync_api import expect

    from tether.labeling.app import create_app, export_records
    from tether.serve import serve_in_thread

    app = create_app(str(tmp_path / "l.sqlite"), overlap=1)
    store = app.state.store
    token = store.add_labeler("ann")
    store.add_items([{"prompt": "first <b>prompt</b>", "responses": XSS + ["plain answer"]}])
    store.add_items([{"prompt": "second prompt", "responses": ["alpha", "beta", "gamma", "delta"]}])
    store.add_items([{"prompt": "third prompt", "responses": ["one", "two", "three"]}])
    store.add_items([{"prompt": "fourth prompt", "responses": ["yes", "no"]}])
    with serve_in_thread(app) as url:
        base = url.removesuffix("/v1")
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        dialogs = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(f"{base}/login?token={token}")
        assert page.url.endswith("/label")
        # item 1 holds markup: shown as text, never run
        page.wait_for_selector("#pool .card")
        assert page.locator("#prompt").inner_text() == "first <b>prompt</b>"
        assert page.locator("#pool .card .text").all_inner_texts() == XSS + ["plain answer"]
        assert page.evaluate("window.__pwned") is None and page.locator("#pool img").count() == 0
        # mouse: drag response 3 into the ranking, then 1 below it, then click 2; tie the last two
        page.drag_and_drop("#pool .card[data-idx='2']", "#ranked")
        page.drag_and_drop("#pool .card[data-idx='0']", "#ranked")
        page.locator("#pool .card[data-idx='1']").click()
        page.locator("#ranked .card[data-idx='1'] .tie").click()
        page.locator("#rubric-helpful-4").check()
        page.fill("#comment", "markup in the answers")
        assert page.locator("#ranked .card").evaluate_all("cs => cs.map(c => c.dataset.idx)") == ["2", "0", "1"]
        page.locator("#submit").dblclick()  # a double click stores one label
        expect(page.locator("#prompt")).to_have_text("second prompt")
        # keyboard only: 4, 2, 1, 3 then T (tie 3 with 1), Backspace + 3 again, Enter
        for key in ("4", "2", "1", "3", "t", "Backspace", "3", "t", "Enter"):
            page.keyboard.press(key)
        expect(page.locator("#prompt")).to_have_text("third prompt")
        page.locator("#skip").dblclick()  # a double click on Skip skips one item, not two
        expect(page.locator("#prompt")).to_have_text("fourth prompt")
        page.keyboard.press("s")
        page.wait_for_selector("#done:not([hidden])")
        assert dialogs == []
    records = export_records(store, "rankings")
    assert [r["ranking"] for r in records] == [[2, [0, 1]], [3, 1, [0, 2]]]
    labels = store.labels(include_skipped=True)
    assert len(labels) == 4 and labels[0]["rubric"] == {"helpful": 4} and labels[0]["comment"] == "markup in the answers"
    assert [lab["skipped"] for lab in labels] == [False, False, True, True]
    assert [lab["item_id"] for lab in labels] == [1, 2, 3, 4]


@pytest.mark.smoke
def test_admin_page_shows_progress_and_agreement(browser, tmp_path):
    from playwright.sync_api import expect

    from tether.labeling.app import create_app
    from tether.serve import serve_in_thread

    app = create_app(str(tmp_path / "l.sqlite"), overlap=2)
    store = app.state.store
    admin = store.add_labeler("boss", admin=True)
    ids = [store.labeler_by_token(store.add_labeler(n))["id"] for n in ("ann", "bob")]
    store.add_items(_items(12, k=3))
    for lab in ids:
        while (item := store.next_item(lab)) is not None:
            store.submit(lab, item["id"], uuid.uuid4().hex, ranking=[0, 1, 2] if item["id"] % 4 else [2, 1, 0])
    with serve_in_thread(app) as url:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(f"{url.removesuffix('/v1')}/login?token={admin}")
        assert page.url.endswith("/admin")
        expect(page.locator("#labelers tr")).to_have_count(4)
        text = page.locator("main").inner_text()
        assert "24 of 24 labels" in text and "Krippendorff" in text
        rows = page.locator("#labelers tr").all_inner_texts()
        assert any(r.startswith("ann\t12") for r in rows) and any(r.startswith("bob\t12") for r in rows)


@pytest.mark.smoke
def test_label_commands(tiny_path, tmp_path, capsys):
    from tether.cli import main

    db = str(tmp_path / "labels.sqlite")
    assert main(["label", "add-labeler", "ann", "--db", db]) == 0
    out = capsys.readouterr().out
    token = re.search(r"token (\S+)", out).group(1)
    assert f"/login?token={token}" in out
    assert main(["label", "add-labeler", "ann", "--db", db]) == 2  # the name is taken
    assert "exists already" in capsys.readouterr().err
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"prompt": "p", "responses": ["a", "b"]}) + "\n")
    assert main(["label", "import", str(items), "--db", db, "--overlap", "1"]) == 0
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"write three words about {w}"}) + "\n" for w in ("fruits", "tools")))
    assert main(["label", "import", "--checkpoint", tiny_path, "--prompts", str(prompts), "--k", "3", "--db", db,
                 "--max-new-tokens", "6"]) == 0
    store = LabelStore(db)
    assert store.progress()["items"] == 3 and len(store.item(3)["responses"]) == 3
    ann = store.labeler_by_token(token)["id"]
    for ranking in ([1, 0], [2, 0, 1], [[0, 1], 2]):
        item = store.next_item(ann)
        store.submit(ann, item["id"], uuid.uuid4().hex, ranking=ranking)
    assert main(["label", "export", "--db", db, "--out", str(tmp_path / "out")]) == 0
    from tether.data.schemas import load_rankings

    rs = load_rankings(tmp_path / "out" / "rankings.jsonl", allow_empty_responses=True)
    assert [(r.order, r.tiers) for r in rs] == [([1, 0], None), ([2, 0, 1], None), ([0, 1, 2], [0, 0, 1])]
    assert len((tmp_path / "out" / "pairs.jsonl").read_text().splitlines()) == 1 + 3 + 3
