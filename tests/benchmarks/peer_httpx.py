"""Peer (b): httpx.AsyncClient and asyncio.gather over chunks of CONCURRENCY rows.

    python peer_httpx.py BASE_URL INPUT.parquet OUTPUT.parquet CONCURRENCY

The common hand-written loop: each chunk waits for its slowest request, and nothing is retried.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import httpx
import polars as pl


async def main(base_url: str, path: str, out: str, concurrency: str) -> None:
    rows = pl.read_parquet(path).to_dicts()
    size = int(concurrency)
    limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=120) as client:

        async def one(row: dict[str, Any]) -> dict[str, Any]:
            body = {
                "model": "grok-4.3",
                "max_tokens": 60,
                "temperature": 0.2,
                "messages": [
                    {"role": "system", "content": "You are a news editor."},
                    {"role": "user", "content": f"Summarize: {row['title']}\n\n{row['text']}"},
                ],
            }
            try:
                r = await client.post(
                    "/chat/completions", json=body, headers={"Authorization": "Bearer bench"}
                )
                r.raise_for_status()
            except httpx.HTTPError as exc:
                return {"id": row["id"], "content": None, "status": "failed", "error": str(exc)[:200]}
            return {
                "id": row["id"],
                "content": r.json()["choices"][0]["message"]["content"],
                "status": "ok",
                "error": None,
            }

        results: list[dict[str, Any]] = []
        for start in range(0, len(rows), size):
            results += await asyncio.gather(*(one(r) for r in rows[start : start + size]))
    pl.DataFrame(
        results, schema={"id": pl.Int64, "content": pl.String, "status": pl.String, "error": pl.String}
    ).write_parquet(out)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:]))
