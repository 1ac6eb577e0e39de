"""The `mdn` command (and `python -m mdn_cli`)."""

import signal


def main() -> None:
    from . import interrupts, phases

    # First thing, before anything slow is imported: from here on Ctrl-C and SIGTERM are requests
    # that the command acts on at a safe point (interrupts.py), never a KeyboardInterrupt inside an import.
    interrupts.install()
    phases.reset(from_process_start=True)  # a run's time breakdown starts with the process
    if hasattr(signal, "SIGXFSZ"):  # a file-size limit fails the write (a clear error) instead of killing the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    interrupts.reached("start")
    from .cli import app

    app(prog_name="mdn")


if __name__ == "__main__":
    main()
