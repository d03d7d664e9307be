"""FLIP conversion against files served by a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli
from conftest import assert_one_line_error
from esm2dask.flip import TASKS

SPLIT_HEADERS = [
    "SET=train VALIDATION=False",
    "SET=train VALIDATION=True",
    "SET=test VALIDATION=False",
    "SET=train VALIDATION=False",
    "SET=other VALIDATION=False",  # neither train nor test: left out
]
TARGETS = ["1.2e-05", "Cell.membrane", "Lysosome/Vacuole", "-0.75", "3"]


def _wrap(seq: str, width: int = 7) -> str:
    return "\n".join(seq[i : i + width] for i in range(0, len(seq), width))


def make_flip_tree(root: Path) -> None:
    """FLIP-shaped files for all eight tasks: five records each."""
    seqs = ["mkvLaa", "GGHHKKLLMM", "pqrs", "WWYYVV", "ACDE"]
    for name, task in TASKS.items():
        d = root / name
        d.mkdir(parents=True)
        if task.labels is None:
            text = "".join(
                f">{name}_{i} TARGET={TARGETS[i]} {SPLIT_HEADERS[i]}\n{_wrap(s)}\n" for i, s in enumerate(seqs)
            )
            (d / task.sequences).write_text(text)
            continue
        (d / task.sequences).write_text("".join(f">{name}_{i}\n{_wrap(s)}\n" for i, s in enumerate(seqs)))
        alphabet = "hec" if name == "secondary_structure" else "0123456789"
        labels = ["".join(alphabet[(j + i) % len(alphabet)] for j in range(len(s))) for i, s in enumerate(seqs)]
        (d / task.labels).write_text(
            "".join(f">{name}_{i} {SPLIT_HEADERS[i]}\n{_wrap(l, 5)}\n" for i, l in enumerate(labels))
        )
        if task.resolved:
            (d / task.resolved).write_text(
                "".join(f">{name}_{i}\n{''.join('01'[j % 2] for j in range(len(s)))}\n" for i, s in enumerate(seqs))
            )


class _Server:
    def __init__(self, root: Path):
        self.root = root
        self.requests: list[str] = []
        self.fail_first: set[str] = set()
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(root), **kw)

            def do_GET(self):  # noqa: N802
                server.requests.append(self.path)
                if self.path in server.fail_first:
                    server.fail_first.discard(self.path)
                    self.send_error(503, "try again")
                    return
                super().do_GET()

            def do_HEAD(self):  # noqa: N802
                server.requests.append("HEAD " + self.path)
                super().do_HEAD()

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/fasta/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def flip_server(tmp_path):
    served = tmp_path / "served"
    make_flip_tree(served / "fasta")
    server = _Server(served)
    yield server
    server.close()


def flip(*args):
    return CliRunner().invoke(cli, ["flip", *map(str, args)], catch_exceptions=False)


def test_all_tasks_over_http(flip_server, tmp_path):
    out, cache = tmp_path / "FLIP", tmp_path / "cache"
    result = flip("--tasks", "all", "-o", out, "--source", flip_server.url, "--cache-dir", cache)
    assert result.exit_code == 0, result.output
    for name, task in TASKS.items():
        for split, n in (("train", 2), ("val", 1), ("test", 1)):
            lines = (out / name / split / "x000.csv").read_text().splitlines()
            assert lines[0] == ",".join(task.header)
            assert len(lines) - 1 == n, (name, split)
        assert f"{name}: train 2, val 1, test 1" in result.output
    aav_train = (out / "aav/train/x000.csv").read_text()
    # compat truncation, upper-cased and unwrapped sequences
    assert aav_train == "id,sequence,target\naav_0,MKVLAA,1.2\naav_3,WWYYVV,-0.75\n"
    assert (out / "scl/val/x000.csv").read_text().splitlines()[1] == "scl_1,GGHHKKLLMM,Cell."
    assert (out / "scl/test/x000.csv").read_text().splitlines()[1] == "scl_2,PQRS,Lysosome"
    ss = (out / "secondary_structure/train/x000.csv").read_text().splitlines()
    assert ss[1] == "secondary_structure_0,MKVLAA,HECHEC,010101"
    cons = (out / "conservation/test/x000.csv").read_text().splitlines()
    assert cons == ["id,sequence,conservation", "conservation_2,PQRS,2345"]
    assert "truncated" in result.output
    check = CliRunner().invoke(cli, ["verify", str(out)])
    assert check.exit_code == 0, check.output


def test_exact_labels_keep_values_whole(flip_server, tmp_path):
    out = tmp_path / "FLIP"
    result = flip("--tasks", "aav,scl", "-o", out, "--source", flip_server.url, "--cache-dir", tmp_path / "c",
                  "--labels", "exact")
    assert result.exit_code == 0, result.output
    assert (out / "aav/train/x000.csv").read_text().splitlines()[1] == "aav_0,MKVLAA,1.2e-05"
    assert (out / "scl/test/x000.csv").read_text().splitlines()[1] == "scl_2,PQRS,Lysosome/Vacuole"


def test_cache_is_reused_and_retries_recover(flip_server, tmp_path):
    cache = tmp_path / "cache"
    flip_server.fail_first.add("/fasta/gb1/two_vs_rest.fasta")
    result = flip("--tasks", "gb1", "-o", tmp_path / "a", "--source", flip_server.url, "--cache-dir", cache)
    assert result.exit_code == 0, result.output
    gets = [r for r in flip_server.requests if r.endswith("two_vs_rest.fasta") and not r.startswith("HEAD")]
    assert len(gets) == 2  # one 503, one success
    before = len(flip_server.requests)
    result = flip("--tasks", "gb1", "-o", tmp_path / "b", "--source", flip_server.url, "--cache-dir", cache)
    assert result.exit_code == 0
    assert len(flip_server.requests) == before  # served from the cache
    assert not list(cache.rglob("*.tmp"))


def test_checksums_written_and_checked(flip_server, tmp_path):
    sums = tmp_path / "sums.txt"
    args = ["--tasks", "meltome", "--source", flip_server.url, "--cache-dir", tmp_path / "c"]
    assert flip(*args, "-o", tmp_path / "a", "--write-checksums", sums).exit_code == 0
    data = (flip_server.root / "fasta/meltome/mixed_split.fasta").read_bytes()
    assert sums.read_text() == f"{hashlib.sha256(data).hexdigest()}  meltome/mixed_split.fasta\n"
    assert flip(*args, "-o", tmp_path / "b", "--checksums", sums).exit_code == 0
    sums.write_text("0" * 64 + "  meltome/mixed_split.fasta\n")
    result = flip(*args, "-o", tmp_path / "c2", "--checksums", sums)
    assert result.exit_code == 1 and "does not match" in result.output
    assert not (tmp_path / "c2" / "meltome").exists()


def test_missing_file_is_404(flip_server, tmp_path):
    (flip_server.root / "fasta/sav/mixed.fasta").unlink()
    result = flip("--tasks", "sav", "-o", tmp_path / "o", "--source", flip_server.url, "--cache-dir", tmp_path / "c")
    assert result.exit_code == 1 and "404" in result.output and "sav" in result.output


def test_record_missing_from_sequence_file(tmp_path):
    src = tmp_path / "src"
    make_flip_tree(src)
    seqs = src / "bind/sequences.fasta"
    seqs.write_text(seqs.read_text().replace(">bind_1\n", ">bind_X\n"))
    result = flip("--tasks", "bind", "-o", tmp_path / "o", "--source", src)
    assert result.exit_code == 1
    assert "'bind_1' is in from_publication.fasta but not in sequences.fasta" in result.output
    assert not (tmp_path / "o" / "bind").exists()


def test_label_length_mismatch_is_an_error(tmp_path):
    src = tmp_path / "src"
    make_flip_tree(src)
    labels = src / "conservation/sampled.fasta"
    labels.write_text(labels.read_text().replace("\n2345\n", "\n23456\n"))
    result = flip("--tasks", "conservation", "-o", tmp_path / "o", "--source", src)
    assert result.exit_code == 1 and "per-residue label has 5 characters but the sequence has 4" in result.output


def test_malformed_fasta(tmp_path):
    src = tmp_path / "src"
    make_flip_tree(src)
    f = src / "gb1/two_vs_rest.fasta"
    f.write_text("oops\n" + f.read_text())
    result = flip("--tasks", "gb1", "-o", tmp_path / "o", "--source", src)
    assert result.exit_code == 1 and "line 1" in result.output and "text before the first" in result.output


def test_unknown_task(tmp_path):
    result = flip("--tasks", "nope", "-o", tmp_path / "o")
    assert result.exit_code == 1 and "unknown FLIP task" in result.output


@pytest.mark.parametrize("bad_id", ['gb1,0', 'gb1"0', '"gb1_0"'])
def test_id_with_comma_or_quote_is_an_error(tmp_path, bad_id):
    """An id is written into the CSV as it is: a ',' would make 4 fields, a '"' a quoted one."""
    src = tmp_path / "src"
    make_flip_tree(src)
    f = src / "gb1/two_vs_rest.fasta"
    f.write_text(f.read_text().replace(">gb1_0 ", f">{bad_id} "))
    out = tmp_path / "o"
    result = flip("--tasks", "gb1", "-o", out, "--source", src)
    line = assert_one_line_error(result, str(f), "line 1", repr(bad_id))
    assert "',' or '\"'" in line
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("task, name, line", [("gb1", "two_vs_rest.fasta", 4), ("bind", "from_publication.fasta", 2)])
def test_non_utf8_byte_is_an_error(tmp_path, task, name, line):
    src = tmp_path / "src"
    make_flip_tree(src)
    f = src / task / name
    lines = f.read_bytes().split(b"\n")
    assert not lines[line - 1].startswith(b">")
    lines[line - 1] = lines[line - 1][:2] + b"\xff" + lines[line - 1][3:]  # a sequence (gb1), a label (bind)
    f.write_bytes(b"\n".join(lines))
    out = tmp_path / "o"
    result = flip("--tasks", task, "-o", out, "--source", src)
    assert_one_line_error(result, str(f), f"line {line}", "not UTF-8")
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("old, new, needle", [
    (b"aav_0", b'aav"0', "line 2: '\"' found"),
    (b"MKVLAA", b"MK\xffLAA", "line 2: not UTF-8"),
    (b"MKVLAA", "MK\ufffdLAA".encode(), "line 2: U+FFFD"),
    (b"aav_0", b"aav,0", "line 2: 4 fields, expected 3"),
    (b"MKVLAA", b"MKVLaA", "line 2: sequence has lower case"),
], ids=["quote", "not-utf8", "replacement-char", "comma", "lower-case"])
def test_verify_catches_bad_flip_rows(flip_server, tmp_path, old, new, needle):
    out = tmp_path / "FLIP"
    assert flip("--tasks", "aav", "-o", out, "--source", flip_server.url, "--cache-dir", tmp_path / "c").exit_code == 0
    path = out / "aav/train/x000.csv"
    path.write_bytes(path.read_bytes().replace(old, new, 1))
    result = CliRunner().invoke(cli, ["verify", str(out)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert f"PROBLEM: aav/train/x000.csv: {needle}" in result.output, result.output
