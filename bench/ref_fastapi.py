"""The FastAPI + uvicorn webhook reference (no `from __future__ import annotations`: FastAPI reads
the annotations at runtime to inject `Request` and the headers)."""

import orjson
import uvicorn
from fastapi import FastAPI, Header, HTTPException, Request

from .env import HOST
from .references import WEBHOOK, check_signature

app = FastAPI()


@app.get("/healthz")
async def health() -> dict[str, str]:
    return {"status": "alive"}


@app.post(WEBHOOK)
async def webhook(request: Request, timestamp: str = Header(""), sign: str = Header("")) -> dict[str, bool]:
    body = await request.body()
    if not check_signature(timestamp, sign):
        raise HTTPException(401, "bad signature")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise HTTPException(400, "malformed JSON") from None
    if not isinstance(data, dict):
        raise HTTPException(400, "malformed JSON")
    return {"ok": True}


def serve(port: int) -> None:
    # Defaults as deployed: uvicorn picks uvloop and httptools when they are installed ("auto").
    uvicorn.run(app, host=HOST, port=port, log_level="warning", access_log=False)
