"""The labeling app: a small web app where a team of labelers ranks K responses per prompt.

``store.LabelStore`` keeps items, labelers and labels in SQLite (WAL); ``app.create_app``
serves the labeling and admin pages and their JSON API (FastAPI).
"""
