"""
The ``taskmesh-keygen`` command: create signing and payload key files.

``taskmesh-keygen --private PATH --public PATH`` writes a new Ed25519 key
pair; ``taskmesh-keygen --symmetric PATH`` writes a new AES-256 payload key.
Secret files get mode 0600, and no existing file is ever overwritten.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from typing import Sequence, TextIO

from .security._keys import (
    generate_signing_key,
    generate_symmetric_key,
    private_key_pem,
    public_key_base64,
    public_key_pem,
    symmetric_key_text,
    write_new_file,
)

PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taskmesh-keygen",
        description=(
            "Create an Ed25519 key pair for signing taskmesh messages, or an AES-256 key"
            " for encrypting their bodies. Existing files are never overwritten."
        ),
    )
    parser.add_argument(
        "--private",
        metavar="PATH",
        help="write the new private signing key here (PKCS#8 PEM, mode 0600)",
    )
    parser.add_argument(
        "--public",
        metavar="PATH",
        help="write the new public key here (PEM, mode 0644), for the receivers' keyrings",
    )
    parser.add_argument(
        "--symmetric",
        metavar="PATH",
        help="write a new payload encryption key here (base64 of 32 random bytes, mode 0600)",
    )
    return parser


def main(
    argv: Sequence[str] | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """
    Run ``taskmesh-keygen`` and return its exit status.

    The status is 0 when the files were written, 1 when a file exists or
    cannot be written, and 2 for invalid arguments.
    """
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    parser = _parser()
    try:
        options = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2

    signing = options.private is not None or options.public is not None
    if signing == (options.symmetric is not None):
        print(
            "taskmesh-keygen: give either --private PATH --public PATH, or --symmetric PATH",
            file=err,
        )
        return 2
    if signing and (options.private is None or options.public is None):
        print("taskmesh-keygen: --private and --public go together", file=err)
        return 2

    try:
        if signing:
            _write_key_pair(options.private, options.public, out)
        else:
            _write_symmetric_key(options.symmetric, out)
    except FileExistsError as e:
        print(
            f"taskmesh-keygen: {e.filename} already exists; keys are never overwritten, so"
            " remove it first or choose another path",
            file=err,
        )
        return 1
    except OSError as e:
        print(f"taskmesh-keygen: cannot write {e.filename}: {e.strerror}", file=err)
        return 1
    return 0


def _write_key_pair(private_path: str, public_path: str, out: TextIO) -> None:
    for path in (private_path, public_path):
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path)
    key = generate_signing_key()
    write_new_file(private_path, private_key_pem(key), PRIVATE_MODE)
    try:
        write_new_file(public_path, public_key_pem(key.private_key.public_key()), PUBLIC_MODE)
    except OSError:
        # Without its public key the private key is of no use, so remove it
        # and let the command run again.
        os.unlink(private_path)
        raise
    print(f"key id: {key.key_id}", file=out)
    print(f"public key (base64): {public_key_base64(key.private_key.public_key())}", file=out)
    print(f"wrote {private_path} (mode 0600) and {public_path}", file=out)


def _write_symmetric_key(path: str, out: TextIO) -> None:
    if os.path.lexists(path):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path)
    key = generate_symmetric_key()
    write_new_file(path, symmetric_key_text(key), PRIVATE_MODE)
    print(f"payload key id: {key.key_id}", file=out)
    print(f"wrote {path} (mode 0600); copy it to every master and slave", file=out)


if __name__ == "__main__":
    sys.exit(main())
