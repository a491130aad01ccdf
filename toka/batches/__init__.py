"""Batch jobs: the OpenAI Files and Batches API on a durable store, and `toka-batch`.

lines.py   the JSONL line format, read and written by the server's batches and by toka-batch alike
flow.py    how many batch sequences may be in the engine at once
store.py   SQLite (WAL) of files, batches and every line's state; file bodies on disk
runner.py  the server's batch runner: feeds pending lines to the engine, records results as they come
routes.py  /v1/files and /v1/batches
cli.py     toka-batch: a JSONL file through a toka-launch of its own, resumable
"""
