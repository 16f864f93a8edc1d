"""Process memory as the memory benchmarks measure it (Linux /proc; imported by the scripts beside it).

Peak = VmHWM (the high-water resident set, KiB). Not ``ru_maxrss``: Linux carries that over from
the parent through fork + exec, so a child would report at least its parent's size.
"""


def rss_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field in KiB (``"VmRSS"``: now, ``"VmHWM"``: the peak)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line (not Linux?)")


def reset_peak() -> int:
    """Reset VmHWM to the current resident set; returns that resident set (KiB), the baseline."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return rss_kib("VmRSS")
