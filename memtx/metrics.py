"""Run metrics: one JSON line per step, TensorBoard event files, and the progress line."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time

from memtx.workdir_files import DamagedFile, metrics_record


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class MetricsWriteError(OSError):
    """metrics.jsonl or the event files could not be written (a full disk); one line."""


class MetricsWriter:
    """Appends to `metrics.jsonl`; on resume drops lines of steps after the restored one."""

    def __init__(self, workdir: str, resume_step: int = 0, tensorboard: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._truncate_after(resume_step)
        self.file = open(self.path, "a")
        self.tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
                self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:  # optional: the accelerator image may not have it
                self.tb = None

    def _truncate_after(self, step: int) -> None:
        """Keeps the lines of steps up to `step`; a line cut short by a kill (or otherwise not
        JSON) is dropped with a note, never fatal."""
        if not os.path.exists(self.path):
            return
        if os.path.isdir(self.path):
            raise DamagedFile(f"{self.path} is a directory, not the file memtx wrote; move it away")
        kept, damaged = [], 0
        with open(self.path, errors="replace") as f:
            for line in f:
                record = metrics_record(line)
                if record is None:
                    damaged += bool(line.strip())
                elif record.get("step", 0) <= step:
                    kept.append(json.dumps(record) + "\n")
        if damaged:
            print(f"note: dropped {damaged} damaged line(s) of {self.path} (a run killed mid-write)", file=sys.stderr)
        with open(self.path, "w") as f:
            f.writelines(kept)

    def write(self, step: int, values: dict, group: str = "train") -> None:
        """One metrics.jsonl line; in TensorBoard each number as GROUP/KEY (a key `eval_x` of the
        group "eval" is shown as eval/x)."""
        with self._one_line_on_failure():
            self.file.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    name = key[len(group) + 1:] if key.startswith(group + "_") else key
                    self.tb.add_scalar(f"{group}/{name}", value, step)

    def write_text(self, tag: str, text: str, step: int = 0) -> None:
        """A text panel in TensorBoard (e.g. the resolved config); nothing without TensorBoard."""
        if self.tb is not None:
            self.tb.add_text(tag, text, step)

    def flush(self) -> None:
        with self._one_line_on_failure():
            self.file.flush()
            if self.tb is not None:
                self.tb.flush()

    def close(self) -> None:
        with self._one_line_on_failure():
            self.file.close()
            if self.tb is not None:
                self.tb.close()

    @contextlib.contextmanager
    def _one_line_on_failure(self):
        """A failing write (a full disk) as one MetricsWriteError naming the work directory."""
        try:
            yield
        except OSError as e:
            raise MetricsWriteError(f"cannot write the metrics in {os.path.dirname(self.path)}: "
                                    f"{e.strerror or e}") from None


class Progress:
    """Throughput and ETA over a window since the last report (compilation excluded)."""

    def __init__(self, total: int, done: int = 0, unit: str = "step"):
        self.total, self.unit = total, unit
        self.last_time = time.perf_counter()
        self.last_count, self.tokens = done, 0

    def report(self, done: int, tokens: int, extra: str = "", stream=None) -> float:
        """Prints `done/total`, tokens/s since the last report and an ETA (when `total` is known
        and `done` moved); `total` 0 means unknown. `stream`: default sys.stdout at the call."""
        stream = sys.stdout if stream is None else stream
        now = time.perf_counter()
        self.tokens += tokens
        if self.unit == "tokens":
            count = f"tokens {done:,}" + (f"/{self.total:,} ({min(done / self.total, 1):.0%})" if self.total else "")
        else:
            count = f"{self.unit} {done}/{self.total}" if self.total else f"{self.unit} {done}"
        if done <= self.last_count and (not self.tokens or self.unit == "step"):  # nothing timed yet
            print(f"{count} {extra}".rstrip(), file=stream, flush=True)
            return 0.0
        rate = self.tokens / max(now - self.last_time, 1e-9)
        eta = ""
        if self.total and done > self.last_count:
            eta = f" | ETA {format_duration((now - self.last_time) / (done - self.last_count) * max(self.total - done, 0))}"
        print(f"{count} {extra} | {rate:,.0f} tok/s{eta}".replace("  |", " |"), file=stream, flush=True)
        self.last_time, self.tokens = now, 0
        if done > self.last_count:
            self.last_count = done
        return rate


def markdown_table(header: list[str], lines: list[list[str]]) -> str:
    """A right-aligned Markdown table (the tables evaluation, comparisons and studies print)."""
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(header)]
    fmt = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, lines)])
