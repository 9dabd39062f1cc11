"""Reading events the way Segment hands them out: NDJSON, arrays, batch bodies, gzip, folders, globs."""

from __future__ import annotations

import gzip
import tracemalloc
from pathlib import Path
from typing import Any

import orjson
import pytest

from engine.ingest.files import InputError, expand_sources, read_blocks, read_records, read_source
from engine.limits import InputLimits

from .conftest import ndjson, run_cli


def event(n: int) -> dict[str, Any]:
    return {"type": "page", "messageId": f"m-{n}", "timestamp": "2026-11-27T10:00:00Z", "anonymousId": "a",
            "properties": {"page": {"type": "home", "pageId": "home"}}}


def ndjson_bytes(events: list[Any]) -> bytes:
    return b"".join(orjson.dumps(e) + b"\n" for e in events)


def ids(path: Path | str) -> list[Any]:
    return [r.event.get("messageId") if r.error is None else ("error", r.line) for r in read_records([path])]


@pytest.mark.parametrize("compress", [False, True])
def test_ndjson_plain_or_gzipped_with_a_bad_line(tmp_path: Path, compress: bool) -> None:
    data = ndjson_bytes([event(1)]) + b"{not json\n\n" + ndjson_bytes([event(2)])
    path = tmp_path / "events"  # no extension: gzip is told by its first bytes
    path.write_bytes(gzip.compress(data) if compress else data)
    assert ids(path) == ["m-1", ("error", 2), "m-2"]
    bad = [r for r in read_records([path]) if r.error][0]
    assert bad.error.startswith(f"{path}:2: not valid JSON")


def test_json_array_batch_body_and_single_document(tmp_path: Path) -> None:
    (tmp_path / "array.json").write_bytes(orjson.dumps([event(1), event(2)], option=orjson.OPT_INDENT_2))
    (tmp_path / "batch.json").write_bytes(orjson.dumps({"batch": [event(3), event(4)], "sentAt": "x"},
                                                       option=orjson.OPT_INDENT_2))
    (tmp_path / "one.json").write_bytes(orjson.dumps(event(5), option=orjson.OPT_INDENT_2))
    assert ids(tmp_path / "array.json") == ["m-1", "m-2"]
    assert ids(tmp_path / "batch.json") == ["m-3", "m-4"]
    assert ids(tmp_path / "one.json") == ["m-5"]
    assert [r.line for r in read_records([tmp_path / "array.json"])] == [1, 2]


def test_ndjson_of_batch_bodies_and_a_broken_document(tmp_path: Path) -> None:
    path = tmp_path / "batches.ndjson"
    path.write_bytes(ndjson_bytes([{"batch": [event(1), event(2)]}, event(3)]))
    assert [(r.line, r.event["messageId"]) for r in read_records([path])] == [(1, "m-1"), (1, "m-2"), (2, "m-3")]
    broken = tmp_path / "broken.json"
    broken.write_bytes(b'[\n  {"type": "page"},\n')
    [record] = read_records([broken])
    assert record.error.startswith(f"{broken}: not a valid JSON document")


def test_folders_recursively_and_globs_in_order(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "deep").mkdir(parents=True)
    (tmp_path / "a" / "deep" / "1.gz").write_bytes(gzip.compress(ndjson_bytes([event(1)])))
    (tmp_path / "b" / "2.ndjson").write_bytes(ndjson_bytes([event(2)]))
    (tmp_path / "a" / ".hidden").write_bytes(b"ignored")
    assert expand_sources([tmp_path]) == [str(tmp_path / "a" / "deep" / "1.gz"), str(tmp_path / "b" / "2.ndjson")]
    assert expand_sources([str(tmp_path / "**" / "*.ndjson")]) == [str(tmp_path / "b" / "2.ndjson")]
    with pytest.raises(InputError, match="no such file or folder"):
        expand_sources([tmp_path / "missing.ndjson"])
    with pytest.raises(InputError, match="no match"):
        expand_sources([str(tmp_path / "*.csv")])


def test_a_segment_archive_tree_maps_in_one_command(tmp_path: Path) -> None:
    archive = tmp_path / "segment-logs" / "src-1"
    expected = []
    for day in ("1764201600000", "1764288000000"):
        for part in range(2):
            events = [event(n) for n in range(len(expected), len(expected) + 5)]
            expected += [e["messageId"] for e in events]
            data = ndjson_bytes(events)
            if day == "1764288000000" and part == 1:
                data = data.replace(b'{"type":"page","messageId":"m-17"', b'{"type":"page"messageId":"m-17"')
                expected.remove("m-17")
            (archive / day).mkdir(parents=True, exist_ok=True)
            (archive / day / f"{part}-events.gz").write_bytes(gzip.compress(data))
    result = run_cli("map", str(tmp_path / "segment-logs"), "--format", "outcomes")
    assert result.returncode == 0, result.stderr.decode()
    lines = ndjson(result.stdout)
    assert [l["messageId"] for l in lines if l["emitted"]] == expected
    [bad] = [l for l in lines if l["rejected"]]
    assert bad["origin"].endswith("1764288000000/1-events.gz") and bad["line"] == 3
    assert "not valid JSON" in bad["rejected"][0]["reason"]


def test_a_missing_input_is_a_usage_error(tmp_path: Path) -> None:
    result = run_cli("map", str(tmp_path / "nothing.ndjson"))
    assert result.returncode == 2
    assert "no such file or folder" in result.stderr.decode()


@pytest.mark.parametrize("shape", ["ndjson", "gzip", "array"])
def test_reading_resumes_after_a_checkpoint(tmp_path: Path, shape: str) -> None:
    events = [event(n) for n in range(6)]
    path = tmp_path / "events"
    data = orjson.dumps(events) if shape == "array" else ndjson_bytes(events)
    path.write_bytes(gzip.compress(data) if shape == "gzip" else data)
    taken = list(read_source(str(path)))
    checkpoint = taken[2][1]
    resumed = [r.event["messageId"] for r, _ in read_source(str(path), checkpoint)]
    assert resumed == ["m-3", "m-4", "m-5"]
    other = tmp_path / "other"
    other.write_bytes(b" " + data if shape != "gzip" else gzip.compress(b"\n" + data))
    assert len(list(read_source(str(other), checkpoint))) == 6  # another file: read from the start


def test_a_large_gzipped_archive_streams_in_constant_memory(tmp_path: Path) -> None:
    path = tmp_path / "big.gz"
    with gzip.open(path, "wb", compresslevel=1) as out:
        for start in range(0, 100_000, 1000):
            out.write(ndjson_bytes([event(n) for n in range(start, start + 1000)]))
    tracemalloc.start()
    count = sum(1 for _ in read_records([path]))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert count == 100_000
    assert peak < 4 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB for a {path.stat().st_size / 2**20:.1f} MiB archive"


@pytest.mark.parametrize("compress", [False, True])
def test_a_broken_first_ndjson_line_is_rejected_alone(tmp_path: Path, compress: bool) -> None:
    data = b'{"type":"page","messageId":"m-0",\n' + ndjson_bytes([event(1), event(2)])
    path = tmp_path / "events.ndjson"
    path.write_bytes(gzip.compress(data) if compress else data)
    assert ids(path) == [("error", 1), "m-1", "m-2"]
    taken = list(read_source(str(path)))
    assert [r.event["messageId"] for r, _ in read_source(str(path), taken[1][1])] == ["m-2"]


def test_a_broken_first_line_on_stdin_is_rejected_alone() -> None:
    result = run_cli("map", "--format", "outcomes", stdin=b'{"type":\n' + ndjson_bytes([event(1)]))
    assert result.returncode == 0, result.stderr.decode()
    assert [(l["line"], bool(l["rejected"]), bool(l["emitted"])) for l in ndjson(result.stdout)] == [
        (1, True, False), (2, False, True)]


def _blocks_and_records(sources: list[Path], **limits: Any) -> tuple[list, list]:
    """The records of ``read_blocks`` (blocks split as the map stage splits them) and of ``read_records``,
    decoded as the map stage decodes them, each with the faults reported."""
    from engine.limits import InputLimits
    from engine.mapping import unit_records
    from engine.record import decode

    found = []
    for read in (lambda fault: unit_records(read_blocks(sources, InputLimits(**limits), on_fault=fault)),
                 lambda fault: read_records(sources, InputLimits(**limits), on_fault=fault)):
        faults: list = []
        found.append(([decode(record) for record in read(faults.append)], faults))
    return found[0], found[1]


def _hostile_ndjson(folder: Path) -> tuple[Path, list[bytes]]:
    """An NDJSON file of what a source may hold (batch lines, broken and over-long lines, blank runs,
    CRLF ends, no final newline), and its lines."""
    event = b'{"type":"track","event":"Product Clicked","messageId":"m-%d","properties":{"n":"%s"}}'
    lines = [event % (number, b"x" * (number * 37 % 1500)) for number in range(200)]
    lines[3:3] = [b"", b"  \t", b"{not json", b"null", b"[" * 200 + b"]" * 200]
    lines[20:20] = [b'{"batch": [' + lines[0] + b"," + lines[1] + b"]}", b'{"\\u0062atch": [' + lines[2] + b"]}"]
    lines[50:50] = [b'{"type":"track","messageId":"long","n":"' + b"y" * 5000 + b'"}', b" " * 2500]
    lines[150:150] = [b""] * 3000 + [b"  "] * 5  # a long run of blank lines: the gzip reader skips it at once
    plain = folder / "plain.ndjson"
    plain.write_bytes(b"\r\n".join(lines[:100]) + b"\n" + b"\n".join(lines[100:]))  # no newline at the end
    return plain, lines


@pytest.mark.parametrize("block", [64, 3000, 1 << 20])
@pytest.mark.parametrize("limit", [16 << 20, 1100])
def test_blocks_read_with_checkpoints_resume_as_lines_do(
    tmp_path: Path, block: int, limit: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine.ingest import files
    from engine.mapping import unit_records
    from engine.record import decode

    monkeypatch.setattr(files, "BLOCK", block)
    plain, _ = _hostile_ndjson(tmp_path)
    limits = InputLimits(max_line_bytes=limit)
    by_line = list(read_source(str(plain), limits=limits))
    checkpoints = {checkpoint.line: checkpoint for _, checkpoint in by_line if checkpoint}
    units = list(read_source(str(plain), limits=limits, decoded=False, blocks=True))
    assert len(units) > (2 if block < 1 << 20 else 0)
    everything = [record for record, _ in by_line]
    read = 0
    for unit, checkpoint in units:
        read += len(list(unit_records([unit])))
        if checkpoint.line in checkpoints:  # the checkpoint reading line by line gives at that line
            assert checkpoint == checkpoints[checkpoint.line]
        # resumed from it, line by line or in blocks: the rest, nothing twice
        rest = [record for record, _ in read_source(str(plain), checkpoint, limits=limits)]
        assert everything[:read] + rest == everything
        again = [decode(r) for r in unit_records(u for u, _ in read_source(
            str(plain), checkpoint, limits=limits, decoded=False, blocks=True))]
        assert again == rest
    assert read == len(everything) and units[-1][1] == by_line[-1][1]


@pytest.mark.parametrize("block", [64, 3000, 1 << 20])
def test_blocks_of_lines_give_the_records_lines_give(tmp_path: Path, block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.ingest import files

    monkeypatch.setattr(files, "BLOCK", block)  # blocks cut inside lines, at lines, around many lines
    plain, lines = _hostile_ndjson(tmp_path)
    zipped = tmp_path / "zipped.ndjson.gz"
    zipped.write_bytes(gzip.compress(plain.read_bytes()))
    cut = tmp_path / "cut.ndjson.gz"
    cut.write_bytes(zipped.read_bytes()[: zipped.stat().st_size // 2])
    document = tmp_path / "document.json"
    document.write_bytes(b"[" + b",".join(lines[100:110]) + b"]")
    for limit in (16 << 20, 2048, 1100):
        blocks, records = _blocks_and_records([plain, cut, document, zipped, plain], max_line_bytes=limit)
        assert blocks == records
        assert len(records[0]) > 400 and len(records[1]) == 1  # the cut gzip is reported, with its line
    assert sum(record.error is not None and "line longer" in record.error for record in records[0]) >= 4


def test_a_plain_file_comes_in_blocks_of_whole_lines(tmp_path: Path) -> None:
    from engine.ndjson import LineBlock

    source = tmp_path / "events.ndjson"
    source.write_bytes(b'{"type":"track"}\n' * 200_000)
    units = list(read_blocks([source]))
    assert len(units) > 2 and all(isinstance(unit, LineBlock) and unit.data.endswith(b"\n") for unit in units)
    assert [unit.line for unit in units[:2]] == [1, 1 + units[0].data.count(b"\n")]
