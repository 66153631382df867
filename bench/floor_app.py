"""The floor of bench/service.py: the least a durable accept of a deletion request does on our stack.

FastAPI, pydantic, SQLAlchemy 2 with psycopg on PostgreSQL, one uvicorn process per worker, as
``unlearnd api``: validate the body, INSERT the request and its samples, COMMIT, answer 202. No
authentication, no lookup of the samples, no deduplication, no audit log, no batching. What
``unlearnd api`` accepts per second, over what this accepts in the same run, is how close the
service is to its stack.

    DATABASE_URL=postgresql+psycopg://... python -m bench.floor_app --port 8001 [--workers 2]

The tables (``floor_requests``, ``floor_request_samples``) are created on start if missing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
from typing import Literal

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import BigInteger, Column, DateTime, ForeignKey, Integer, MetaData, String, Table, create_engine, insert

from service.core.db import POOL_SIZE

metadata = MetaData()
requests = Table("floor_requests", metadata,
                 Column("id", BigInteger, primary_key=True),
                 Column("model_id", Integer, nullable=False),
                 Column("reason", String(32), nullable=False),
                 Column("subject_ref", String(512)),
                 Column("n_samples", Integer, nullable=False),
                 Column("created_at", DateTime(timezone=True), nullable=False))
samples = Table("floor_request_samples", metadata,
                Column("request_id", ForeignKey("floor_requests.id"), primary_key=True),
                Column("sample_id", String(256), primary_key=True))


class RequestIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sample_ids: list[str | int] = Field(min_length=1, max_length=100_000)
    reason: Literal["erasure", "mislabeled", "poisoned", "other"]
    subject_ref: str | None = Field(None, min_length=1, max_length=512)


def create_app() -> FastAPI:
    engine = create_engine(os.environ["DATABASE_URL"], pool_size=POOL_SIZE, max_overflow=POOL_SIZE)  # as ours
    metadata.create_all(engine)  # idempotent; two workers racing here would both find the tables made
    app = FastAPI(title="floor")

    @app.post("/v1/models/{model_id}/deletion-requests", status_code=202)
    def accept(model_id: int, body: RequestIn):
        ids = list(dict.fromkeys(str(s) for s in body.sample_ids))
        with engine.begin() as conn:
            rid = conn.execute(insert(requests).returning(requests.c.id), {
                "model_id": model_id, "reason": body.reason, "subject_ref": body.subject_ref,
                "n_samples": len(ids), "created_at": dt.datetime.now(dt.UTC)}).scalar_one()
            conn.execute(insert(samples), [{"request_id": rid, "sample_id": s} for s in ids])
        return JSONResponse({"id": rid, "status": "received"}, status_code=202,
                            headers={"Location": f"/v1/floor-requests/{rid}"})

    return app


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    ap = argparse.ArgumentParser(prog="python -m bench.floor_app", description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8001)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args(argv)
    with create_engine(os.environ["DATABASE_URL"]).begin() as conn:  # before the workers start
        metadata.create_all(conn)
    # the settings of `unlearnd api` (service/cli.py: cmd_api)
    uvicorn.run("bench.floor_app:create_app", factory=True, host=args.host, port=args.port, workers=args.workers,
                log_level="info", http="service.api.server:H11NoDelay")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
