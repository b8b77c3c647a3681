"""age streams on a worker thread: the payload is encrypted and decrypted through a pipe, never held in
memory as a whole.

pyrage reads and writes file objects on its own thread; these wrappers hand it one end of a pipe and
keep the errors it would otherwise drop (a failed final flush, a file that does not decrypt to the
end), turning them into ``BackupError`` messages for the operator.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from keyconnector.ops.backup.format import BackupError

if TYPE_CHECKING:
    from pyrage import x25519


class _CheckedSink(io.BufferedIOBase):
    """The output file as pyrage writes it: pyrage drops the error of its final flush, so keep it here."""

    def __init__(self, out: BinaryIO) -> None:
        super().__init__()
        self._out = out
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        try:
            return self._out.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        try:
            self._out.flush()
        except OSError as exc:
            self.error = self.error or exc
            raise


class Encryptor:
    """Bytes written here are encrypted into ``out`` by pyrage, which pulls them from a pipe on its own
    thread: the payload streams through and is never in memory as a whole."""

    def __init__(self, out: BinaryIO, recipients: list[x25519.Recipient]) -> None:
        import pyrage

        read_fd, write_fd = os.pipe()
        self._pipe_out = open(read_fd, "rb")  # noqa: SIM115 - closed by the thread
        self._pipe_in = open(write_fd, "wb")  # noqa: SIM115 - closed in finish/abort
        self._sink = _CheckedSink(out)
        self._error: BaseException | None = None

        def run() -> None:
            try:
                pyrage.encrypt_io(self._pipe_out, self._sink, recipients)
            except BaseException as exc:
                self._error = exc
            finally:
                self._pipe_out.close()

        self._thread = threading.Thread(target=run, name="age-encrypt", daemon=True)
        self._thread.start()

    def write(self, data: bytes) -> None:
        try:
            self._pipe_in.write(data)
        except BrokenPipeError:
            self._thread.join()
            raise BackupError(
                f"could not encrypt the backup: {self._error or 'the encryptor stopped'}"
            ) from None

    def finish(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            self._pipe_in.close()
        self._thread.join()
        error = self._error or self._sink.error
        if error is not None:
            raise BackupError(f"could not write the backup: {error}")

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._pipe_in.close()
        self._thread.join()


@contextlib.contextmanager
def decrypted_lines(
    source: BinaryIO, identities: list[x25519.Identity], path: Path
) -> Iterator[Iterator[bytes]]:
    """The payload's lines, decrypted by pyrage on its own thread and read from a pipe. Lines come before
    age has authenticated the end of the file: the iterator raises at the end if the file is damaged."""
    import pyrage

    read_fd, write_fd = os.pipe()
    pipe_out = open(read_fd, "rb")  # noqa: SIM115 - closed below
    pipe_in = open(write_fd, "wb")  # noqa: SIM115 - closed by the thread
    errors: list[BaseException] = []

    def run() -> None:
        try:
            pyrage.decrypt_io(source, pipe_in, identities)  # type: ignore[arg-type]
        except BaseException as exc:
            errors.append(exc)
        finally:
            with contextlib.suppress(OSError):
                pipe_in.close()

    def finished() -> None:
        thread.join()
        if errors:
            raise _decrypt_error(errors[0], path)

    def lines() -> Iterator[bytes]:
        for line in pipe_out:
            if not line.endswith(b"\n"):
                finished()  # a cut line: the end of a damaged file, as a rule
            yield line
        finished()

    thread = threading.Thread(target=run, name="age-decrypt", daemon=True)
    thread.start()
    try:
        yield lines()
    finally:
        pipe_out.close()
        thread.join()


def _decrypt_error(error: BaseException, path: Path) -> BackupError:
    if "No matching keys" in str(error):
        return BackupError(f"none of the given identities can open {path}: it was encrypted to other keys")
    return BackupError(f"{path} is damaged or truncated: it does not decrypt to the end (age: {error})")
