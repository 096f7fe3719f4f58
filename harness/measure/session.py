"""One run: its folder and records file, the reference cache, the environment fingerprint."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from backends import base as registry
from harness import models
from harness.errors import UserError
from harness.measure import device as devinfo, progress
from harness.measure.case import run_case
from harness.measure.memory import Telemetry
from harness.measure.reference import Reference, compute_reference
from harness.measure.run_options import RunOptions
from harness.measure.worker_process import run_isolated
from harness.records import Record, RecordWriter, git_info, new_run_id, recorded_case_ids, sanitize
from harness.selection.cases import Case


TRITON_LOG_ENV = "DIFFBENCH_TRITON_LOG_DIR"
_log_dir_we_set: list[str] = []     # the folder the last session of this process set (a user's own is kept)


def set_server_log_dir(folder: Path) -> None:
    """Servers a run starts keep their logs beside its records: each session of a process points them at its own
    run folder, unless the user named a folder."""
    current = os.environ.get(TRITON_LOG_ENV)
    if current is None or current in _log_dir_we_set:
        os.environ[TRITON_LOG_ENV] = str(folder)
        _log_dir_we_set[:] = [str(folder)]


@dataclass
class Session:
    """One run: its folder and records file, the reference cache, the environment fingerprint."""
    results_dir: Path
    options: RunOptions = field(default_factory=RunOptions)
    run_id: str = ""
    resume: bool = False

    def __post_init__(self):
        self.results_dir = Path(self.results_dir).resolve()
        if not self.run_id:
            self.run_id = new_run_id()
        self.run_dir = self.results_dir if self.resume else self.results_dir / self.run_id
        self.records_path = self.run_dir / "records.jsonl"
        self.done = recorded_case_ids(self.records_path) if self.resume else set()
        self.writer = RecordWriter(self.records_path)
        set_server_log_dir(self.run_dir / "triton")
        self.env = devinfo.fingerprint(self.options.device)
        self.git = git_info(Path(__file__).resolve().parents[2])
        self.records: dict[str, Record] = {}
        self._references: dict[tuple, Reference] = {}
        self.cache_dir = models.cache_root()
        self.telemetry = Telemetry(self.options.device == "cuda")   # its sampler starts with the first case
        self.telemetry.sample_idle()        # GPU: before any work in this process (energy subtracts it)
        self.cases: list[Case] = []
        self.measured_here = 0   # cases measured in this process so far: what a shared-process peak carries

    # -- records ---------------------------------------------------------------------------------------------
    def write(self, record: Record) -> None:
        """Store a record once per case id per run (a later suite asking for the same case reuses it)."""
        if record.case_id in self.records:
            return
        self.records[record.case_id] = record
        record.env, record.git = record.env or self.env, self.git
        record_dict = sanitize(record.to_dict())
        self.writer.write(record_dict)

    def append(self, record: Record) -> None:
        """Write a record even when its case id is already in this run (fit's repeated trials of one case)."""
        record.env, record.git = record.env or self.env, self.git
        self.writer.write(sanitize(record.to_dict()))

    def configure(self, cases: list[Case]) -> None:
        """Tell each backend the run's whole case list before any case runs."""
        self.cases = list(cases)
        for name in sorted({c.backend for c in cases}):
            try:
                registry.get(name).configure([c for c in cases if c.backend == name])
            except UserError:
                pass  # unknown backends become unsupported rows when their cases run

    def result(self, case: Case, loop=None) -> Record:
        """The case's record for this run: measured once, then shared by every suite that asks. With isolation,
        measured in a fresh worker process (which times its own loop: pytest-benchmark's `loop` stays here)."""
        if case.id not in self.records:
            progress.case_started(case.id)
            self.write(run_isolated(case, self) if self.options.isolate else run_case(case, self, loop=loop))
            progress.case_done()
        return self.records[case.id]

    def close(self) -> None:
        registry.close_all()
        self.telemetry.stop()
        self.writer.close()

    # -- reference -------------------------------------------------------------------------------------------
    def reference(self, case: Case) -> Reference:
        """The reference for the case's shape: computed once per run. Isolated workers share it through a file in
        the run folder, so it is computed by the first worker of its shape only."""
        key = case.shape_key
        if key not in self._references:
            path = self.run_dir / "references" / (re.sub(r"[^A-Za-z0-9._-]+", "_", "_".join(map(str, key))) + ".pt")
            if path.is_file():   # written by this run's own worker: captured calls hold plain Python values too
                self._references[key] = Reference(**torch.load(path, weights_only=False))
            else:
                self._references[key] = compute_reference(case, self.options)
                if self.options.share_references:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_suffix(".tmp")
                    torch.save(vars(self._references[key]), tmp)
                    tmp.replace(path)
        return self._references[key]
