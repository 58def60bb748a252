"""Images in rows (#23): each kind of cell (a path relative to the input or absolute, an http URL
sent as it is or fetched, an object in a bucket, bytes, a list), nulls under each input.on_null,
images that fail their row only (missing, not an image, too large), request keys made of the
images' bytes (a renamed image is not sent again, a changed one is), resume, dedupe, resizing and
`validate`; what the simulator received is read back from its record of request bodies."""

from __future__ import annotations

import base64
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import batchrun
from batchrun.images import sniff
from batchrun.simulator import RunningSimulator, SimulatorConfig, serve_in_thread
from batchrun.simulator.vision import dimensions
from tests.conftest import BUCKET, TEST_KEY, TEST_KEY_ENV, invoke
from tests.stub_server import Reply, Request, serve_stub


def image(
    format: str = "PNG", color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (4, 4)
) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format=format)
    return out.getvalue()


@pytest.fixture
def sim() -> Iterator[RunningSimulator]:
    """The simulator, keeping each request's body."""
    with serve_in_thread(SimulatorConfig(api_key=TEST_KEY, keep_bodies=True)) as running:
        yield running


def job_file(
    tmp_path: Path,
    rows: list[dict[str, Any]],
    base_url: str,
    *,
    input_path: str = "data/items.parquet",
    images: dict[str, Any] | None = None,
    **overrides: Any,
) -> Path:
    """Rows written to `input_path` (Parquet or JSON lines), and a job sending each row's `photo`."""
    path = tmp_path / input_path
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = pl.DataFrame(rows)
    frame.write_parquet(path) if path.suffix == ".parquet" else frame.write_ndjson(path)
    job: dict[str, Any] = {
        "input": {"path": input_path, "id_column": "id"},
        "output": {"path": "out/result.parquet"},
        "model": "grok-4.3",
        "prompt": {"user": "Describe {title}.", "images": ["photo"]},
        "params": {"max_tokens": 20},
        "endpoint": {"base_url": base_url, "api_key_env": TEST_KEY_ENV, "timeout_s": 10},
        "retry": {"max_attempts": 2, "initial_backoff_s": 0.01, "max_backoff_s": 0.02},
        **({"images": images} if images is not None else {}),
        **overrides,
    }
    job_path = tmp_path / "job.yaml"
    job_path.write_text(yaml.safe_dump(job, sort_keys=False))
    return job_path


def output(job: Path) -> pl.DataFrame:
    return pl.read_parquet(job.parent / "out" / "result.parquet")


def received(sim: RunningSimulator) -> dict[str, list[dict[str, Any]]]:
    """The content parts of the user message of each request the simulator got, by its text."""
    parts = {}
    for body in sim.stats.bodies:
        content = json.loads(body)["messages"][-1]["content"]
        assert content[0]["type"] == "text"
        parts[content[0]["text"]] = content
    return parts


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def run_ok(job: Path, *args: str, exit_code: int = 0) -> Any:
    result = invoke("run", str(job), "-q", *args)
    assert result.exit_code == exit_code, result.output
    return result


def test_paths_relative_to_the_input_and_absolute_go_inline_with_their_type(
    tmp_path: Path, sim: RunningSimulator
) -> None:
    photos = tmp_path / "data" / "photos"  # beside the input, not the job file
    photos.mkdir(parents=True)
    kinds = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}
    files = {}
    for format in kinds:
        files[format] = image(format)
        (photos / f"a.{format.lower()}").write_bytes(files[format])
    elsewhere = tmp_path / "elsewhere" / "b.png"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(image("PNG", (1, 2, 3)))
    rows = [{"id": i, "title": f, "photo": f"photos/a.{f.lower()}"} for i, f in enumerate(kinds)]
    rows.append({"id": 9, "title": "absolute", "photo": str(elsewhere)})
    job = job_file(tmp_path, rows, sim.base_url, images={"detail": "low"})

    run_ok(job)

    assert output(job)["status"].to_list() == ["ok"] * 5
    got = received(sim)
    for format, mime in kinds.items():
        assert got[f"Describe {format}."][1] == {
            "type": "image_url",
            "image_url": {"url": data_url(files[format], mime), "detail": "low"},
        }
    assert got["Describe absolute."][1]["image_url"]["url"] == data_url(elsewhere.read_bytes(), "image/png")
    assert len(got["Describe absolute."]) == 2


def test_batch_mode_sends_the_images_inline_and_fails_the_rows_whose_images_cannot_be(
    tmp_path: Path, sim: RunningSimulator
) -> None:
    photos = tmp_path / "data" / "photos"
    photos.mkdir(parents=True)
    (photos / "ok.png").write_bytes(image())
    rows = [
        {"id": 1, "title": "fine", "photo": "photos/ok.png"},
        {"id": 2, "title": "gone", "photo": "photos/x.png"},
    ]
    job = job_file(tmp_path, rows, sim.base_url, batches={"poll_s": 0.02})

    run_ok(job, "--batch", exit_code=1)

    out = output(job)
    assert out["status"].to_list() == ["ok", "failed"]
    assert out["error"][1] == "input_error: photos/x.png: no such file"
    assert out["batch_id"][0] is not None and out["batch_id"][1] is None  # only the first went in a batch
    assert received(sim)["Describe fine."][1]["image_url"]["url"] == data_url(image(), "image/png")


def test_an_http_url_is_sent_as_it_is_and_a_list_makes_parts_in_order(
    tmp_path: Path, sim: RunningSimulator
) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.png").write_bytes(image())
    urls = ["https://images.example/one.jpg", "x.png"]
    rows = [{"id": 1, "title": "listed", "photo": urls}, {"id": 2, "title": "none", "photo": []}]
    job = job_file(tmp_path, rows, sim.base_url, input_path="data/items.jsonl")

    run_ok(job)

    got = received(sim)
    assert got["Describe listed."][1:] == [
        {"type": "image_url", "image_url": {"url": "https://images.example/one.jpg"}},
        {"type": "image_url", "image_url": {"url": data_url(image(), "image/png")}},
    ]
    assert got["Describe none."] == [{"type": "text", "text": "Describe none."}]


def test_fetch_downloads_http_images_and_inlines_them(tmp_path: Path, sim: RunningSimulator) -> None:
    photo = image("JPEG")

    def serve(request: Request) -> Reply:
        if request.path == "/a.jpg":
            return Reply(200, photo, {"content-type": "image/jpeg"})
        return Reply(404, "no such image", {"content-type": "text/plain"})

    with serve_stub(serve) as store:
        base = f"http://127.0.0.1:{store.port}"
        rows = [
            {"id": 1, "title": "found", "photo": f"{base}/a.jpg"},
            {"id": 2, "title": "gone", "photo": f"{base}/gone.jpg"},
        ]
        job = job_file(tmp_path, rows, sim.base_url, images={"fetch": True})
        run_ok(job, exit_code=1)
        fetched = [r.path for r in store.requests]

    out = output(job)
    assert out["status"].to_list() == ["ok", "failed"]
    assert out["error"][1] == f"input_error: {base}/gone.jpg: HTTP 404 when fetched"
    assert received(sim)["Describe found."][1]["image_url"]["url"] == data_url(photo, "image/jpeg")
    assert sorted(fetched) == ["/a.jpg", "/a.jpg", "/gone.jpg"]  # keyed, then sent; the 404 once
    assert sim.stats.requests == 1


def test_images_in_a_bucket_are_read_with_the_inputs_credentials(
    tmp_path: Path, sim: RunningSimulator, s3: Any
) -> None:
    s3.put_object(Bucket=BUCKET, Key="photos/a.png", Body=image())
    s3.put_object(Bucket=BUCKET, Key="in/photos/b.gif", Body=image("GIF"))
    rows = [
        {"id": 1, "title": "url", "photo": f"s3://{BUCKET}/photos/a.png"},
        {"id": 2, "title": "beside", "photo": "photos/b.gif"},  # relative to the input's URL
        {"id": 3, "title": "gone", "photo": f"s3://{BUCKET}/photos/gone.png"},
    ]
    pl.DataFrame(rows).write_parquet(tmp_path / "items.parquet")
    s3.upload_file(str(tmp_path / "items.parquet"), BUCKET, "in/items.parquet")
    job = job_file(tmp_path, rows, sim.base_url)
    spec = yaml.safe_load(job.read_text())
    spec["input"]["path"] = f"s3://{BUCKET}/in/items.parquet"
    job.write_text(yaml.safe_dump(spec))

    run_ok(job, exit_code=1)

    out = output(job)
    assert out["status"].to_list() == ["ok", "ok", "failed"]
    assert out["error"][2] == (
        f"input_error: s3://{BUCKET}/photos/gone.png: cannot read it "
        "(NoSuchKey: The specified key does not exist.)"
    )
    got = received(sim)
    assert got["Describe url."][1]["image_url"]["url"] == data_url(image(), "image/png")
    assert got["Describe beside."][1]["image_url"]["url"] == data_url(image("GIF"), "image/gif")


def test_bytes_and_lists_of_bytes_in_a_parquet_column(tmp_path: Path, sim: RunningSimulator) -> None:
    one, two = image("PNG", (9, 9, 9)), image("WEBP", (8, 8, 8))
    rows = [{"id": 1, "title": "one", "photo": one}, {"id": 2, "title": "two", "photo": two}]
    job = job_file(tmp_path, rows, sim.base_url)
    listed = pl.DataFrame(
        {"id": [1], "title": ["both"], "photo": [[two, one]]}, schema_overrides={"photo": pl.List(pl.Binary)}
    )
    listed.write_parquet(tmp_path / "data" / "listed.parquet")

    run_ok(job)
    spec = yaml.safe_load(job.read_text())
    spec["input"]["path"] = "data/listed.parquet"
    spec["output"]["path"] = "out/listed.parquet"
    job.write_text(yaml.safe_dump(spec))
    run_ok(job)

    got = received(sim)
    assert got["Describe one."][1]["image_url"]["url"] == data_url(one, "image/png")
    assert got["Describe two."][1]["image_url"]["url"] == data_url(two, "image/webp")
    urls = [p["image_url"]["url"] for p in got["Describe both."][1:]]
    assert urls == [data_url(two, "image/webp"), data_url(one, "image/png")]


@pytest.mark.parametrize("on_null", ["error", "skip", "empty"])
def test_a_null_image_cell_follows_input_on_null(tmp_path: Path, sim: RunningSimulator, on_null: str) -> None:
    rows = [{"id": 1, "title": "here", "photo": image()}, {"id": 2, "title": "null", "photo": None}]
    job = job_file(tmp_path, rows, sim.base_url)
    spec = yaml.safe_load(job.read_text())
    spec["input"]["on_null"] = on_null
    job.write_text(yaml.safe_dump(spec))

    result = invoke("run", str(job), "-q")

    if on_null == "error":
        assert result.exit_code == 2
        assert "column 'photo' used by the prompt is empty in row(s) 2 of items.parquet" in result.stderr
        assert sim.stats.requests == 0
        return
    assert result.exit_code == 0, result.output
    out = output(job)
    if on_null == "skip":
        assert out["status"].to_list() == ["ok", "skipped"]
        assert sim.stats.requests == 1
    else:
        assert out["status"].to_list() == ["ok", "ok"]
        assert received(sim)["Describe null."] == [{"type": "text", "text": "Describe null."}]


def test_images_that_cannot_be_sent_fail_their_row_and_the_job_goes_on(
    tmp_path: Path, sim: RunningSimulator
) -> None:
    photos = tmp_path / "data" / "photos"
    photos.mkdir(parents=True)
    (photos / "x.bmp").write_bytes(b"BM" + bytes(60))
    (photos / "notes.png").write_text("not an image at all")
    (photos / "big.png").write_bytes(image() + bytes(3000))
    (photos / "ok.png").write_bytes(image())
    (photos / "folder.png").mkdir()
    rows = [
        {"id": 1, "title": "missing", "photo": "photos/x.jpg"},
        {"id": 2, "title": "bmp", "photo": "photos/x.bmp"},
        {"id": 3, "title": "text", "photo": "photos/notes.png"},
        {"id": 4, "title": "big", "photo": "photos/big.png"},
        {"id": 5, "title": "ftp", "photo": "ftp://host/x.png"},
        {"id": 6, "title": "folder", "photo": "photos/folder.png"},
        {"id": 7, "title": "fine", "photo": "photos/ok.png"},
    ]
    job = job_file(tmp_path, rows, sim.base_url, input_path="data/items.jsonl", images={"max_mb": 0.003})

    run_ok(job, exit_code=1)

    out = output(job)
    assert out["status"].to_list() == ["failed"] * 6 + ["ok"]
    assert set(out["error_kind"].to_list()[:6]) == {"input_error"}
    assert out["attempts"].to_list()[:6] == [0] * 6
    assert out["error"].to_list()[:6] == [
        "input_error: photos/x.jpg: no such file",
        "input_error: photos/x.bmp: not a PNG, JPEG, WebP or GIF image",
        "input_error: photos/notes.png: not a PNG, JPEG, WebP or GIF image",
        f"input_error: photos/big.png: {len(image()) + 3000:,} bytes, more than images.max_mb (0.003 MB)",
        "input_error: ftp://host/x.png: ftp:// is not a scheme batchrun reads images from "
        "(http, https, s3, gs, az)",
        "input_error: photos/folder.png: is a folder, not a file",
    ]
    assert sim.stats.requests == 1  # only the image that can be sent


def test_a_column_of_another_type_stops_the_job_naming_it(tmp_path: Path, sim: RunningSimulator) -> None:
    job = job_file(tmp_path, [{"id": 1, "title": "number", "photo": 42}], sim.base_url)

    result = invoke("run", str(job), "-q")

    assert result.exit_code == 2
    assert result.stderr == (
        "Error: prompt.images names column 'photo', which holds Int64, not paths, URLs or image bytes "
        "(or lists of them)\n"
    )
    assert sim.stats.requests == 0


def test_a_renamed_image_is_not_sent_again_and_a_changed_one_is(
    tmp_path: Path, sim: RunningSimulator
) -> None:
    photos = tmp_path / "data" / "photos"
    photos.mkdir(parents=True)
    (photos / "a.png").write_bytes(image("PNG", (1, 1, 1)))
    (photos / "b.png").write_bytes(image("PNG", (2, 2, 2)))
    rows = [
        {"id": 1, "title": "a", "photo": "photos/a.png"},
        {"id": 2, "title": "b", "photo": "photos/b.png"},
    ]
    job = job_file(tmp_path, rows, sim.base_url)
    run_ok(job)
    assert sim.stats.requests == 2

    (photos / "a.png").rename(photos / "renamed.png")
    job_file(tmp_path, [{**rows[0], "photo": "photos/renamed.png"}, rows[1]], sim.base_url)
    run_ok(job)
    assert sim.stats.requests == 2  # the same bytes: the same request, answered

    (photos / "b.png").write_bytes(image("PNG", (3, 3, 3)))  # the table is as it was
    run_ok(job)
    assert sim.stats.requests == 3
    assert received(sim)["Describe b."][1]["image_url"]["url"] == data_url(
        image("PNG", (3, 3, 3)), "image/png"
    )
    assert output(job)["status"].to_list() == ["ok", "ok"]


def test_a_partial_run_resumes_with_the_rest(tmp_path: Path, sim: RunningSimulator) -> None:
    rows = [{"id": i, "title": f"row {i}", "photo": image("PNG", (i, i, i))} for i in range(6)]
    job = job_file(tmp_path, rows, sim.base_url)

    run_ok(job, "--limit", "2")
    run_ok(job)

    assert sim.stats.requests == 6
    assert sorted(received(sim)) == sorted(f"Describe row {i}." for i in range(6))
    assert output(job)["status"].to_list() == ["ok"] * 6


def test_dedupe_sends_identical_images_once(tmp_path: Path, sim: RunningSimulator) -> None:
    photos = tmp_path / "data" / "photos"
    photos.mkdir(parents=True)
    for name in ("a.png", "copy-of-a.png"):
        (photos / name).write_bytes(image())
    (photos / "c.png").write_bytes(image("PNG", (0, 0, 255)))
    rows = [
        {"id": 1, "title": "same", "photo": "photos/a.png"},
        {"id": 2, "title": "same", "photo": "photos/copy-of-a.png"},
        {"id": 3, "title": "same", "photo": "photos/c.png"},
    ]
    job = job_file(tmp_path, rows, sim.base_url, dedupe=True)
    run_ok(job)

    assert sim.stats.requests == 2
    assert output(job)["reused_from"].to_list() == [None, "1", None]


def test_max_side_resizes_before_sending(tmp_path: Path, sim: RunningSimulator) -> None:
    wide, small = image("JPEG", size=(64, 32)), image("PNG", size=(8, 8))
    rows = [{"id": 1, "title": "wide", "photo": wide}, {"id": 2, "title": "small", "photo": small}]
    job = job_file(tmp_path, rows, sim.base_url, images={"max_side": 16})

    run_ok(job)

    got = received(sim)
    sent = base64.b64decode(got["Describe wide."][1]["image_url"]["url"].split(",", 1)[1])
    assert sniff(sent) == "image/jpeg"
    assert Image.open(io.BytesIO(sent)).size == (16, 8)
    assert got["Describe small."][1]["image_url"]["url"] == data_url(small, "image/png")  # as it was


def test_max_side_without_pillow_names_the_extra(
    tmp_path: Path, sim: RunningSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = job_file(
        tmp_path, [{"id": 1, "title": "t", "photo": image()}], sim.base_url, images={"max_side": 16}
    )
    monkeypatch.setitem(sys.modules, "PIL", None)  # as if not installed

    result = invoke("run", str(job), "-q")

    assert result.exit_code == 2
    assert result.stderr == (
        f"Error: {job}: images.max_side resizes images with Pillow, which is not installed: "
        "pip install 'batchrun[images]'\n"
    )


def test_validate_reads_the_first_rows_images_and_shows_no_base64(
    tmp_path: Path, sim: RunningSimulator
) -> None:
    photo = image(size=(40, 40))
    rows = [
        {"id": 1, "title": "one", "photo": photo},
        {"id": 2, "title": "two", "photo": b"no image"},
        {"id": 3, "title": "three", "photo": b"GIF89a and then anything"},  # sent: its type says GIF
    ]
    job = job_file(tmp_path, rows, sim.base_url)

    result = invoke("validate", str(job))

    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    url = shown["messages"][0]["content"][1]["image_url"]["url"]
    full = data_url(photo, "image/png")
    assert url == f"{full[:48]}... ({len(full):,} characters)"
    assert base64.b64encode(photo).decode() not in result.stdout
    assert result.stderr.splitlines()[1:] == [
        "warning: row 2: input_error: column 'photo' (8 bytes): not a PNG, JPEG, WebP or GIF image "
        "(the row would fail, unsent)",
    ]
    assert sim.stats.requests == 0


def test_python_dataframe_with_paths_relative_to_the_current_folder_and_a_binary_column(
    tmp_path: Path, sim: RunningSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.png").write_bytes(image())
    endpoint = {"base_url": sim.base_url, "api_key_env": TEST_KEY_ENV}
    common: dict[str, Any] = {"model": "grok-4.3", "endpoint": endpoint, "quiet": True}

    by_path = batchrun.run(
        pl.DataFrame({"title": ["p"], "photo": ["photos/a.png"]}),
        prompt={"user": "Describe {title}.", "images": ["photo"]},
        checkpoint="runs/paths.sqlite",
        **common,
    )
    by_bytes = batchrun.run(
        pl.DataFrame({"title": ["b"], "photo": [image("GIF")]}),
        prompt={"user": "Describe {title}.", "images": ["photo"]},
        checkpoint="runs/bytes.sqlite",
        **common,
    )

    assert by_path["status"].to_list() == by_bytes["status"].to_list() == ["ok"]
    got = received(sim)
    assert got["Describe p."][1]["image_url"]["url"] == data_url(image(), "image/png")
    assert got["Describe b."][1]["image_url"]["url"] == data_url(image("GIF"), "image/gif")


MAGIC = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"RIFF\0\0\0\0WEBP", b""]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(st.tuples(st.sampled_from(MAGIC), st.binary(max_size=64)), min_size=1, max_size=6),
    st.sampled_from([None, 8]),
)
def test_any_bytes_in_a_binary_column_are_sent_as_a_data_url_or_fail_their_row(
    tmp_path_factory: pytest.TempPathFactory, cells: list[tuple[bytes, bytes]], max_side: int | None
) -> None:
    tmp_path = tmp_path_factory.mktemp("bytes")
    photos = [magic + rest for magic, rest in cells]
    if max_side:
        photos.append(image(size=(20, 10)))  # one that resizes
    rows = [{"id": i, "title": f"row {i}", "photo": photo} for i, photo in enumerate(photos)]
    with serve_in_thread(SimulatorConfig(api_key=TEST_KEY, keep_bodies=True)) as sim:
        job = job_file(tmp_path, rows, sim.base_url, images={"max_side": max_side})
        result = invoke("run", str(job), "-q")
        got = received(sim)
    assert result.exit_code in (0, 1), result.output
    out = output(job)
    for i, photo in enumerate(photos):
        if out["status"][i] == "ok":
            mime = sniff(photo)
            assert mime is not None
            url = got[f"Describe row {i}."][1]["image_url"]["url"]
            sent = base64.b64decode(url.removeprefix(f"data:{mime};base64,"), validate=True)
            assert sniff(sent) == mime
            assert sent == photo or (max_side and max(Image.open(io.BytesIO(sent)).size) <= max_side)
        elif out["error_kind"][i] == "invalid_image_format":  # sent, and refused as a real endpoint would
            assert sniff(photo) is not None and dimensions(photo) is None
        else:
            assert out["error_kind"][i] == "input_error"
            assert out["error"][i].startswith(f"input_error: column 'photo' ({len(photo):,} bytes): ")


def test_an_image_changed_after_its_row_was_keyed_fails_its_row(tmp_path: Path) -> None:
    from batchrun.errors import RowInputError
    from batchrun.images import ImageSettings

    (tmp_path / "a.png").write_bytes(image())
    settings_ = ImageSettings(("photo",), tmp_path)
    body = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "t"}, *settings_.parts({"photo": "a.png"})]}
        ]
    }
    settings_.digest_all([body])
    (tmp_path / "a.png").write_bytes(image("PNG", (0, 0, 0)))

    with pytest.raises(RowInputError) as failed:
        settings_.inline(body)

    assert str(failed.value) == (
        "input_error: a.png: changed since this run read it; run again to send it as it is now"
    )


def test_ray_workers_read_and_send_the_images_themselves(ray_session: Any, tmp_path: Path) -> None:
    (tmp_path / "data" / "photos").mkdir(parents=True)
    (tmp_path / "data" / "photos" / "a.png").write_bytes(image())
    rows = [{"id": i, "title": f"row {i}", "photo": "photos/a.png"} for i in range(4)]
    rows += [{"id": 9, "title": "gone", "photo": "photos/gone.png"}]
    with serve_in_thread(SimulatorConfig(api_key=TEST_KEY, keep_bodies=True)) as sim:
        job = job_file(tmp_path, rows, sim.base_url)
        result = batchrun.Job.from_yaml(job).run(ray=True, workers=2, quiet=True)
        got = received(sim)

    assert (result.ok, result.failed) == (4, 1)
    assert {parts[1]["image_url"]["url"] for parts in got.values()} == {data_url(image(), "image/png")}
    assert output(job)["error"][4] == "input_error: photos/gone.png: no such file"


def test_with_prompt_messages_the_images_go_in_the_last_user_message(
    tmp_path: Path, sim: RunningSimulator
) -> None:
    messages = [
        {"role": "system", "content": "You describe products."},
        {"role": "user", "content": "An example."},
        {"role": "assistant", "content": "A red square."},
        {"role": "user", "content": "Describe {title}."},
    ]
    job = job_file(tmp_path, [{"id": 1, "title": "it", "photo": image()}], sim.base_url)
    spec = yaml.safe_load(job.read_text())
    spec["prompt"] = {"messages": messages, "images": ["photo"]}
    job.write_text(yaml.safe_dump(spec))

    run_ok(job)

    sent = json.loads(sim.stats.bodies[0])["messages"]
    assert [m["content"] for m in sent[:3]] == ["You describe products.", "An example.", "A red square."]
    assert sent[3]["content"] == [
        {"type": "text", "text": "Describe it."},
        {"type": "image_url", "image_url": {"url": data_url(image(), "image/png")}},
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"prompt": {"messages": [{"role": "system", "content": "{title}"}], "images": ["photo"]}},
            "prompt.images: prompt.messages has no user message to hold the images",
        ),
        (
            {
                "prompt": {"images": ["photo"]},
                "input": {"path": "data/items.parquet", "messages_column": "title"},
            },
            "prompt.images: the images go in the job's user message; input.messages_column holds each "
            "row's whole conversation, as text",
        ),
        ({"image_folder": "/tmp"}, "unknown key 'image_folder'"),
        (
            {"images": {"detail": "medium"}},
            "images.detail: Input should be 'low', 'high' or 'auto' (got 'medium')",
        ),
    ],
)
def test_image_keys_that_cannot_work_are_refused_naming_the_key(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    job = job_file(tmp_path, [{"id": 1, "title": "t", "photo": image()}], "http://127.0.0.1:9/v1")
    job.write_text(yaml.safe_dump({**yaml.safe_load(job.read_text()), **change}))

    result = invoke("validate", str(job))

    assert result.exit_code == 2
    assert result.stderr.startswith(f"Error: {job}:") and result.stderr.rstrip().endswith(message), (
        result.stderr
    )
