"""Peer (a): the official `openai` SDK's AsyncOpenAI, an asyncio.Semaphore and one gather over all rows.

    python peer_openai.py BASE_URL INPUT.parquet OUTPUT.parquet CONCURRENCY

What a user would otherwise write; the SDK's own retries (its default, 2) are all it gets.
A row whose request still fails is written with status `failed`. Its pool keeps CONCURRENCY
connections, as batchrun's does: the SDK's default keeps 100 alive, so at 128 or 512 in flight
it would open a connection for every request beyond them.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import httpx2
import polars as pl
from openai import AsyncOpenAI, DefaultAsyncHttpxClient


async def main(base_url: str, path: str, out: str, concurrency: str) -> None:
    rows = pl.read_parquet(path).to_dicts()
    size = int(concurrency)
    pool = httpx2.Limits(max_connections=size, max_keepalive_connections=size)
    client = AsyncOpenAI(base_url=base_url, api_key="bench", http_client=DefaultAsyncHttpxClient(limits=pool))
    gate = asyncio.Semaphore(size)

    async def one(row: dict[str, Any]) -> dict[str, Any]:
        async with gate:
            try:
                r = await client.chat.completions.create(
                    model="grok-4.3",
                    max_tokens=60,
                    temperature=0.2,
                    messages=[
                        {"role": "system", "content": "You are a news editor."},
                        {"role": "user", "content": f"Summarize: {row['title']}\n\n{row['text']}"},
                    ],
                )
            except Exception as exc:
                return {"id": row["id"], "content": None, "status": "failed", "error": str(exc)[:200]}
            return {"id": row["id"], "content": r.choices[0].message.content, "status": "ok", "error": None}

    results = await asyncio.gather(*(one(r) for r in rows))
    pl.DataFrame(
        results, schema={"id": pl.Int64, "content": pl.String, "status": pl.String, "error": pl.String}
    ).write_parquet(out)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:]))
