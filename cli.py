"""What every command line of the project shares: one-line errors with exit status 2, one-line
warnings, and files written under a temporary name, then renamed.

    from cli import Parser, run_main, warn, write_atomic
    p = Parser(description=...)            # argparse; a bad flag is one line, exit 2
    run_main("sample.py", run, args)       # ValueError / FileNotFoundError → one line, exit 2

A library function raises ValueError or FileNotFoundError naming the offending thing; only the
command line turns it into the one line a user sees.
"""
import argparse
import os
import sys
import warnings


def fail(prog: str, message) -> None:
    """Print `{prog}: error: {message}` on one line of stderr and exit with status 2."""
    # one write: lines of ranks that fail together under torchrun must not interleave
    sys.stderr.write(f"{prog}: error: {' '.join(str(message).split())}\n")
    sys.stderr.flush()
    raise SystemExit(2)


def warn(prog: str, message) -> None:
    """Print `{prog}: warning: {message}` on one line of stderr."""
    sys.stderr.write(f"{prog}: warning: {' '.join(str(message).split())}\n")


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help appends "(default: X)" to a flag's help, unless the help already names its default
    or there is none to name (None: the default is worked out later; False: a switch)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse whose errors (an unknown flag, a value of the wrong type) are one line, exit 2,
    and whose --help names each flag's default once (DefaultsFormatter)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        fail(self.prog, message)


def run_main(prog: str, fn, *args):
    """fn(*args), with bad input (ValueError; a path that is missing, not a directory, a directory
    or not permitted) turned into one line and exit 2, and the library's Python warnings shown as
    one `{prog}: warning:` line each."""
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *_, **__: warn(prog, message)
        try:
            return fn(*args)
        except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                PermissionError) as e:
            fail(prog, e)


def write_atomic(path, save) -> None:
    """save(tmp) writes the file under a temporary name beside path, which then replaces path: a
    reader never sees half a file, and a crash leaves nothing under the final name. The temporary
    name keeps path's extension (np.save and PIL choose the format by it)."""
    root, ext = os.path.splitext(str(path))
    tmp = f"{root}.tmp{os.getpid()}{ext}"
    try:
        save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
