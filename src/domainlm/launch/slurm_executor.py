"""datatrove's SlurmPipelineExecutor as `domainlm prepare` uses it (``prepare.executor: slurm``).

What it changes: an unset partition or QOS means the cluster's default (datatrove would write
``--partition=None``); memory is given in whole MB (sbatch rejects ``2.0G``); the job finds datatrove's
``launch_pickled_pipeline`` next to the Python that submitted it (the same virtualenv, on a shared filesystem);
no extra job merges datatrove's own stats (domainlm sums its counters itself); and a stage whose job is still in
the queue is waited on, never submitted twice. With ``wait`` (``prepare.slurm.wait``, the default) ``run()``
returns when the stage's job has left the queue, so `domainlm prepare` ends with ``data/stats.json`` like a local
run; without it ``run()`` returns once submitted, the stages chained by ``--dependency=afterok``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from datatrove.executor import SlurmPipelineExecutor

from domainlm.errors import UserError
from domainlm.launch import slurm


class Executor(SlurmPipelineExecutor):
    def __init__(self, pipeline: list, *, wait: bool, **kw):
        kw.setdefault("env_command", f"export PATH={Path(sys.executable).parent}:$PATH")
        super().__init__(pipeline, **kw)
        self.wait = wait

    def get_sbatch_args(self, max_array: int = 1) -> dict:
        args = super().get_sbatch_args(max_array)
        args["mem-per-cpu"] = f"{max(1, round(self.mem_per_cpu_gb * 1024))}M"
        return {k: v for k, v in args.items() if v is not None}

    def launch_merge_stats(self):
        pass

    def _job_file(self) -> Path:
        return Path(self.logging_dir.resolve_paths("slurm_job_id"))

    def run(self):
        if "SLURM_ARRAY_TASK_ID" in os.environ:  # inside the job: run this task's ranks
            return super().run()
        job_file = self._job_file()
        queued = job_file.read_text().strip() if job_file.exists() else None
        if queued and slurm.active(queued):
            if not self.wait:
                raise UserError(f"{self.job_name}: Slurm job {queued} is still in the queue; rerun `domainlm "
                                f"prepare` when it has finished")
        else:
            slurm.require("sbatch")
            try:
                self.launch_job()  # datatrove submits only the ranks without a completion marker
            except subprocess.CalledProcessError as e:  # sbatch's own message went to stderr: datatrove.log
                raise UserError(f"{self.job_name}: sbatch refused the job (exit code {e.returncode}; its message is "
                                f"in datatrove.log next to {job_file.parent.parent.parent}); check prepare.slurm "
                                f"(partition, time, cpus_per_task, mem_per_cpu_gb, qos, sbatch_args)") from None
            if self.job_id in (None, -1):
                return
            queued = str(self.job_id)
            job_file.write_text(queued)
        if self.wait:
            completions = Path(self.logging_dir.resolve_paths("completions"))
            slurm.wait(queued, done=lambda: completions.is_dir() and len(os.listdir(completions)) >= self.tasks)
