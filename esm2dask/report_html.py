"""The report's pictures and page: one PNG per plot (matplotlib's Agg canvas, no display,
no pyplot state) and ``report.html``, which embeds the PNGs as base64 data and needs
nothing else: no script, no stylesheet or font from the network.

:class:`PlotProcess` draws the plots in a Python process of its own, started with the
report (by ``esm2dask report`` first of all, before it imports the rest)."""

from __future__ import annotations

import base64
import html
import json
import logging
import os
import subprocess
import sys
import tempfile

log = logging.getLogger("esm2dask")


SPLIT_TITLES = {
    "train": "train (uf90 members)",
    "uf50-train": "uf50 train (representatives)",
    "val": "validation",
    "test": "test",
}
COLORS = {"train": "#1f77b4", "uf50-train": "#2ca02c", "val": "#ff7f0e", "test": "#9467bd"}


def _figure(width: float = 7.0, height: float = 4.0, left: float = 0.11):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    # fixed margins: a layout engine costs more than the drawing itself
    fig.subplots_adjust(left=left, right=0.97, top=0.91, bottom=0.14)
    FigureCanvasAgg(fig)
    return fig


def _plain(value: float, _position=None) -> str:
    return f"{value:,.0f}" if value >= 1 else f"{value:g}"


def _log_scale(ax, y: bool = False) -> None:
    """Log scale on x (and y), minor ticks at 2 and 5 times each power of ten: as easy to
    read as all eight, and each tick is a handful of matplotlib objects to lay out. Tick
    labels as plain numbers (100, 1,000): lengths and counts read so, and matplotlib's
    10^k labels go through its TeX parser."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    def minor(axis):
        # the 2 and 5 labelled too where the axis spans less than two powers of ten
        def label(value, _position=None):
            lo, hi = axis.get_view_interval()
            return _plain(value) if hi < 100 * lo else ""
        return FuncFormatter(label)

    for axis, set_scale in ((ax.xaxis, ax.set_xscale), (ax.yaxis, ax.set_yscale))[: 2 if y else 1]:
        set_scale("log")
        axis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
        axis.set_major_formatter(FuncFormatter(_plain))
        axis.set_minor_formatter(minor(axis))


def _title(ax, text: str, **kwargs) -> None:
    # y given: matplotlib then skips measuring every tick label to place the title
    # (a third of the drawing time); nothing is drawn above the axes here
    ax.set_title(text, y=1.0, **kwargs)


def _save(fig, folder: str, name: str) -> str:
    fig.savefig(os.path.join(folder, name), format="png", metadata={"Software": None})
    return name


def plot_lengths(split: str, summary: dict, crop: dict, folder: str) -> str:
    """Sequences per length bin, log length axis, the crop line marked."""
    crop_residues, crop_tokens = crop["residues"], crop["tokens"]
    edges = summary["length_histogram"]["edges"]
    counts = summary["length_histogram"]["counts"]
    last = max((i for i, c in enumerate(counts) if c), default=0)
    first = min((i for i, c in enumerate(counts) if c), default=0)
    first = max(first, 1) if counts[0] == 0 else 0  # bin 0 holds empty sequences only
    shown = [max(e, 0.5) for e in edges[first : last + 2]]
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    fig = _figure(left=0.135)
    ax = fig.add_subplot()
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts: no tick between two
    ax.yaxis.set_major_formatter(FuncFormatter(_plain))
    ax.stairs(counts[first : last + 1], shown, fill=True, color=COLORS.get(split, "#1f77b4"), alpha=0.85)
    _log_scale(ax)
    ax.set_xlim(shown[0], max(shown[-1], crop_residues * 4))
    ax.axvline(crop_residues, color="#d62728", linestyle="--", linewidth=1.5)
    b = summary["beyond_crop"]
    ax.text(crop_residues * 1.08, 0.95, f"crop: {crop_residues} residues\n({crop_tokens} tokens)\n"
            f"beyond it:\n{b['rows_share'] * 100:.2f}% of sequences,\n{b['residues_share'] * 100:.2f}% of residues",
            transform=ax.get_xaxis_transform(), va="top", ha="left", fontsize=8.5, color="#d62728")
    ax.set_xlabel("sequence length (residues, log scale)")
    ax.set_ylabel("sequences per bin")
    _title(ax, f"Sequence lengths: {SPLIT_TITLES.get(split, split)}, {summary['rows']:,} sequences", fontsize=11)
    ax.grid(True, which="major", alpha=0.3)
    return _save(fig, folder, f"lengths-{split}.png")


def plot_composition(splits: dict, standard: str, folder: str) -> str:
    """Share of each standard amino acid, and of everything else, per split."""
    names = [s for s in splits if "same_as" not in splits[s]]
    labels = list(standard) + ["other"]
    fig = _figure(9.0, 4.2)
    ax = fig.add_subplot()
    width = 0.8 / max(len(names), 1)
    for i, split in enumerate(names):
        s = splits[split]
        total = s["residues"] or 1
        shares = [s["composition"][a] / total * 100 for a in standard] + [s["nonstandard"]["residues"] / total * 100]
        xs = [x + (i - (len(names) - 1) / 2) * width for x in range(len(labels))]
        ax.bar(xs, shares, width=width, color=COLORS.get(split), label=SPLIT_TITLES.get(split, split))
        ax.annotate(f"{shares[-1]:.3f}%", (xs[-1], shares[-1]), textcoords="offset points", xytext=(0, 3 + 9 * i),
                    ha="center", fontsize=7, color=COLORS.get(split))
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel("amino acid (one-letter code; other: any letter outside the 20 standard ones)")
    ax.set_ylabel("share of residues (%)")
    _title(ax, "Residue composition")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.2)
    if len(names) > 1:
        ax.legend(fontsize=9, loc="upper center", ncols=len(names), frameon=False)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, folder, "composition.png")


def plot_cluster_sizes(clusters: dict, folder: str) -> str:
    """Clusters per member count, both axes log."""
    sizes = sorted((int(k), v) for k, v in clusters["size_counts"].items())
    top = max(k for k, _ in sizes)
    # integer bins, one per size up to 4, then about two per doubling
    edges = sorted({1, 2, 3, 4} | {int(round(2 ** (k / 2))) for k in range(4, 2 * (top + 1).bit_length() + 2)})
    edges = [e for e in edges if e <= top] + [min(e for e in edges if e > top)]
    counts = [0] * (len(edges) - 1)
    for k, v in sizes:
        counts[max(i for i, e in enumerate(edges[:-1]) if e <= k)] += v
    fig = _figure(left=0.15)
    ax = fig.add_subplot()
    ax.stairs(counts, edges, fill=True, color="#1f77b4", alpha=0.85, baseline=0.5)
    _log_scale(ax, y=True)
    ax.set_xlabel("members per UniRef50 cluster (log scale; bins: 1, 2, 3, then two per doubling)")
    ax.set_ylabel("clusters per bin (log scale)")
    _title(ax, f"Cluster sizes: {clusters['clusters']:,} training clusters, {clusters['members']:,} members")
    ax.grid(True, which="major", alpha=0.3)
    return _save(fig, folder, "cluster-sizes.png")


def write_plots(report: dict, folder: str) -> list[tuple[str, str]]:
    """Every plot of the report as a PNG in ``folder``: (file name, caption)."""
    out = []
    for split, summary in report["splits"].items():
        if summary["rows"] and "same_as" not in summary:
            out.append((plot_lengths(split, summary, report["crop"], folder), f"Sequence lengths, {SPLIT_TITLES.get(split, split)}"))
    if any(s["residues"] for s in report["splits"].values()):
        out.append((plot_composition(report["splits"], report["standard_amino_acids"], folder),
                    "Residue composition"))
    if report.get("clusters"):
        out.append((plot_cluster_sizes(report["clusters"], folder), "Members per cluster"))
    return out


def plot_input(report: dict) -> dict:
    """What :func:`write_plots` reads of a report: the statistics, none of the join."""
    return {k: report.get(k) for k in ("splits", "clusters", "standard_amino_acids", "crop")}


class PlotProcess:
    """The plots drawn by a child Python process, started before the statistics are read.

    matplotlib is Python through and through: in the report's process its import (a
    quarter of a second) and the drawing (a third) hold the GIL that the workers' threads
    need, and the second core waits. The child imports matplotlib while the statistics are
    read, and draws while the workers join; the report waits for it at the end
    (``benchmarks/results/report.md``). Where no process can be started, or the child fails
    (the log says why), the plots are drawn here, as before: the same PNGs either way."""

    def __init__(self):
        #: the child's stderr: a file without a name (never a pipe that a long warning
        #: could fill), gone when closed
        self._stderr = None
        self._job: dict | None = None
        try:
            self._stderr = tempfile.TemporaryFile()
            # a session of its own: a Ctrl-C at the terminal is the report's, which stops it
            self._proc = subprocess.Popen([sys.executable, "-c", _child_code()], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=self._stderr, start_new_session=True)
        except OSError:
            self._proc = None

    def draw(self, report: dict, folder: str) -> None:
        """Hand over the statistics (:func:`plot_input`); the PNGs go into ``folder``."""
        self._job = {"report": plot_input(report), "folder": folder}
        if self._proc is None:
            return
        try:
            self._proc.stdin.write(json.dumps(self._job).encode())
            self._proc.stdin.close()
        except OSError:  # the child is gone: plots() says why, or draws them here
            pass

    def plots(self) -> list[tuple[str, str]]:
        """Wait for the child; its plots as :func:`write_plots` returns them."""
        if self._proc is not None:
            out = self._proc.stdout.read()
            if self._proc.wait() == 0 and out:
                return [tuple(p) for p in json.loads(out)]
            self._stderr.seek(0)
            lines = self._stderr.read().decode("utf-8", "replace").strip().splitlines() or ["no message"]
            log.warning("the plot process failed (exit %s: %s); drawing the plots in this process",
                        self._proc.returncode, lines[-1])
        # here a failure is the report's own, with its traceback
        return write_plots(self._job["report"], self._job["folder"])

    def close(self) -> None:
        """Stop the child if it still runs (the report failed or was interrupted)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        if self._proc is not None:
            self._proc.stdout.close()
        if self._stderr is not None:
            self._stderr.close()


def _child_code() -> str:
    """``python -c`` of the child: this very esm2dask (the folder that holds it first on the
    path, unless it is there already, as an installed package's site-packages is; never the
    current folder), then :func:`_child`."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return (f"import sys; root = {root!r}; sys.path[:1] = [] if root in sys.path else [root]; "
            f"from esm2dask.report_html import _child; _child()")


def _child() -> None:
    """:class:`PlotProcess`'s child: imports matplotlib, reads one job (JSON) on stdin,
    draws, writes the plots (JSON) on stdout."""
    import gc

    import matplotlib.backends.backend_agg  # noqa: F401  (while the report reads)
    import matplotlib.figure  # noqa: F401
    import matplotlib.ticker  # noqa: F401

    text = sys.stdin.buffer.read()
    if not text:  # the report stopped before its statistics
        return
    job = json.loads(text)
    sys.stdout.write(json.dumps(write_plots(job["report"], job["folder"])))
    sys.stdout.flush()
    gc.freeze()  # as cli.main does: no collector passes over matplotlib at exit


# ----------------------------------------------------------------------------- the page

CSS = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
.headline { font-size: 1.15em; font-weight: bold; padding: .6em; border-radius: 4px; }
.leak { background: #fde2e1; color: #8b0000; } .clean { background: #e3f5e1; color: #145214; }
table { border-collapse: collapse; margin: .5em 0; font-size: .9em; }
td, th { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th { background: #f2f2f2; } td.l, th.l { text-align: left; }
img { max-width: 100%; display: block; margin: .5em 0 1.5em; }
code { font-size: .95em; }
"""


def _e(value) -> str:
    return html.escape(str(value))


def _n(value) -> str:
    return f"{value:,}" if isinstance(value, int) else _e(value)


def _pct(value: float) -> str:
    return f"{value * 100:.3f}%"


def _table(head: list[str], rows: list[list], left: int = 1, text_from: int | None = None) -> str:
    """Numbers right-aligned; the first ``left`` columns, and those from ``text_from`` on, left."""
    def is_left(i):
        return i < left or (text_from is not None and i >= text_from)

    th = "".join(f"<th class='l'>{_e(h)}</th>" if is_left(i) else f"<th>{_e(h)}</th>" for i, h in enumerate(head))
    body = "".join(
        "<tr>" + "".join(f"<td class='l'>{c}</td>" if is_left(i) else f"<td>{c}</td>" for i, c in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f"<table><tr>{th}</tr>{body}</table>"


def _ids(ids: list, total: int) -> str:
    shown = ", ".join(f"<code>{_e(i)}</code>" for i in ids)
    return shown + (f" … ({total:,} in all)" if total > len(ids) else "")


def render_html(report: dict, plots: list[tuple[str, str]], folder: str) -> str:
    """The page: the headline first, tables, the plots embedded as data."""
    lk = report["leakage"]
    crop_residues, crop_tokens = report["crop"]["residues"], report["crop"]["tokens"]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>esm2dask report: {_e(report['output_dir'])}</title><style>{CSS}</style></head><body>",
        f"<p class='headline {'leak' if lk['found'] else 'clean'}'>{_e(report['headline'])}</p>",
        f"<h1>esm2dask report: <code>{_e(report['output_dir'])}</code></h1>",
        f"<p>Layout read: <b>{_e(report['layout'])}</b> (present: {_e(', '.join(report['layouts_found']))}); "
        f"{report['files_read']:,} files, {report['bytes_read']:,} bytes; esm2dask {_e(report['version'])}. "
        f"ESM-2 crops sequences to {crop_tokens} tokens, BOS and EOS included: {crop_residues} residues.</p>",
    ]
    m = report.get("manifest")
    if m:
        parts.append(f"<p>Tree made {_e(m['created'])} by esm2dask {_e(m['version'])} (manifest SHA-256 "
                     f"<code>{_e(m['sha256'][:16])}…</code>).</p>")
    for note in report["notes"]:
        parts.append(f"<p>Note: {_e(note)}</p>")

    parts.append("<h2>Splits</h2>")
    rows = []
    for split, s in report["splits"].items():
        b = s["beyond_crop"]
        rows.append([
            f"{_e(SPLIT_TITLES.get(split, split))}<br><code>{_e(s['source'])}</code>"
            + (f" (same records as {_e(s['same_as'])})" if "same_as" in s else ""),
            _n(s["rows"]), _n(s["residues"]), _n(s["length"]["min"]), _n(s["length"]["median"]),
            _n(s["length"]["mean"]), _n(s["length"]["max"]),
            f"{_n(b['rows'])} ({_pct(b['rows_share'])})", f"{_n(b['residues'])} ({_pct(b['residues_share'])})",
            _n(s["nonstandard"]["residues"]), _n(s["lowercase_residues"]),
        ])
    parts.append(_table(["split", "sequences", "residues", "min length", "median", "mean", "max",
                         f"sequences > {crop_residues}", f"residues beyond {crop_residues}",
                         "non-standard residues", "lower-case residues"], rows))

    parts.append("<h2>Non-standard letters</h2>")
    rows = []
    for split, s in report["splits"].items():
        for letter, n in s["nonstandard"]["letters"].items():
            rows.append([_e(split), f"<code>{_e(letter)}</code>", _n(n),
                         ", ".join(f"<code>{_e(i)}</code>" for i in s["nonstandard"]["examples"][letter])])
    parts.append(_table(["split", "letter", "residues", "examples (ids)"], rows, left=2, text_from=3) if rows
                 else "<p>None: every residue is one of the 20 standard amino acids.</p>")

    parts.append("<h2>Plots</h2>")
    for name, caption in plots:
        with open(os.path.join(folder, name), "rb") as f:
            data = base64.b64encode(f.read()).decode("ascii")
        parts.append(f"<img src='data:image/png;base64,{data}' alt='{_e(caption)}' title='{_e(name)}'>")

    c = report.get("clusters")
    parts.append("<h2>Clusters</h2>")
    if c:
        parts.append(
            f"<p>{c['clusters']:,} training clusters, {c['members']:,} members: {c['mean_members']} members per "
            f"cluster on average, {c['singletons']:,} with one member, the largest with {c['max_members']:,}. "
            f"BioNeMo draws a cluster, then one of its members.</p>"
        )
        parts.append(_table([f"largest clusters ({c['named_by']})", "members"],
                            [[f"<code>{_e(x['id'])}</code>", _n(x["members"])] for x in c["largest"]]))
    else:
        parts.append("<p>No cluster information in this layout.</p>")

    parts.append("<h2>Leakage and duplicates</h2>")
    parts.append(
        "<p>Sequences are compared upper-cased, by a 128-bit digest (MurmurHash3 x64_128), each match confirmed on the sequences "
        f"themselves ({lk['hash_collisions']} digest collisions among the rows so compared). Pairs compared: "
        f"{_e(', '.join(lk['pairs_compared']) or 'none')}. Up to {lk['examples_max']:,} examples of each kind are "
        "listed in report.json; the counts are complete.</p>"
    )
    rows = [[_e(p), _n(v["sequences"]), _n(v[p.split("/")[0] + "_rows"]), _n(v[p.split("/")[1] + "_rows"]),
             _n(lk["ids_in_two_splits"][p])] for p, v in lk["between_splits"].items()]
    parts.append(_table(["pair", "shared sequences", "rows, first split", "rows, second split", "shared ids"], rows))
    if lk["between_splits_examples"]:
        parts.append(_table(
            ["pair", "length", "ids, first split", "ids, second split"],
            [[_e(e["pair"]), _n(e["length"]), _ids(e["a"]["ids"], e["a"]["rows"]), _ids(e["b"]["ids"], e["b"]["rows"])]
             for e in lk["between_splits_examples"][:50]], left=1, text_from=2))
    if lk["ids_in_two_splits_examples"]:
        parts.append(_table(["pair", "id", "records, first split", "records, second split"],
                            [[_e(e["pair"]), f"<code>{_e(e['id'])}</code>", _e(e["a_records"]), _e(e["b_records"])]
                             for e in lk["ids_in_two_splits_examples"][:50]], left=2, text_from=2))
    parts.append("<h3>Inside each split</h3>")
    rows = [[_e(s), _n(v["groups"]), _n(v["rows"]), _n(v["extra_rows"]), _n(lk["repeated_ids"][s]["ids"])]
            for s, v in lk["within_split"].items()]
    parts.append(_table(["split", "repeated sequences", "their rows", "rows beyond the first", "repeated ids"], rows))
    if lk["within_split_examples"]:
        parts.append(_table(["split", "length", "ids (records)"],
                            [[_e(e["split"]), _n(e["length"]),
                              _ids([f"{i} ({r})" for i, r in zip(e["ids"], e["records"])], e["rows"])]
                             for e in lk["within_split_examples"][:50]], left=1, text_from=2))
    if lk["repeated_id_examples"]:
        parts.append(_table(["split", "id", "records"],
                            [[_e(e["split"]), f"<code>{_e(e['id'])}</code>", _e(e["records"])]
                             for e in lk["repeated_id_examples"][:50]], left=2, text_from=2))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report_files(report: dict, folder: str, plots: list[tuple[str, str]] | None = None) -> None:
    """``folder``: one PNG per plot (unless ``plots`` were drawn there already, see
    :func:`write_plots`), ``report.html`` (self-contained), ``report.json``."""
    if plots is None:
        plots = write_plots(report, folder)
    report["plots"] = [name for name, _ in plots]
    with open(os.path.join(folder, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    with open(os.path.join(folder, "report.html"), "w", encoding="utf-8") as f:
        f.write(render_html(report, plots, folder))
