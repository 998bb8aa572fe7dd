"""Run a function in a separate, freshly spawned Python process with a chosen environment.

Triton decides at *decoration* time whether a kernel is interpreted (TRITON_INTERPRET=1) or
compiled, and an out-of-bounds access in the interpreter kills the whole process. So interpreter
tests run in a spawned worker with TRITON_INTERPRET=1, and AOT-compile tests in one without it;
a crash in the worker fails that test with a clear message instead of taking pytest down.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os


def _apply_env(env: dict) -> None:
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


class IsolatedRunner:
    """A one-worker spawned process pool with a fixed environment; restarted after a crash."""

    def __init__(self, env: dict, timeout: float = 900.0):
        self.env = dict(env)
        self.timeout = timeout
        self._pool: cf.ProcessPoolExecutor | None = None

    def _get_pool(self) -> cf.ProcessPoolExecutor:
        if self._pool is None:
            # The worker must *start* with the environment: importing felix imports torch, which may
            # import triton, whose standard library is decorated (interpreted or not) right then.
            pool = cf.ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"))
            saved = {key: os.environ.get(key) for key in self.env}
            _apply_env(self.env)
            try:
                pool.submit(os.getpid).result(timeout=self.timeout)
            finally:
                _apply_env(saved)
            self._pool = pool
        return self._pool

    def __call__(self, fn, *args, **kwargs):
        future = self._get_pool().submit(fn, *args, **kwargs)
        try:
            return future.result(timeout=self.timeout)
        except cf.process.BrokenProcessPool as exc:
            self.close()
            raise RuntimeError(
                f"{fn.__name__}{args} crashed its isolated worker process "
                f"(env {self.env}): likely an out-of-bounds access in a kernel"
            ) from exc

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
