"""A stand-in for the bench's worker process: answers each command at once and logs (command, method)."""

from __future__ import annotations

MEMORY = {"resting_mem_mb": 1.0, "peak_mem_mb": 3.0, "step_mem_mb": 2.0}


def logging_worker(log: list, step_answer: dict, log_stop: bool = False) -> type:
    """A `WorkerHandle` replacement whose every step returns `step_answer` and whose memory step returns `MEMORY`."""

    class FakeWorker:
        def __init__(self, spec, log_path):
            self.method = spec.method

        def receive(self, expected):
            return {"trainable": 0}

        def ask(self, command):
            log.append((command, self.method))
            return MEMORY if command == "memory" else step_answer

        def stop(self):
            if log_stop:
                log.append(("stop", self.method))

    return FakeWorker
