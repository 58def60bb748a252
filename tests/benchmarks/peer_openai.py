"""Peer (a): the official `openai` SDK's AsyncOpenAI, an asyncio.Semaphore and one gather over all rows.

    python peer_openai.py BASE_URL INPUT.parquet OUTPUT.parquet CONCURRENCY

What a user would otherwise write; the SDK's own retries (its default, 2) are all it gets.
A row whose request still fails is written with status `failed`.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import polars as pl
from openai import AsyncOpenAI


async def main(base_url: str, path: str, out: str, concurrency: str) -> None:
    rows = pl.read_parquet(path).to_dicts()
    client = AsyncOpenAI(base_url=base_url, api_key="bench")
    gate = asyncio.Semaphore(int(concurrency))

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
